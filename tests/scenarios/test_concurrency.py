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
