"""Benchmark: the broker against the source fetched directly and a raw Python passthrough proxy.

    .venv/bin/python bench/gateway.py [--duration 10] [--warmup 2] [--sizes 1,20,100] [--connections 1,32]

Everything runs on loopback, side by side, in one run:

(a) direct      -- the Node FHIR test server (tests/fhir_server), seeded with bench/data/weights-100.json:
                   one invented patient with exactly 100 body-weight Observations (LOINC 29463-7),
                   behind bench/fhir_cache.mjs (a read-through cache of its answers, see below);
                   ``GET /fhir/R4/Observation?patient=Patient/<id>&_count=N``;
(b) passthrough -- bench/passthrough.py in its own process (FastAPI + uvicorn with ``broker serve``'s
                   arguments, aiohttp client built like connectors/fhir.py; no auth, policy or audit),
                   forwarding the same query: ``GET /fhir/Observation?patient=Patient/<id>&_count=N``;
(c) broker      -- ``python -m broker.cli serve`` in its own process, configured from the scenario
                   harness's ``start_broker`` settings (production mode, SQLite, the durable
                   group-commit audit sink with its normal settings, the shipped policy), its youth
                   y-alpha linked to the invented patient; a real access token for ``mh`` (mental
                   health clinician, statutory member of mdt-alpha) with purpose TREAT:
                   ``GET /mdts/mdt-alpha/fhir/Observation?_count=N``;
(d) audited     -- bench/passthrough.py again, in a third process, with ``--audit-db``: the passthrough
                   that also parses and re-serializes each answer and durably commits one audit event
                   per request through the broker's own group-commit sink, on its own SQLite file
                   (WAL, ``synchronous=FULL``). The event is the one the broker wrote for its first
                   search here (~5 KB), each time with a fresh request id and time. This is the floor
                   under the broker: what looking at every resource and auditing every request cost on
                   this machine before any authentication, policy, classification or labelling.

The cache: medplum's MemoryRepository evaluates the ``patient`` search parameter's FHIRPath on
every stored resource, ~180 ms per search here, which would make every target measure medplum.
By default (``--upstream cached``) every target therefore reaches the test server through
bench/fhir_cache.mjs, a Node process that answers each GET with the bytes the test server gave
for the same path and query the first time. ``--upstream medplum`` points them all at the test
server itself; ``--medplum-seconds`` (default 3) also times the uncached test server directly at
one connection for N=20, for reference.

Each (target, connections, N) gets a plain GET first that must return exactly N Observations,
then ``wrk`` (``-t1 -c1`` or ``-t2 -c32``, ``--latency``) for ``--warmup`` s, discarded, and for
``--duration`` s, measured. Printed: req/s, p50 and p99 for each, and the CPU time (user +
system, from /proc) the serving process spent per answered request -- the figure least
disturbed by other work on a shared machine; broker / passthrough throughput and broker -
passthrough p50, next to issue 7's targets; audited / passthrough and broker / audited, which split
the broker's cost into what durable auditing takes and what the rest takes. Afterwards the broker is
stopped, the audit events it wrote are counted and the chain is verified (the audited
passthrough's chain too). Then in-process
policy decisions per second (bench/policy_decisions.py). ``os.getloadavg()`` is printed at the
start, after every run and at the end: the machine may be shared.

The broker's per-client quota (600/min by default) is raised to the maximum the settings allow
(1,000,000/min) -- a quota would otherwise answer 429 -- and its log level is WARNING, as in the
scenario harness (at INFO it writes one JSON line per request). Nothing else is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from tests.scenarios.harness import PERSONAS, start_broker  # noqa: E402
from tests.support.fhir_server import start_fhir_server  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

DATA = ROOT / "bench" / "data"
SEED = DATA / "weights-100.json"
MDT, YOUTH_ID, PERSONA, PURPOSE = "mdt-alpha", "y-alpha", "mh", "TREAT"
TARGETS = ("direct", "passthrough", "audited", "broker")
THREADS = {1: 1}  # wrk threads per connection count; anything else gets 2 (this is a 2-core machine)
RATIO_TARGET, ADDED_P50_TARGET_MS = 0.5, 1.5
WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.timeout, e.status))
end
"""


