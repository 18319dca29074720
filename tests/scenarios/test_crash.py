"""A broker killed with SIGKILL under load leaves an intact audit chain, and no released data unaudited.

Issue 5. A real ``broker serve`` process runs on a seeded database (SQLite file or PostgreSQL)
while sixteen clients fetch records; after a random 0.3-1.5 s it is killed without warning,
restarted and killed again, three times. Afterwards, with no server running:

* the hash chain verifies (no event half-written, no fork);
* every response that carried records has exactly one audit event, outcome 200, released_count > 0;
* every audit event that exists has a body that parses as a JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from broker.audit.verify import verify_chain
from broker.store.db import make_engine, make_sessionmaker
from broker.store.models import AuditEventRow
from tests.scenarios.harness import start_broker
from tests.support.ports import free_port

ROUNDS = 3
CLIENTS = 16
KILL_AFTER = (0.3, 1.5)            # seconds of load before SIGKILL
STARTUP_TIMEOUT = 60.0             # generous: the machine may be loaded
REQUEST_TIMEOUT = 20.0
MIX = [("mh", "TREAT", "Observation"), ("mh", "TREAT", "Condition"),
       ("po", "COC", "Observation"), ("po", "COC", "Condition")]


@dataclass(frozen=True)
class Seen:
    """A complete response received from the server before it was killed."""

    round: int
    alias: str
    path: str
    status: int
    request_id: str | None
    matches: int                   # entries with search.mode == "match" (0 when not a Bundle)


def _matches(r: httpx.Response) -> int:
    if r.status_code != 200:
        return 0
    try:
        body = r.json()
    except ValueError:
        return 0
    return sum(1 for e in body.get("entry") or [] if (e.get("search") or {}).get("mode") == "match")


def _serve(tmp: Path, env: dict[str, str], port: int, round_no: int) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"serve-{round_no}.log"
    with log.open("wb") as err:   # a file, not a pipe: a chatty server can never block on a full pipe
        process = subprocess.Popen([sys.executable, "-m", "broker.cli", "serve", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=err)
    return process, log


async def _wait_ready(client: httpx.AsyncClient, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"broker exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if (await client.get("/healthz", timeout=5)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"broker did not start within {STARTUP_TIMEOUT}s: {log.read_text()[-3000:]}")


async def _round(round_no: int, tmp: Path, env: dict[str, str], tokens: dict[str, str],
                 rng: random.Random, seen: list[Seen]) -> dict[str, object]:
    """Start a server, warm it up, load it, SIGKILL it; record every complete response."""
    port = free_port()
    process, log = _serve(tmp, env, port, round_no)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=REQUEST_TIMEOUT)
    killed = asyncio.Event()
    stats: dict[str, object] = {"port": port, "transport_errors": 0}

    async def fetch(alias: str, purpose: str, rtype: str) -> None:
        path = f"/mdts/mdt-alpha/fhir/{rtype}"
        r = await client.get(path, headers={"Authorization": f"Bearer {tokens[alias]}",
                                            "X-Purpose-Of-Use": purpose})
        seen.append(Seen(round_no, alias, path, r.status_code, r.headers.get("x-request-id"), _matches(r)))

    async def worker(i: int) -> None:
        mine = random.Random(rng.random())
        while not killed.is_set():
            try:
                await fetch(*mine.choice(MIX))
            except httpx.TransportError:
                stats["transport_errors"] = int(stats["transport_errors"]) + 1  # type: ignore[call-overload]
                if killed.is_set():
                    return
                await asyncio.sleep(0.05)

    try:
        await _wait_ready(client, process, log)
        # one request before the load: the restarted server serves (and audits) after the last crash
        await fetch("mh", "TREAT", "Observation")
        delay = rng.uniform(*KILL_AFTER)
        stats["kill_after"] = round(delay, 3)
        tasks = [asyncio.create_task(worker(i)) for i in range(CLIENTS)]
        await asyncio.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        killed.set()
        # every worker ends: in-flight requests fail on the dead socket, new ones are refused
        done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 10)
        for t in pending:
            t.cancel()
        assert not pending, "load workers did not stop after the kill"
        for t in done:
            t.result()
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        await client.aclose()
    stats["responses"] = sum(1 for s in seen if s.round == round_no)
    return stats


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_sigkill_under_load_leaves_the_audit_chain_whole(request, backend, tmp_path, fhir_server):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    started = time.monotonic()

    harness = await start_broker(tmp_path, url, fhir_server.base_url)
    try:
        tokens = {alias: await harness.token(alias) for alias in ("mh", "po")}
        settings = harness.runtime.settings
    finally:
        await harness.aclose()   # nothing in this process touches the database while servers run
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump({"sources": [s.model_dump(mode="json") for s in settings.sources]}))
    env = {**os.environ, "BROKER_DATABASE_URL": url, "BROKER_PUBLIC_URL": settings.public_url,
           "BROKER_ISSUER": settings.issuer, "BROKER_SIGNING_KEY_FILE": str(settings.signing_key_file),
           "BROKER_SOURCES_FILE": str(sources), "BROKER_LOG_LEVEL": "WARNING"}

    engine = make_engine(url)
    with make_sessionmaker(engine)() as db:
        before = set(db.scalars(select(AuditEventRow.request_id)))   # seeding and token requests
    engine.dispose()

    seen: list[Seen] = []
    rounds = [await _round(n, tmp_path, env, tokens, rng, seen) for n in range(ROUNDS)]
    released = [s for s in seen if s.status == 200 and s.matches > 0]
    statuses = dict(Counter(s.status for s in seen))
    where = f"seed={seed} statuses={statuses} released={len(released)} rounds={rounds}"
    assert len(released) >= ROUNDS, where  # at least the warm-up request of each round carried data
    assert all(s.request_id for s in seen), where

    engine = make_engine(url)
    try:
        sessions = make_sessionmaker(engine)
        # (a) the chain survived three crashes: no half-written event, no gap, no fork
        report = verify_chain(sessions)
        assert report.ok, f"{report} {where}"
        with sessions() as db:
            rows = db.execute(select(AuditEventRow.seq, AuditEventRow.request_id, AuditEventRow.outcome,
                                    AuditEventRow.body)).all()
        assert report.count == len(rows), where
        # (c) every event that exists is whole
        bodies: dict[str, list[tuple[int, dict]]] = {}
        for seq, request_id, outcome, body in rows:
            try:
                parsed = json.loads(body)
            except ValueError:
                raise AssertionError(f"audit event {seq} has an unreadable body {where}") from None
            assert isinstance(parsed, dict), f"audit event {seq} body is not an object {where}"
            bodies.setdefault(request_id, []).append((outcome, parsed))
        known = {s.request_id for s in seen} | before
        unanswered = sum(1 for request_id in bodies if request_id not in known)
        print(f"\n[{backend}] {where} audit_events={len(rows)} audited_but_unanswered={unanswered} "
              f"elapsed={time.monotonic() - started:.1f}s")
        # (b) nothing was released that the audit trail does not show
        for s in released:
            events = bodies.get(s.request_id, [])
            assert len(events) == 1, f"{s}: {len(events)} audit events {where}"
            outcome, event = events[0]
            assert outcome == 200, f"{s}: audit outcome {outcome} {where}"
            assert event.get("outcome") == 200 and (event.get("released_count") or 0) > 0, f"{s}: {event} {where}"
    finally:
        engine.dispose()
