"""Soak: does the broker's memory stay flat under sustained load?

    .venv/bin/python bench/soak.py [--minutes 10] [--connections 32] [--count 20] [--chunk 60]

The same stack as bench/gateway.py, on loopback: the Node FHIR test server seeded with
bench/data/weights-100.json behind bench/fhir_cache.mjs, and ``python -m broker.cli serve`` in
its own process (SQLite, durable group-commit audit, shipped policy). ``wrk`` keeps
``--connections`` connections busy with ``GET /mdts/mdt-alpha/fhir/Observation?_count=N`` for
``--minutes``, in chunks of ``--chunk`` seconds, each with a fresh access token (so no chunk
outlives its token). A sampler reads the broker's resident set size (VmRSS, /proc) every
``--sample`` seconds.

Printed: RSS after the first chunk (the warm baseline: caches, pools and the policy are filled
by then), at the end and at its highest, the growth end vs baseline, a least-squares slope over
the run after the baseline, requests answered and non-2xx. Issue 7's target: no growth beyond 10%
over a 10-minute soak at 32 connections. Exit status 1 if exceeded or if any request failed.
Afterwards the audit chain the run wrote is verified.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import (MDT, PURPOSE, WRK_LUA, audit_summary, broker_env, check, ensure_wrk, fresh_token,  # noqa: E402
                     loadavg, patient_id, prepare_broker, seed_file, spawn, start_cache, stop, wait_http, wrk)
from tests.support.fhir_server import start_fhir_server  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

GROWTH_TARGET = 0.10


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            self.halt.wait(self.every)


def slope_per_minute(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, bytes per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--count", type=int, default=20, help="bundle size (_count), at most 100")
    parser.add_argument("--chunk", type=int, default=60, help="seconds per wrk run (one token each)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    args = parser.parse_args()
    started = time.time()
    print(f"soak: {args.minutes:g} min at {args.connections} connections, _count={args.count}; "
          f"load average at start {loadavg()}", flush=True)
    wrk_bin = ensure_wrk()
    seed = seed_file()
    pid = patient_id()
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    lua = tmp / "report.lua"
    lua.write_text(WRK_LUA)
    fhir = start_fhir_server([seed])
    procs = []
    answered = errors = chunks = 0
    try:
        cache, upstream = start_cache(fhir.base_url, tmp)
        procs.append(cache)
        broker, settings = asyncio.run(prepare_broker(tmp, upstream, pid))
        b_port = free_port()
        broker_proc = spawn([sys.executable, "-m", "broker.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(b_port)], tmp / "broker.log", env=broker_env(settings, tmp))
        procs.append(broker_proc)
        base = f"http://127.0.0.1:{b_port}"
        wait_http(f"{base}/healthz", broker_proc, tmp / "broker.log")
        url = f"{base}/mdts/{MDT}/fhir/Observation?_count={args.count}"
        sampler = Sampler(broker_proc.pid, args.sample)
        sampler.start()
        deadline = time.monotonic() + args.minutes * 60
        baseline_at: float | None = None
        while time.monotonic() < deadline:
            headers = {"Authorization": f"Bearer {fresh_token(broker, base)}", "X-Purpose-Of-Use": PURPOSE}
            check(url, headers, args.count)
            seconds = max(1, min(args.chunk, int(deadline - time.monotonic())))
            s = wrk(wrk_bin, lua, url, headers, args.connections, seconds)
            chunks += 1
            answered += s.requests + 1
            errors += s.errors
            if baseline_at is None:
                baseline_at = time.monotonic()
            rss = rss_bytes(broker_proc.pid)
            print(f"  chunk {chunks:3d}: {s.rps:7,.0f} req/s  p50 {s.p50_ms:7.1f} ms  p99 {s.p99_ms:7.1f} ms  "
                  f"errors {s.errors}  RSS {rss / 2**20:7.1f} MiB  (load {os.getloadavg()[0]:.2f})", flush=True)
        sampler.halt.set()
        sampler.join()
        stop(broker_proc)
        counts, report = audit_summary(settings.database_url)
    finally:
        for proc in procs:
            stop(proc)
        fhir.stop()

    after = [(t, v) for t, v in sampler.samples if baseline_at is not None and t >= baseline_at]
    if not after:
        print("the soak was too short for a baseline (one chunk at least)")
        return 1
    baseline, last, peak = after[0][1], after[-1][1], max(v for _, v in after)
    growth = (last - baseline) / baseline
    print()
    print(f"RSS baseline (after chunk 1) {baseline / 2**20:.1f} MiB, end {last / 2**20:.1f} MiB, "
          f"peak {peak / 2**20:.1f} MiB; growth end vs baseline {growth * 100:+.1f}% "
          f"(target <= {GROWTH_TARGET * 100:.0f}%: {'met' if growth <= GROWTH_TARGET else 'NOT MET'}); "
          f"slope {slope_per_minute(after) / 2**20:+.2f} MiB/min over {len(after)} samples")
    print(f"requests answered {answered:,}, wrk errors/non-2xx {errors}; audit events "
          f"{sum(counts.values()):,}, chain ok={report.ok} ({report.count:,} verified)")
    print(f"load average at end {loadavg()}; total {time.time() - started:.0f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if growth <= GROWTH_TARGET and not errors and report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