@dataclass
class Stats:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float | None = None
    """CPU time (user + system) the serving process spent per answered request during the run."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ensure_wrk() -> str:
    """wrk from Debian's package; installed here only when running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install -y wrk) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is needed: as root, run `apt-get install -y wrk` (Debian package wrk), then retry")
    return found


def seed_file() -> Path:
    """The committed seed, regenerated if it is missing."""
    if not SEED.is_file():
        from data.make_seed import write  # bench/data/make_seed.py

        write(SEED)
    return SEED


def patient_id() -> str:
    bundle = json.loads(SEED.read_text(encoding="utf-8"))
    return next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until ``url`` answers 200; raise with the process's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s:\n{log.read_text()[-3000:]}")


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly: the broker's lifespan flushes the audit sink), then wait."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_cache(fhir_base: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    """bench/fhir_cache.mjs in front of the test server: (its process, its FHIR base URL), once it answers."""
    port = free_port()
    proc = spawn([shutil.which("node") or "node", str(ROOT / "bench" / "fhir_cache.mjs"), "--upstream", fhir_base,
                  "--port", str(port)], tmp / "fhir_cache.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, tmp / "fhir_cache.log")
    return proc, f"http://127.0.0.1:{port}/fhir/R4"


def broker_env(settings, tmp: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The harness's settings as the BROKER_* variables ``broker serve`` reads (sources via a YAML file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    for name, value in settings.model_dump(mode="json", exclude_unset=True).items():
        if name == "sources":
            sources = tmp / "sources.yaml"
            sources.write_text(yaml.safe_dump({"sources": [s.model_dump(mode="json", exclude_none=True)
                                                           for s in settings.sources]}))
            env["BROKER_SOURCES_FILE"] = str(sources)
        else:
            env[f"BROKER_{name.upper()}"] = str(value)
    return env


def fresh_token(broker, base: str) -> str:  # type: ignore[no-untyped-def]
    """A real access token from the running broker's token endpoint (RFC 7523 client assertion)."""
    p = PERSONAS[PERSONA]
    form = {"grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": broker.assertion(p.agency), "staff_sub": p.sub, "staff_role": p.role}
    r = httpx.post(f"{base}/oauth/token", data=form, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def check(url: str, headers: dict[str, str], n: int) -> int:
    """One plain GET: 200 and exactly ``n`` Observations; returns the body size."""
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, f"{url}: HTTP {r.status_code} {r.text[:300]}"
    bundle = r.json()
    found = sum(1 for e in bundle.get("entry", []) if e.get("resource", {}).get("resourceType") == "Observation")
    assert found == n, f"{url}: {found} Observations, expected {n}"
    return len(r.content)


def wrk(binary: str, lua: Path, url: str, headers: dict[str, str], conns: int, seconds: int,
        server_pid: int | None = None) -> Stats:
    """One wrk run; numbers from the Lua ``done`` hook (microseconds, exact counts)."""
    threads = THREADS.get(conns, 2)
    cmd = [binary, f"-t{threads}", f"-c{conns}", f"-d{max(1, seconds)}s", "--timeout", "10s", "--latency",
           "-s", str(lua)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid else None
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    d = json.loads(line[len("WRKJSON "):])
    errors = d["connect"] + d["read"] + d["write"] + d["timeout"] + d["status"]
    return Stats(requests=d["requests"], rps=d["requests"] / (d["duration_us"] / 1e6), p50_ms=d["p50_us"] / 1000,
                 p99_ms=d["p99_us"] / 1000, errors=errors,
                 cpu_ms=cpu * 1000 / d["requests"] if cpu is not None and d["requests"] else None)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(results: dict[tuple[str, int, int], Stats], sizes: list[int], conns_list: list[int],
                body: dict[tuple[str, int], int]) -> None:
    print()
    _markdown(["conns", "N", "target", "body bytes", "req/s", "p50 ms", "p99 ms", "server CPU ms/req",
               "errors/non-2xx"],
              [[conns, n, target, f"{body[(target, n)]:,}", f"{s.rps:,.0f}", f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}",
                f"{s.cpu_ms:.2f}" if s.cpu_ms is not None else "-", s.errors]
               for conns in conns_list for n in sizes for target in TARGETS
               for s in (results[(target, conns, n)],)])
    print()
    rows = []
    for conns in conns_list:
        for n in sizes:
            d, p, _a, b = (results[(t, conns, n)] for t in TARGETS)
            ratio, added = b.rps / p.rps, b.p50_ms - p.p50_ms
            target = ""
            if conns == 32 and n == 20:
                target = f"ratio ≥ {RATIO_TARGET}: {'met' if ratio >= RATIO_TARGET else 'NOT MET'}"
            elif conns == 1 and n == 20:
                met = "met" if added <= ADDED_P50_TARGET_MS else "NOT MET"
                target = f"added p50 ≤ {ADDED_P50_TARGET_MS} ms: {met}"
            rows.append([conns, n, f"{p.rps / d.rps:.2f}", f"{ratio:.2f}", f"{added:+.2f}",
                         f"{b.p99_ms - p.p99_ms:+.2f}", _cpu_diff(b, p), target])
    _markdown(["conns", "N", "passthrough ÷ direct (req/s)", "broker ÷ passthrough (req/s)",
               "broker − passthrough p50 (ms)", "broker − passthrough p99 (ms)", "broker − passthrough CPU (ms/req)",
               "target"], rows)
    print()
    print("The floor: the audited passthrough (parse, re-serialize, one durable audit commit; nothing else)")
    print()
    rows = []
    for conns in conns_list:
        for n in sizes:
            _d, p, a, b = (results[(t, conns, n)] for t in TARGETS)
            rows.append([conns, n, f"{a.rps / p.rps:.2f}", f"{a.p50_ms - p.p50_ms:+.2f}", _cpu_diff(a, p),
                         f"{b.rps / a.rps:.2f}", f"{b.p50_ms - a.p50_ms:+.2f}", _cpu_diff(b, a)])
    _markdown(["conns", "N", "audited ÷ passthrough (req/s)", "audited − passthrough p50 (ms)",
               "audited − passthrough CPU (ms/req)", "broker ÷ audited (req/s)", "broker − audited p50 (ms)",
               "broker − audited CPU (ms/req)"], rows)


def _markdown(header: list[str], rows: list[list[object]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def _cpu_diff(x: Stats, y: Stats) -> str:
    return f"{x.cpu_ms - y.cpu_ms:+.2f}" if x.cpu_ms is not None and y.cpu_ms is not None else "-"


async def prepare_broker(tmp: Path, fhir_base: str, pid: str):  # type: ignore[no-untyped-def]
    """Seed through the scenario harness, link y-alpha to the invented patient, return (broker, settings)."""
    from broker.store.models import YouthIdentifier

    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_base,
                           rate_limit_per_minute=1_000_000, log_level="WARNING")
    with b.runtime.sessions() as s:
        s.execute(update(YouthIdentifier).where(YouthIdentifier.youth_id == YOUTH_ID,
                                                YouthIdentifier.source == "county-ehr").values(value=pid))
        s.commit()
    settings = b.runtime.settings
    await b.aclose()  # the served broker is another process; this one only keeps the agency keys
    return b, settings


def audit_summary(database_url: str) -> tuple[dict[tuple[str, int], int], object]:
    """Audit events by (action, outcome), and the chain verification report."""
    from broker.audit.verify import verify_chain
    from broker.store.db import make_engine, make_sessionmaker
    from broker.store.models import AuditEventRow

    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        rows = s.execute(select(AuditEventRow.action, AuditEventRow.outcome, func.count())
                         .group_by(AuditEventRow.action, AuditEventRow.outcome)).all()
    report = verify_chain(sessions, batch=5000)
    engine.dispose()
    return {(a, o): c for a, o, c in rows}, report


def broker_search_event(database_url: str, path: Path) -> None:
    """Write the body of the broker's latest audited search to ``path`` (the audited passthrough commits it)."""
    from broker.store.db import make_engine
    from broker.store.models import AuditEventRow

    engine = make_engine(database_url)
    with engine.connect() as conn:
        body = conn.execute(select(AuditEventRow.body).where(AuditEventRow.action == "fhir.search",
                                                             AuditEventRow.outcome == 200)
                            .order_by(AuditEventRow.seq.desc()).limit(1)).scalar_one()
    engine.dispose()
    path.write_text(body, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="discarded seconds before each run")
    parser.add_argument("--sizes", default="1,20,100", help="bundle sizes (_count), at most 100")
    parser.add_argument("--connections", default="1,32", help="wrk connections (1 → -t1, else -t2)")
    parser.add_argument("--upstream", choices=("cached", "medplum"), default="cached",
                        help="reach the FHIR test server through bench/fhir_cache.mjs (default) or directly")
    parser.add_argument("--medplum-seconds", type=int, default=3,
                        help="also time the uncached test server directly (c=1, N=20) for reference (0: skip)")
    parser.add_argument("--policy-seconds", type=float, default=3.0, help="warm policy-decision loop (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    conns_list = [int(x) for x in args.connections.split(",")]
    assert all(1 <= n <= 100 for n in sizes), "the seed has 100 Observations"

    started = time.time()
    print(f"gateway bench {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()}: "
          f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.platform()}")
    print(f"load average at start: {loadavg()}", flush=True)
    wrk_bin = ensure_wrk()
    print(subprocess.run([wrk_bin, "--version"], capture_output=True, text=True).stdout.splitlines()[0])
    seed = seed_file()
    pid = patient_id()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    lua = tmp / "report.lua"
    lua.write_text(WRK_LUA)
    fhir = start_fhir_server([seed])
    procs: list[subprocess.Popen] = []
    medplum: Stats | None = None
    results: dict[tuple[str, int, int], Stats] = {}
    body: dict[tuple[str, int], int] = {}
    broker_answers = tokens = 0
    try:
        upstream = fhir.base_url
        if args.upstream == "cached":
            cache, upstream = start_cache(fhir.base_url, tmp)
            procs.append(cache)
        broker, settings = asyncio.run(prepare_broker(tmp, upstream, pid))
        b_port, p_port = free_port(), free_port()
        broker_proc = spawn([sys.executable, "-m", "broker.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(b_port)], tmp / "broker.log", env=broker_env(settings, tmp))
        procs.append(broker_proc)
        pids = {"direct": procs[0].pid if args.upstream == "cached" else fhir.process.pid, "broker": broker_proc.pid}
        procs.append(spawn([sys.executable, str(ROOT / "bench" / "passthrough.py"), "--upstream", upstream,
                            "--port", str(p_port)], tmp / "passthrough.log"))
        pids["passthrough"] = procs[-1].pid
        b_base, p_base = f"http://127.0.0.1:{b_port}", f"http://127.0.0.1:{p_port}"
        wait_http(f"{b_base}/healthz", broker_proc, tmp / "broker.log")
        wait_http(f"{p_base}/healthz", procs[-1], tmp / "passthrough.log")
        # The audited passthrough commits the event the broker writes for the same search.
        check(f"{b_base}/mdts/{MDT}/fhir/Observation?_count={sizes[0]}",
              {"Authorization": f"Bearer {fresh_token(broker, b_base)}", "X-Purpose-Of-Use": PURPOSE}, sizes[0])
        broker_answers, tokens = 1, 1
        broker_search_event(settings.database_url, tmp / "audit-event.json")
        a_port, audited_db = free_port(), f"sqlite:///{tmp / 'audited.sqlite'}"
        audited_proc = spawn([sys.executable, str(ROOT / "bench" / "passthrough.py"), "--upstream", upstream,
                              "--port", str(a_port), "--audit-db", audited_db,
                              "--audit-event", str(tmp / "audit-event.json")], tmp / "audited.log")
        procs.append(audited_proc)
        pids["audited"] = audited_proc.pid
        a_base = f"http://127.0.0.1:{a_port}"
        wait_http(f"{a_base}/healthz", audited_proc, tmp / "audited.log")

        def url(target: str, n: int) -> str:
            if target == "broker":
                return f"{b_base}/mdts/{MDT}/fhir/Observation?_count={n}"
            base = {"direct": upstream, "passthrough": f"{p_base}/fhir", "audited": f"{a_base}/fhir"}[target]
            return f"{base}/Observation?patient=Patient/{pid}&_count={n}"

        print(f"broker: {b_base} (pid {broker_proc.pid}); passthrough: {p_base} (pid {pids['passthrough']}); "
              f"audited passthrough: {a_base} (pid {pids['audited']}); "
              f"FHIR test server: {fhir.base_url} (pid {fhir.process.pid}); upstream of all: {upstream}; "
              f"work dir {tmp}")
        print(f"upstream queries: direct and both passthroughs ask for N; the broker asks its source for "
              f"Observation?patient=Patient/{pid}&_count=N+1 (the page and one more, for its next link)")
        print(f"runs: {args.warmup:g} s warm-up + {args.duration:g} s measured each, connections {conns_list}, "
              f"sizes {sizes}", flush=True)
        for conns in conns_list:
            for n in sizes:
                for target in TARGETS:
                    headers: dict[str, str] = {}
                    if target == "broker":  # a fresh token per run, so any --duration stays inside its lifetime
                        token = fresh_token(broker, b_base)
                        tokens += 1
                        headers = {"Authorization": f"Bearer {token}", "X-Purpose-Of-Use": PURPOSE}
                    body[(target, n)] = check(url(target, n), headers, n)
                    if args.warmup > 0:
                        warm = wrk(wrk_bin, lua, url(target, n), headers, conns, args.warmup)
                    s = wrk(wrk_bin, lua, url(target, n), headers, conns, args.duration, pids[target])
                    results[(target, conns, n)] = s
                    if target == "broker":
                        broker_answers += 1 + s.requests + (warm.requests if args.warmup > 0 else 0)
                    print(f"  c={conns:<3} N={n:<4} {target:12} {s.rps:8,.0f} req/s  p50 {s.p50_ms:7.2f} ms  "
                          f"p99 {s.p99_ms:7.2f} ms  server CPU {s.cpu_ms or 0:6.2f} ms/req  errors {s.errors}  "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
        if args.medplum_seconds > 0:
            medplum_url = f"{fhir.base_url}/Observation?patient=Patient/{pid}&_count=20"
            check(medplum_url, {}, 20)
            medplum = wrk(wrk_bin, lua, medplum_url, {}, 1, args.medplum_seconds)
            print(f"  reference: the FHIR test server uncached, c=1 N=20: {medplum.rps:,.1f} req/s  "
                  f"p50 {medplum.p50_ms:.2f} ms  p99 {medplum.p99_ms:.2f} ms", flush=True)
        print(f"load average after the HTTP runs: {loadavg()}")
        stop(broker_proc)
        counts, report = audit_summary(settings.database_url)
        stop(audited_proc)
        audited_counts, audited_report = audit_summary(audited_db)
    finally:
        for proc in procs:
            stop(proc)
        fhir.stop()

    print_table(results, sizes, conns_list, body)
    if medplum is not None:
        print(f"\nreference: the FHIR test server itself (uncached), c=1, N=20: {medplum.rps:,.1f} req/s, "
              f"p50 {medplum.p50_ms:.2f} ms, p99 {medplum.p99_ms:.2f} ms")
    print()
    ok200 = counts.get(("fhir.search", 200), 0)
    print(f"audit: {sum(counts.values()):,} events written by the broker during the run "
          f"({', '.join(f'{a} {o}: {c:,}' for (a, o), c in sorted(counts.items()))}); "
          f"wrk + checks counted {broker_answers:,} completed broker searches and {tokens} token requests "
          f"(searches still in flight when wrk stopped are audited too, so events ≥ answers)")
    print(f"audit chain: verify_chain ok={report.ok}, {report.count:,} events checked"
          + ("" if report.ok else f", first bad seq {report.first_bad_seq}: {report.problem}"))
    print(f"audited passthrough: {sum(audited_counts.values()):,} events, verify_chain ok={audited_report.ok}")
    if ok200 < broker_answers:
        print("WARNING: fewer audited searches than answered ones")
    errors = sum(s.errors for s in results.values())
    if errors:
        print(f"WARNING: {errors} wrk errors or non-2xx answers (see the errors column)")

    if args.policy_seconds > 0:
        print()
        from policy_decisions import run as policy_run

        policy_run(args.policy_seconds)
    print()
    print(f"load average at end: {loadavg()}; total {time.time() - started:.0f} s")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if report.ok and audited_report.ok and not errors and ok200 >= broker_answers else 1


if __name__ == "__main__":
    raise SystemExit(main())
