"""Write long valid chains straight into the tables: the sink is too slow for tens of thousands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import insert

from broker.audit import GENESIS_HASH, canonical_json, chain_hash
from broker.audit.sink import index_columns
from broker.store.models import AuditEventRow, AuditHead

from .events import make_event


def bulk_chain(engine, n: int, event: Callable[[int], dict[str, Any]] = make_event, *, chunk: int = 2000) -> str:
    """Append n chained events (sequence 1..n) and the head; returns the head hash."""
    prev = GENESIS_HASH
    with engine.begin() as conn:
        rows = []
        for seq in range(1, n + 1):
            record = event(seq) | {"sequence": seq, "previous_hash": prev}
            body = canonical_json(record)
            digest = chain_hash(prev, body)
            rows.append({"seq": seq, "body": body.decode(), "prev_hash": prev, "hash": digest,
                         **index_columns(record)})
            prev = digest
            if len(rows) == chunk:
                conn.execute(insert(AuditEventRow), rows)
                rows = []
        if rows:
            conn.execute(insert(AuditEventRow), rows)
        conn.execute(insert(AuditHead).values(id=1, seq=n, hash=prev))
    return prev
