"""Benchmark: durable audit append rate, SqlAuditSink vs GroupCommitAuditSink, and verify_chain rate.

    .venv/bin/python bench/audit.py [--seconds 3] [--threads 1,32] [--backends sqlite,postgresql]
    .venv/bin/python bench/audit.py --verify-only [--verify-events 200000] [--verify-workers 1,auto]

For each backend (a temporary SQLite file with the broker's settings -- WAL, synchronous=FULL,
BEGIN IMMEDIATE -- and a throwaway PostgreSQL server started like the tests' one, but with
``fsync=on`` restored so that a commit really waits for the disk), each sink and each writer
thread count, threads append realistic events (tests/audit/events.py, built before the clock
starts unless ``--build-in-loop``) as fast as they can for ``--seconds``; the rate counts only
appends that returned (i.e. were committed). All cases of a
backend append to the same chain, which is then verified. The verify rate is timed separately on a
chain of ``--verify-events`` events written straight into the tables (tests/audit/bulk.py), after
one untimed walk, ``--verify-repeat`` times for each ``--verify-workers`` setting (``auto`` is
verify_chain's default: a process per usable CPU, at most 4; ``1`` is the serial walk);
``--verify-only`` skips the append cases.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.audit.group import GroupCommitAuditSink  # noqa: E402
from broker.audit.sink import SqlAuditSink  # noqa: E402
from broker.audit.verify import verify_chain  # noqa: E402
from broker.store.db import make_engine, make_sessionmaker, upgrade  # noqa: E402
from tests.audit.bulk import bulk_chain  # noqa: E402
from tests.audit.events import make_event  # noqa: E402
from tests.support.postgres import start_postgres  # noqa: E402


PREBUILT_RATE = 8_000  # events/s per case the pre-built pools are sized for; beyond it, events are built in the loop


def run_case(sink, threads: int, seconds: float, start_id: int,  # type: ignore[no-untyped-def]
             build_in_loop: bool = False) -> tuple[int, float]:
    """Append from ``threads`` threads until the deadline; returns (committed events, elapsed s).

    By default each thread's events are built before the clock starts, so the rate is the sink's
    and not also the event factory's (which took ~20% of the GIL time with 32 writers);
    ``build_in_loop`` builds each event just before its append, as a request would.
    """
    counts = [0] * threads
    go = threading.Event()
    deadline = [0.0]
    per_thread = 0 if build_in_loop else int(seconds * PREBUILT_RATE / threads) + 50
    pools = [[make_event(start_id + t * 10_000_000 + k) for k in range(per_thread)] for t in range(threads)]

    def writer(t: int) -> None:
        pool = pools[t]
        go.wait()
        i = start_id + t * 10_000_000 + per_thread
        while time.monotonic() < deadline[0]:
            if pool:
                sink.append(pool.pop())
            else:
                sink.append(make_event(i))
                i += 1
            counts[t] += 1

    pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    began = time.monotonic()
    deadline[0] = began + seconds
    go.set()
    for th in pool:
        th.join()
    return sum(counts), time.monotonic() - began


def bench_backend(name: str, url: str, seconds: float, thread_counts: list[int], verify_url: str,
                  verify_events: int, build_in_loop: bool = False, verify_only: bool = False,
                  verify_workers: tuple[int | None, ...] = (None,), verify_repeat: int = 3,
                  verify_batch: int = 5000) -> list[str]:
    if verify_only:
        return bench_verify(name, verify_url, verify_events, verify_workers, verify_repeat, verify_batch)
    upgrade(url)
    engine = make_engine(url, pool_size=20)
    sessions = make_sessionmaker(engine)
    SqlAuditSink(sessions).append(make_event(0))  # create the head; warm the connection
    lines = []
    next_id = 1
    for threads in thread_counts:
        rates = {}
        for label in ("SqlAuditSink", "GroupCommitAuditSink"):
            sink = SqlAuditSink(sessions) if label == "SqlAuditSink" else GroupCommitAuditSink(sessions)
            n, elapsed = run_case(sink, threads, seconds, next_id, build_in_loop)
            next_id += 1_000_000_000
            extra = ""
            if isinstance(sink, GroupCommitAuditSink):
                extra = f"  (avg batch {sink.events / max(sink.batches, 1):.1f})"
                sink.close()
            rates[label] = n / elapsed
            line = f"{name:10} {label:22} {threads:3} threads: {n:7d} events in {elapsed:5.2f} s = {rates[label]:9.0f} ev/s{extra}"
            print(line, flush=True)
            lines.append(line)
        line = f"{name:10} ratio group/baseline at {threads} threads: {rates['GroupCommitAuditSink'] / rates['SqlAuditSink']:.2f}x"
        print(line, flush=True)
        lines.append(line)
    began = time.monotonic()
    report = verify_chain(sessions)
    elapsed = time.monotonic() - began
    assert report.ok, report
    line = f"{name:10} verify_chain: {report.count} events in {elapsed:.2f} s = {report.count / elapsed:.0f} ev/s"
    print(line, flush=True)
    lines.append(line)
    engine.dispose()
    lines += bench_verify(name, verify_url, verify_events, verify_workers, verify_repeat, verify_batch)
    return lines


def bench_verify(name: str, url: str, n: int, workers: tuple[int | None, ...] = (None,), repeat: int = 3,
                 batch: int = 5000) -> list[str]:
    """Verify rate on a long chain (written straight into the tables, like tests/audit/bulk.py).

    Each setting of ``workers`` (None: verify_chain's default) is timed ``repeat`` times after
    one untimed walk; the median and the spread are printed, with the load average, because on a
    shared machine a single run says little.
    """
    upgrade(url)
    engine = make_engine(url)
    began = time.monotonic()
    bulk_chain(engine, n)
    if engine.dialect.name == "postgresql":
        # A table that was just bulk-loaded is read ~10% slower until it is vacuumed (visibility
        # map, hint bits), and autovacuum might start on it mid-run; a live audit table has long
        # been vacuumed by autovacuum, so time that.
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM (ANALYZE) audit_events")
    print(f"{name:10} wrote a chain of {n} events in {time.monotonic() - began:.1f} s", flush=True)
    sessions = make_sessionmaker(engine)
    lines = []
    for w in workers:
        label = "auto" if w is None else str(w)
        verify_chain(sessions, batch=batch, workers=w)  # warm the page cache and the connection pool
        rates = []
        for _ in range(repeat):
            cpu = os.times()
            began = time.monotonic()
            report = verify_chain(sessions, batch=batch, workers=w)
            elapsed = time.monotonic() - began
            after = os.times()
            assert report.ok and report.count == n, report
            rates.append(n / elapsed)
            used = (after.user - cpu.user + after.system - cpu.system
                    + after.children_user - cpu.children_user + after.children_system - cpu.children_system)
            print(f"{name:10}   workers={label:4} {elapsed:5.2f} s = {n / elapsed:7.0f} ev/s"
                  f"  (this process and its helpers: {used / n * 1e6:.1f} CPU-µs/event;"
                  f" load average {os.getloadavg()[0]:.2f})", flush=True)
        line = (f"{name:10} verify_chain on {n} events, batch={batch}, workers={label}: median"
                f" {statistics.median(rates):.0f} ev/s (min {min(rates):.0f}, max {max(rates):.0f}, {repeat} runs)")
        print(line, flush=True)
        lines.append(line)
    engine.dispose()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each timed case")
    parser.add_argument("--threads", default="1,32", help="comma-separated writer thread counts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--verify-events", type=int, default=200_000, help="length of the chain verify is timed on")
    parser.add_argument("--build-in-loop", action="store_true",
                        help="build each event just before its append instead of before the clock starts")
    parser.add_argument("--verify-only", action="store_true", help="time only verify_chain, not the appends")
    parser.add_argument("--verify-workers", default="auto",
                        help="comma-separated verify_chain worker counts to time; auto = its default, 1 = serial")
    parser.add_argument("--verify-repeat", type=int, default=3, help="timed walks per worker setting")
    parser.add_argument("--verify-batch", type=int, default=5000, help="verify_chain's batch (rows per query)")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    backends = args.backends.split(",")
    verify = {"verify_only": args.verify_only, "verify_repeat": args.verify_repeat, "verify_batch": args.verify_batch,
              "verify_workers": tuple(None if w == "auto" else int(w) for w in args.verify_workers.split(","))}
    print(f"{len(os.sched_getaffinity(0))} CPUs usable; load average {os.getloadavg()}", flush=True)

    if "sqlite" in backends:
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            bench_backend("sqlite", f"sqlite:///{tmp}/audit.db", args.seconds, thread_counts,
                          f"sqlite:///{tmp}/verify.db", args.verify_events, args.build_in_loop, **verify)
    if "postgresql" in backends:
        server = start_postgres()
        try:
            import subprocess

            from tests.support.postgres import _as_server_user

            # The test server runs with fsync=off; restart it with the same options but fsync on,
            # so that a commit really waits for the disk (as in production).
            root = os.path.dirname(server.datadir)
            opts = (f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={root} "
                    "-c fsync=on -c max_connections=200")
            subprocess.run(_as_server_user([f"{server.bindir}/pg_ctl", "-D", server.datadir, "-o", opts,
                                            "-w", "-m", "fast", "-l", os.path.join(root, "log"), "restart"]),
                           check=True, capture_output=True)
            import psycopg

            with psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres",
                                 autocommit=True) as conn:
                fsync = conn.execute("SHOW fsync").fetchone()[0]
                sync_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
            print(f"postgresql: fsync={fsync} synchronous_commit={sync_commit}", flush=True)
            bench_backend("postgresql", server.create_database(), args.seconds, thread_counts,
                          server.create_database(), args.verify_events, args.build_in_loop, **verify)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
