"""200 concurrent requests leave one unforked, verifiable audit chain on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from broker.audit.verify import verify_chain
from broker.store.models import AuditEventRow


async def test_chain_verifies_after_200_concurrent_requests(fresh_broker):
    b = fresh_broker
    tokens = {alias: await b.token(alias) for alias in ("mh", "po", "da", "cw")}
    purposes = {"mh": "TREAT", "po": "COC", "da": "TREAT", "cw": "COC"}
    aliases = list(tokens)

    async def one(i: int) -> int:
        alias = aliases[i % len(aliases)]
        r = await b.get("/mdts/mdt-alpha/fhir/Condition", token=tokens[alias], purpose=purposes[alias])
        return r.status_code

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses.count(200) == 150 and statuses.count(403) == 50
    report = verify_chain(b.runtime.sessions)
    assert report.ok, report
    with b.runtime.sessions() as s:
        count = s.scalar(select(func.count()).select_from(AuditEventRow))
        seqs = list(s.scalars(select(AuditEventRow.seq).order_by(AuditEventRow.seq)))
    assert count == report.count == len(tokens) + 200  # one oauth.token event per token, then the 200
    assert seqs == list(range(1, count + 1))


async def test_concurrent_requests_stay_within_the_connection_pool(fresh_broker):
    """Context reads wait for a worker slot rather than for a connection: a burst of 64 requests
    opens no connection beyond the pool's own (an overflow connection is closed again on return,
    so each one opened under load was a connect paid per request) and checks out at most the
    pool's size plus the audit writer's."""
    from sqlalchemy import event

    b = fresh_broker
    engine = b.runtime.engine
    token = await b.token("mh")
    opened, out, most = [0], [0], [0]

    def on_connect(*_a):
        opened[0] += 1

    def on_checkout(*_a):
        out[0] += 1
        most[0] = max(most[0], out[0])

    def on_checkin(*_a):
        out[0] -= 1

    for name, fn in (("connect", on_connect), ("checkout", on_checkout), ("checkin", on_checkin)):
        event.listen(engine, name, fn)
    try:
        statuses = await asyncio.gather(*(b.get("/mdts/mdt-alpha/fhir/Condition", token=token, purpose="TREAT")
                                          for _ in range(64)))
    finally:
        for name, fn in (("connect", on_connect), ("checkout", on_checkout), ("checkin", on_checkin)):
            event.remove(engine, name, fn)
    assert [r.status_code for r in statuses] == [200] * 64
    size = engine.pool.size()
    assert most[0] <= size + 1, (most[0], size)
    assert engine.pool.checkedin() + engine.pool.checkedout() <= size + 1
    assert opened[0] <= size + 1, opened[0]
