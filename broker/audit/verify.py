"""Recompute the audit hash chain from the stored bodies and report the first break."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import GENESIS_HASH, chain_hash, format_time
from broker.audit.sink import HEAD_ID
from broker.store.models import AuditEventRow, AuditHead

HASH_MISMATCH = "hash mismatch"
SEQUENCE_GAP = "sequence gap"
PREVIOUS_HASH_MISMATCH = "previous hash mismatch"
HEAD_MISMATCH = "head mismatch"
BODY_CHAIN_MISMATCH = "body sequence or previous hash disagrees with columns"
INDEX_MISMATCH = "index columns disagree with body"
BODY_UNREADABLE = "body is not a JSON object"

_COLUMNS = (AuditEventRow.seq, AuditEventRow.time, AuditEventRow.request_id, AuditEventRow.youth_id,
            AuditEventRow.mdt_id, AuditEventRow.actor_sub, AuditEventRow.actor_agency,
            AuditEventRow.actor_role, AuditEventRow.client_id, AuditEventRow.action,
            AuditEventRow.outcome, AuditEventRow.policy_version, AuditEventRow.body,
            AuditEventRow.prev_hash, AuditEventRow.hash)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of a verification; ``count`` is how many events checked out before first_bad_seq.

    ``first_bad_seq`` is the first sequence that is missing, altered or unexpected (for a
    head mismatch: the first sequence after the shorter of chain and head).
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    problem: str | None = None


class _Broken(Exception):
    """Internal: stops the walk at the first break."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


def verify_chain(sessions: sessionmaker[Session], *, from_seq: int = 1, batch: int = 1000) -> VerifyReport:
    """Walk the chain from ``from_seq`` in batches of ``batch`` rows, so memory stays flat.

    From sequence 1 the chain must start at the genesis hash; from a later sequence the
    stored previous hash of ``from_seq`` is trusted as the anchor. Each batch is its own
    short snapshot transaction, so appends are not held up for the length of a long walk;
    the head is compared with the rows read in the same snapshot. A database that cannot be
    read raises (SQLAlchemyError): that is not evidence of tampering.
    """
    if from_seq < 1 or batch < 1:
        raise ValueError("from_seq and batch must be positive")
    expected_seq = from_seq
    prev_hash: str | None = GENESIS_HASH if from_seq == 1 else None
    cursor: int | None = from_seq - 1 if from_seq > 1 else None
    count = 0
    try:
        while True:
            rows, head = _read_batch(sessions, cursor, batch)
            for row in rows:
                _check_row(row, expected_seq, prev_hash)
                count += 1
                expected_seq, prev_hash, cursor = row.seq + 1, row.hash, row.seq
            if len(rows) < batch:
                _check_head(head, last_seq=expected_seq - 1, last_hash=prev_hash, from_seq=from_seq)
                return VerifyReport(ok=True, count=count)
    except _Broken as broken:
        before = min(count, max(broken.seq - from_seq, 0))  # a head break can follow good rows
        return VerifyReport(ok=False, count=before, first_bad_seq=broken.seq, problem=broken.problem)


def format_report(report: VerifyReport) -> str:
    """One line for the CLI and the /audit/verify endpoint."""
    if report.ok:
        return f"OK: {report.count} events verified"
    return f"BROKEN at sequence {report.first_bad_seq}: {report.problem}"


def _read_batch(sessions: sessionmaker[Session], cursor: int | None,
                batch: int) -> tuple[list[Any], tuple[int, str] | None]:
    """Rows after ``cursor`` and the head, read in one snapshot."""
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        query = select(*_COLUMNS).order_by(AuditEventRow.seq).limit(batch)
        if cursor is not None:
            query = query.where(AuditEventRow.seq > cursor)
        rows = list(session.execute(query))
        head = session.execute(select(AuditHead.seq, AuditHead.hash)
                               .where(AuditHead.id == HEAD_ID)).one_or_none()
        session.rollback()
    return rows, (None if head is None else (int(head.seq), str(head.hash)))


def _check_row(row: Any, expected_seq: int, prev_hash: str | None) -> None:
    """Continuity, then the hash itself, then that body and columns tell the same story."""
    if row.seq != expected_seq:
        raise _Broken(min(row.seq, expected_seq), SEQUENCE_GAP)
    if prev_hash is not None and row.prev_hash != prev_hash:
        raise _Broken(row.seq, PREVIOUS_HASH_MISMATCH)
    if chain_hash(row.prev_hash, row.body.encode("utf-8")) != row.hash:
        raise _Broken(row.seq, HASH_MISMATCH)
    try:
        body = json.loads(row.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _Broken(row.seq, BODY_UNREADABLE)
    if body.get("sequence") != row.seq or body.get("previous_hash") != row.prev_hash:
        raise _Broken(row.seq, BODY_CHAIN_MISMATCH)
    if _columns_from_body(body) != _columns_from_row(row):
        raise _Broken(row.seq, INDEX_MISMATCH)


def _columns_from_body(body: dict[str, Any]) -> tuple[Any, ...]:
    """What the indexed columns should hold, read from the hashed body (the authority)."""
    actor = body.get("actor") or {}
    if not isinstance(actor, dict):
        actor = {}
    return (body.get("time"), body.get("request_id"), body.get("youth_id"), body.get("mdt_id"),
            actor.get("sub"), actor.get("agency"), actor.get("role"), body.get("client_id"),
            body.get("action"), body.get("outcome"), body.get("policy_version"))


def _columns_from_row(row: Any) -> tuple[Any, ...]:
    """The indexed columns in the body's terms, so that a search cannot be steered by an edit."""
    when: datetime = row.time
    if when.tzinfo is None:  # SQLite hands back the stored UTC wall time without a zone
        when = when.replace(tzinfo=UTC)
    return (format_time(when), row.request_id, row.youth_id, row.mdt_id, row.actor_sub,
            row.actor_agency, row.actor_role, row.client_id, row.action, row.outcome,
            row.policy_version)


def _check_head(head: tuple[int, str] | None, *, last_seq: int, last_hash: str | None,
                from_seq: int) -> None:
    """The head must name exactly the last event: a truncated or extended chain shows here."""
    head_seq, head_hash = head if head is not None else (0, GENESIS_HASH)
    if last_hash is None:  # started after sequence 1 and found nothing there
        if head_seq >= from_seq:
            raise _Broken(from_seq, HEAD_MISMATCH)
        return
    if head_seq != last_seq:
        raise _Broken(min(head_seq, last_seq) + 1, HEAD_MISMATCH)
    if head_hash != last_hash:
        raise _Broken(head_seq, HEAD_MISMATCH)
