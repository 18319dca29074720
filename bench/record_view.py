"""Benchmark: GET /mdts/{id}/record across 5 sources, against the slowest source fetched directly.

    .venv/bin/python bench/record_view.py [--requests 200] [--warmup 20]

Sources: the Node FHIR test server (the county EHR, over HTTP) and the four SQL-backed agency
systems (child welfare, probation, juvenile court, school district; SQLite files built by the
synthetic generator). The broker runs under uvicorn on loopback with a SQLite store and the
durable group-commit audit sink; requests go over real HTTP, one at a time, as the child
welfare worker (COC), who may see something from every source.

Side by side, in the same run and the same way (one at a time, ``--requests`` rounds in which
each target is called once, in turn):

- each source fetched directly: every resource type it serves for youth y-alpha, types in
  parallel -- over HTTP straight to the FHIR server for the EHR, through the SQL connector for
  the agency systems (there is no other way to "ask" a database);
- the broker's record view, which does all of that plus authentication, roster and grounds,
  policy, redaction, labels and a durable audit write.

Printed: median and p90 of each, and the ratio broker median / slowest source's median.
Issue 6's target: <= 1.3 at one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402

from broker.app import create_app  # noqa: E402
from broker.runtime import load_connector  # noqa: E402
from broker.settings import SourceConfig  # noqa: E402
from broker.store.models import YouthIdentifier  # noqa: E402
from connectors import synthetic  # noqa: E402
from connectors.base import SourceQuery  # noqa: E402
from tests.scenarios.harness import EHR_SYSTEM, EHR_TYPES, YOUTH, start_broker  # noqa: E402
from tests.support.fhir_server import start_fhir_server  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

DEMO_FHIR = ROOT / "connectors" / "demo_data" / "fhir"


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


async def interleaved(fns: dict, n: int, warmup: int) -> dict[str, list[float]]:  # type: ignore[type-arg]
    """Each function once per round, in turn, for ``warmup`` then ``n`` rounds; seconds per call.

    Interleaving keeps the comparison fair: the Node server gets faster as its JIT warms up and
    other load on the machine comes and goes, and every target sees the same conditions.
    """
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + n):
        for name, fn in fns.items():
            t = time.perf_counter()
            await fn()
            if i >= warmup:
                out[name].append(time.perf_counter() - t)
    return out


def serve(app, port: int) -> uvicorn.Server:  # type: ignore[no-untyped-def]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


async def main_async(args: argparse.Namespace) -> None:
    fhir = start_fhir_server(sorted(DEMO_FHIR.glob("*.json")))
    tmp = Path(tempfile.mkdtemp(prefix="bench-record-"))
    try:
        urls = synthetic.build_sqlite(tmp / "sources")
        sql_configs = synthetic.source_configs(urls, timeout=5)
        sources = [SourceConfig(name="county-ehr", kind="fhir", base_url=fhir.base_url,
                                identifier_system=EHR_SYSTEM, default_categories=["general-health"],
                                resource_types=EHR_TYPES, timeout=5), *sql_configs]
        b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir.base_url, sources=sources,
                               log_level="WARNING")
        with b.runtime.sessions() as s:
            for source, value in synthetic.TEST_YOUTH["y-alpha"].items():
                s.add(YouthIdentifier(youth_id="y-alpha", source=source,
                                      system=synthetic.identifier_system(source), value=value))
            s.commit()
        token = await b.token("cw")
        port = free_port()
        server = serve(create_app(runtime=b.runtime), port)

        async with aiohttp.ClientSession() as http:
            async def broker_once() -> None:
                async with http.get(f"http://127.0.0.1:{port}/mdts/mdt-alpha/record",
                                    headers={"Authorization": f"Bearer {token}", "X-Purpose-Of-Use": "COC"}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()

            patient = YOUTH["y-alpha"]

            async def ehr_once() -> None:
                async def one(t: str) -> None:
                    # the same query the broker's FHIR connector sends
                    params = {"_id": patient} if t == "Patient" else {"patient": f"Patient/{patient}"}
                    async with http.get(f"{fhir.base_url}/{t}", params=params) as r:
                        assert r.status == 200
                        await r.read()
                await asyncio.gather(*(one(t) for t in EHR_TYPES))

            connectors = {cfg.name: load_connector(cfg) for cfg in sql_configs}

            def sql_once(name: str):  # type: ignore[no-untyped-def]
                c = connectors[name]
                pid = synthetic.TEST_YOUTH["y-alpha"][name]

                async def run() -> None:
                    await asyncio.gather(*(c.search(SourceQuery(resource_type=t, patient_id=pid), timeout=5)
                                           for t in sorted(c.resource_types)))
                return run

            direct = {"county-ehr": ehr_once, **{name: sql_once(name) for name in connectors}}
            samples = await interleaved({**direct, "broker": broker_once}, args.requests, args.warmup)
            results = {name: summary(samples[name]) for name in direct}
            broker = summary(samples["broker"])
            for c in connectors.values():
                await c.aclose()

        print(f"record view, {args.requests} requests one at a time (after {args.warmup} warm-up), ms:")
        for name, (p50, p90) in results.items():
            print(f"  direct {name:16} median {p50 * 1000:7.2f}  p90 {p90 * 1000:7.2f}")
        print(f"  broker /record          median {broker[0] * 1000:7.2f}  p90 {broker[1] * 1000:7.2f}")
        slowest = max(results, key=lambda k: results[k][0])
        print(f"ratio broker / slowest source ({slowest}): median {broker[0] / results[slowest][0]:.2f}x, "
              f"p90 {broker[1] / results[slowest][1]:.2f}x  (target <= 1.3x)")
        server.should_exit = True
        # The connectors' HTTP sessions belong to the server thread's event loop; the process is
        # about to exit, so only the audit sink (which commits what is queued) and the pool close.
        b.runtime.audit.close()
        b.runtime.engine.dispose()
    finally:
        fhir.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
