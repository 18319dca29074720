"""A policy reloaded under load: no 5xx, no request mixing versions, refusals leave the good policy."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import select

from broker.policy.reload import PolicyReloader
from broker.store.models import AuditEventRow
from tests.policy.copies import MH_TREAT_ALLOW, UNKNOWN_ROLE_LINE, append_line, copy_policies, remove_line
from tests.scenarios.harness import start_broker

RUN_SECONDS = 3.0
WORKERS = (("mh", "TREAT"), ("po", "COC"), ("mh", "TREAT"), ("cw", "COC"))


async def test_reload_under_load(tmp_path, fhir_server) -> None:
    """Four clients keep asking while a valid edit goes in and an invalid one is refused."""
    policies = copy_policies(tmp_path / "policies")
    b = await start_broker(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite'}", fhir_server.base_url,
                           policy_dir=policies)
    try:
        loop = asyncio.get_running_loop()
        tokens = {alias: await b.token(alias) for alias, _ in WORKERS}
        old_engine = b.runtime.policy
        reloader = PolicyReloader(b.runtime, policy_dir=policies)
        seen: list[tuple[str, str, float, float, int, int, str]] = []
        stop = loop.time() + RUN_SECONDS
        done = asyncio.Event()  # set once both edits are through, so a slow reload still sees traffic after it

        async def client(alias: str, purpose: str) -> None:
            while loop.time() < stop or not done.is_set():
                started = loop.time()
                r = await b.get("/mdts/mdt-alpha/fhir/Condition", token=tokens[alias], purpose=purpose)
                entries = len(r.json().get("entry") or []) if r.status_code == 200 else -1
                seen.append((alias, purpose, started, loop.time(), r.status_code, entries, r.headers["x-request-id"]))

        workers = [asyncio.create_task(client(a, p)) for a, p in WORKERS]
        await asyncio.sleep(0.8)
        while sum(1 for x in seen if x[0] == "mh") < 4:  # some clinician requests answered under the old policy
            await asyncio.sleep(0.05)
        with b.runtime.sessions() as s:
            head_before = s.scalar(select(AuditEventRow.seq).order_by(AuditEventRow.seq.desc()).limit(1)) or 0
        reload_started = loop.time()
        remove_line(policies, MH_TREAT_ALLOW)
        valid = await reloader.areload("test")
        swapped_at = loop.time()
        new_engine = b.runtime.policy
        await asyncio.sleep(0.5)
        append_line(policies, UNKNOWN_ROLE_LINE)
        invalid = await reloader.areload("test")
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*workers)

        assert valid.accepted and new_engine.version == valid.version != old_engine.version
        assert not invalid.accepted and "unknown role" in invalid.errors[0]
        assert b.runtime.policy is new_engine
        assert seen and all(status < 500 for *_x, status, _e, _id in seen)
        mh = [x for x in seen if x[0] == "mh"]
        before = [x for x in mh if x[3] < reload_started]  # answered before the reload began
        after = [x for x in mh if x[2] > swapped_at]
        assert before and after, (len(before), len(after))
        assert all(x[4] == 200 and x[5] > 0 for x in before), "general health was released before the edit"
        assert all(x[4] == 200 and x[5] == 0 for x in after), "and never after it"
        others = [x for x in seen if x[0] != "mh"]
        assert {x[5] for x in others if x[2] > swapped_at} == {x[5] for x in others if x[3] < swapped_at}

        with b.runtime.sessions() as s:
            rows = list(s.execute(select(AuditEventRow.seq, AuditEventRow.request_id, AuditEventRow.body)
                                  .order_by(AuditEventRow.seq)))
        engines = {old_engine.version: old_engine, new_engine.version: new_engine}
        by_request = {}
        for seq, request_id, body in rows:
            event = json.loads(body)
            by_request[request_id] = event["policy_version"]
            assert event["policy_version"] in engines, seq
            if seq <= head_before:
                assert event["policy_version"] == old_engine.version, seq
            engine = engines[event["policy_version"]]
            for d in event["decisions"]:
                replay = engine.decide(role=event["actor"]["role"], category=d["category"],
                                       purpose=event["purpose"], grounds=frozenset(d["grounds_evaluated"]))
                assert (replay.effect, list(replay.rule) if replay.rule else None) == (d["effect"], d["rule"]), seq
        assert all(by_request[x[6]] == new_engine.version for x in seen if x[2] > swapped_at)
        assert {v for v in by_request.values()} == set(engines)
    finally:
        await b.aclose()
