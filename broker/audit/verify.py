"""Recompute the audit hash chain, check the signed checkpoints, and report the first break.

The report names the kind of tampering where the evidence allows it: ``edited`` (an event or
its link changed in place), ``deleted`` (a gap), ``inserted`` (an event that was never
appended), ``reordered`` (events swapped), ``truncated`` (the tail is gone), ``rewritten`` (a
consistent chain that no longer matches what the broker signed) and ``unsigned-checkpoint``
(a checkpoint no known key vouches for).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import GENESIS_HASH, chain_hash, format_time
from broker.audit.checkpoint import public_keys_by_id, verify_checkpoint_signature
from broker.audit.sink import HEAD_ID
from broker.store.models import AuditArchive, AuditCheckpoint, AuditEventRow, AuditHead

HASH_MISMATCH = "hash mismatch"
SEQUENCE_GAP = "sequence gap"
PREVIOUS_HASH_MISMATCH = "previous hash mismatch"
HEAD_MISMATCH = "head mismatch"
BODY_CHAIN_MISMATCH = "body sequence or previous hash disagrees with columns"
INDEX_MISMATCH = "index columns disagree with body"
BODY_UNREADABLE = "body is not a JSON object"
CHECKPOINT_MISMATCH = "checkpoint mismatch"
CHECKPOINT_BAD_SIGNATURE = "checkpoint signature invalid"
CHECKPOINT_UNKNOWN_KEY = "checkpoint signed by an unknown key"
CHECKPOINT_PAST_END = "checkpoint beyond the end of the chain"
ARCHIVE_MISMATCH = "archive records are not contiguous"

EDITED, DELETED, INSERTED, REORDERED = "edited", "deleted", "inserted", "reordered"
TRUNCATED, REWRITTEN, UNSIGNED = "truncated", "rewritten", "unsigned-checkpoint"
KINDS = (EDITED, DELETED, INSERTED, REORDERED, TRUNCATED, REWRITTEN, UNSIGNED)

_COLUMNS = (AuditEventRow.seq, AuditEventRow.time, AuditEventRow.request_id, AuditEventRow.youth_id,
            AuditEventRow.mdt_id, AuditEventRow.actor_sub, AuditEventRow.actor_agency,
            AuditEventRow.actor_role, AuditEventRow.client_id, AuditEventRow.action,
            AuditEventRow.outcome, AuditEventRow.policy_version, AuditEventRow.body,
            AuditEventRow.prev_hash, AuditEventRow.hash)
_CHECKPOINT_COLUMNS = (AuditCheckpoint.id, AuditCheckpoint.seq, AuditCheckpoint.head_hash, AuditCheckpoint.time,
                       AuditCheckpoint.key_id, AuditCheckpoint.signature)


# The walk reads rows through this query, whose columns are already in the body's terms (the
# time as the canonical text, the body as UTF-8 bytes where the driver hands them over cheaply), so that a row that checks
# out costs a hash, an orjson parse and a tuple comparison. Any row that does not check out is
# re-read through the ORM and judged by _check_row, which names the break.
_FAST_COLUMNS = ("seq, {time}, request_id, youth_id, mdt_id, actor_sub, actor_agency, actor_role, client_id, "
                 "action, outcome, policy_version, {body}, prev_hash, hash")
_FAST_SQL = {
    # SQLAlchemy stores a SQLite DATETIME as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC wall time).
    "sqlite": _FAST_COLUMNS.format(time="replace(time, ' ', 'T') || 'Z'", body="CAST(body AS BLOB)"),
    "postgresql": _FAST_COLUMNS.format(time="to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                                       body="body"),  # bytea would arrive hex-escaped: twice the bytes
}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of a verification; ``count`` is how many events checked out before first_bad_seq.

    ``first_bad_seq`` is the first sequence that is missing, altered or unexpected (for a
    head mismatch: the first sequence after the shorter of chain and head). The fields after
    ``problem`` explain rather than decide, so they take no part in equality.
    """

    ok: bool
    count: int
    first_bad_seq: int | None = None
    problem: str | None = None
    kind: str | None = field(default=None, compare=False)
    detail: str | None = field(default=None, compare=False)
    checkpoints: int = field(default=0, compare=False)
    """Checkpoints compared with the chain (signatures too when a public key was given)."""
    signed_through: int | None = field(default=None, compare=False)
    """Highest sequence covered by a checkpoint whose signature verified; None without a key."""
    first_seq: int | None = field(default=None, compare=False)
    """Where the walk started (after archived events)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the API and the CLI."""
        return asdict(self)


class _Broken(Exception):
    """Internal: stops the walk at the first break."""

    def __init__(self, seq: int, problem: str, kind: str | None = None, detail: str | None = None) -> None:
        super().__init__(problem)
        self.seq, self.problem, self.kind, self.detail = seq, problem, kind, detail


@dataclass
class _Walk:
    """Mutable progress of one walk."""

    expected_seq: int
    prev_hash: str | None
    cursor: int | None
    start: int
    prev_prev_hash: str | None = None
    count: int = 0
    checkpoints: int = 0
    signed_through: int | None = None


def verify_chain(sessions: sessionmaker[Session], *, from_seq: int = 1, batch: int = 1000,
                 public_key: Any = None) -> VerifyReport:
    """Walk the chain from ``from_seq`` in batches of ``batch`` rows, so memory stays flat.

    From sequence 1 the chain must start at the genesis hash, or, once events were archived,
    at the latest archive's last hash (itself vouched for by its signed checkpoint); from a
    later sequence the stored previous hash of ``from_seq`` is trusted as the anchor. Every
    checkpoint in range must name a (seq, hash) of the chain; with ``public_key`` (one Ed25519
    public key or several) each signature is checked too. Each batch is its own short snapshot
    transaction, so appends are not held up for the length of a long walk. A database that
    cannot be read raises (SQLAlchemyError): that is not evidence of tampering.
    """
    if from_seq < 1 or batch < 1:
        raise ValueError("from_seq and batch must be positive")
    keys = public_keys_by_id(public_key)
    walk = _Walk(expected_seq=from_seq, prev_hash=GENESIS_HASH if from_seq == 1 else None,
                 cursor=from_seq - 1 if from_seq > 1 else None, start=from_seq)
    try:
        _anchor_on_archives(sessions, walk, keys)
        while True:
            rows, head, checkpoints = _read_batch(sessions, walk.cursor, batch)
            at_seq = _by_seq(checkpoints)
            for row in rows:
                seq, row_hash = row[0], row[-1]
                if not _row_checks_out(row, walk.expected_seq, walk.prev_hash):
                    _check_row(sessions, _orm_row(sessions, seq), walk)
                walk.count += 1
                walk.prev_prev_hash = walk.prev_hash
                walk.expected_seq, walk.prev_hash, walk.cursor = seq + 1, row_hash, seq
                if at_seq:
                    for cp in at_seq.pop(seq, ()):
                        _check_checkpoint(cp, row_hash, keys, walk)
            if len(rows) < batch:
                _check_head(head, last_seq=walk.expected_seq - 1, last_hash=walk.prev_hash, from_seq=walk.start)
                if at_seq:
                    seq = min(at_seq)
                    raise _Broken(walk.expected_seq, CHECKPOINT_PAST_END, TRUNCATED,
                                  f"a checkpoint signed sequence {seq}; the chain ends at {walk.expected_seq - 1}")
                return VerifyReport(ok=True, count=walk.count, checkpoints=walk.checkpoints,
                                    signed_through=walk.signed_through, first_seq=walk.start)
    except _Broken as broken:
        before = min(walk.count, max(broken.seq - walk.start, 0))  # a head break can follow good rows
        return VerifyReport(ok=False, count=before, first_bad_seq=broken.seq, problem=broken.problem,
                            kind=broken.kind, detail=broken.detail, checkpoints=walk.checkpoints,
                            signed_through=walk.signed_through, first_seq=walk.start)


def format_report(report: VerifyReport) -> str:
    """One line for the CLI and the /audit/verify endpoint."""
    if report.ok:
        text = f"OK: {report.count} events verified"
        if report.signed_through is not None:
            text += f"; signed through sequence {report.signed_through}"
        return text
    text = f"BROKEN at sequence {report.first_bad_seq}: {report.problem}"
    if report.kind:
        text += f" ({report.kind}" + (f": {report.detail})" if report.detail else ")")
    return text


def _anchor_on_archives(sessions: sessionmaker[Session], walk: _Walk, keys: dict[str, Any]) -> None:
    """Start after the archived events, if any, trusting only a contiguous, checkpointed archive run."""
    with sessions() as session:
        archives = list(session.execute(select(AuditArchive.first_seq, AuditArchive.last_seq,
                                               AuditArchive.first_prev_hash, AuditArchive.last_hash,
                                               AuditArchive.checkpoint_id).order_by(AuditArchive.first_seq)))
        if not archives:
            return
        latest = archives[-1]
        cp = session.execute(select(*_CHECKPOINT_COLUMNS).where(AuditCheckpoint.id == latest.checkpoint_id)).one()
        session.rollback()
    expected_seq, expected_prev = 1, GENESIS_HASH
    for a in archives:
        if a.first_seq != expected_seq or a.first_prev_hash != expected_prev or a.last_seq < a.first_seq:
            raise _Broken(expected_seq, ARCHIVE_MISMATCH, DELETED,
                          f"no archive continues the chain at sequence {expected_seq}")
        expected_seq, expected_prev = a.last_seq + 1, a.last_hash
    if walk.start > latest.last_seq + 1:
        return  # the caller's own anchor lies in the live chain
    if cp.seq != latest.last_seq:
        raise _Broken(latest.last_seq, CHECKPOINT_MISMATCH, REWRITTEN,
                      "the archive's checkpoint names another sequence")
    _check_checkpoint(cp, latest.last_hash, keys, walk)
    walk.expected_seq = walk.start = latest.last_seq + 1
    walk.prev_hash, walk.cursor = latest.last_hash, latest.last_seq


def _read_batch(sessions: sessionmaker[Session], cursor: int | None,
                batch: int) -> tuple[list[Any], tuple[int, str] | None, list[Any]]:
    """Rows after ``cursor``, the head and the checkpoints over those rows, read in one snapshot.

    For the last (short) batch every later checkpoint is returned, so one that signed an
    event the chain no longer holds shows up.
    """
    with sessions() as session:
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        columns = _FAST_SQL.get(dialect)
        if columns is None:
            raise ValueError(f"audit verification does not support {dialect}")
        rows = session.execute(text(f"SELECT {columns} FROM audit_events WHERE seq > :cursor "
                                    "ORDER BY seq LIMIT :batch"),
                               {"cursor": -1 if cursor is None else cursor, "batch": batch}).all()
        head = session.execute(select(AuditHead.seq, AuditHead.hash)
                               .where(AuditHead.id == HEAD_ID)).one_or_none()
        cps = select(*_CHECKPOINT_COLUMNS).order_by(AuditCheckpoint.seq, AuditCheckpoint.id)
        if cursor is not None:
            cps = cps.where(AuditCheckpoint.seq > cursor)
        if len(rows) == batch:
            cps = cps.where(AuditCheckpoint.seq <= rows[-1][0])
        checkpoints = list(session.execute(cps))
        session.rollback()
    return rows, (None if head is None else (int(head.seq), str(head.hash))), checkpoints


def _by_seq(checkpoints: list[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for cp in checkpoints:
        out.setdefault(int(cp.seq), []).append(cp)
    return out


def _check_checkpoint(cp: Any, chain_hash_at_seq: str, keys: dict[str, Any], walk: _Walk) -> None:
    """The signature (when we hold a key) and the signed hash must both match the chain."""
    walk.checkpoints += 1
    if keys:
        key = keys.get(cp.key_id)
        if key is None:
            raise _Broken(cp.seq, CHECKPOINT_UNKNOWN_KEY, UNSIGNED,
                          f"checkpoint {cp.id} names key {cp.key_id}, which is not a trusted checkpoint key")
        if not verify_checkpoint_signature(cp, key):
            raise _Broken(cp.seq, CHECKPOINT_BAD_SIGNATURE, REWRITTEN,
                          f"checkpoint {cp.id} was altered or forged without the key")
    if cp.head_hash != chain_hash_at_seq:
        raise _Broken(cp.seq, CHECKPOINT_MISMATCH, REWRITTEN,
                      f"checkpoint {cp.id} signed another hash for this sequence: the chain up to it was rewritten")
    if keys:
        walk.signed_through = max(walk.signed_through or 0, int(cp.seq))


_BODY_FIELDS = itemgetter("sequence", "previous_hash", "time", "request_id", "youth_id", "mdt_id", "client_id",
                          "action", "outcome", "policy_version")
_ACTOR_FIELDS = itemgetter("sub", "agency", "role")


def _row_checks_out(row: Any, expected_seq: int, prev_hash: str | None) -> bool:
    """The common case, fast: in sequence, linked, hash right, body and columns agree.

    False means "look closer", never "broken": _check_row decides and names the break.
    """
    (seq, time_text, request_id, youth_id, mdt_id, actor_sub, actor_agency, actor_role, client_id,
     action, outcome, policy_version, body_bytes, row_prev, row_hash) = row
    if seq != expected_seq or (prev_hash is not None and row_prev != prev_hash):
        return False
    if type(body_bytes) is str:
        body_bytes = body_bytes.encode("utf-8")
    if hashlib.sha256(row_prev.encode("ascii") + b"\n" + body_bytes).hexdigest() != row_hash:
        return False
    try:
        body = orjson.loads(body_bytes)
    except orjson.JSONDecodeError:
        return False
    try:
        body_seq, *indexed = _BODY_FIELDS(body)
        actor = _ACTOR_FIELDS(body["actor"])
    except (KeyError, TypeError):  # a field missing is for _check_row to judge
        return False
    return (type(body_seq) is int and body_seq == seq
            and indexed == [row_prev, time_text, request_id, youth_id, mdt_id, client_id, action, outcome,
                            policy_version]
            and actor == (actor_sub, actor_agency, actor_role))


def _orm_row(sessions: sessionmaker[Session], seq: int) -> Any:
    """One row as the ORM reads it, for the careful check."""
    with sessions() as session:
        row = session.execute(select(*_COLUMNS).where(AuditEventRow.seq == seq)).one()
        session.rollback()
    return row


def _check_row(sessions: sessionmaker[Session], row: Any, walk: _Walk) -> None:
    """Continuity, then the hash itself, then that body and columns tell the same story."""
    expected_seq, prev_hash = walk.expected_seq, walk.prev_hash
    if row.seq != expected_seq:
        if row.seq > expected_seq:
            missing = f"{expected_seq}" if row.seq == expected_seq + 1 else f"{expected_seq}..{row.seq - 1}"
            raise _Broken(expected_seq, SEQUENCE_GAP, DELETED, f"event(s) {missing} are missing")
        raise _Broken(row.seq, SEQUENCE_GAP, INSERTED, f"event {row.seq} lies outside the chain")
    body = _parse(row.body)
    body_seq = body.get("sequence") if body is not None else None
    if prev_hash is not None and row.prev_hash != prev_hash:
        raise _Broken(row.seq, PREVIOUS_HASH_MISMATCH, *_classify_link(sessions, row, body, walk))
    if chain_hash(row.prev_hash, row.body.encode("utf-8")) != row.hash:
        if isinstance(body_seq, int) and body_seq != row.seq:
            raise _Broken(row.seq, HASH_MISMATCH, REORDERED,
                          f"the body stored at {row.seq} is event {body_seq}'s")
        raise _Broken(row.seq, HASH_MISMATCH, EDITED, f"event {row.seq} was changed after it was chained")
    if body is None:
        raise _Broken(row.seq, BODY_UNREADABLE, EDITED, f"event {row.seq} was replaced by unreadable text")
    if body_seq != row.seq or body.get("previous_hash") != row.prev_hash:
        kind = REORDERED if _body_seq_at(sessions, body_seq) == row.seq else EDITED
        raise _Broken(row.seq, BODY_CHAIN_MISMATCH, kind, f"event {row.seq}'s body names sequence {body_seq}")
    if _columns_from_body(body) != _columns_from_row(row):
        raise _Broken(row.seq, INDEX_MISMATCH, EDITED, f"a searchable column of event {row.seq} was changed")


def _classify_link(sessions: sessionmaker[Session], row: Any, body: dict[str, Any] | None,
                   walk: _Walk) -> tuple[str, str]:
    """Why event N no longer links to event N-1: read from N's own body and a lookup or two."""
    n = row.seq
    body_seq = body.get("sequence") if body is not None else None
    if isinstance(body_seq, int) and body_seq < n:
        return INSERTED, f"event {n} was appended as {body_seq}: {n - body_seq} forged event(s) at {body_seq}..{n - 1}"
    if isinstance(body_seq, int) and body_seq > n:
        if _body_seq_at(sessions, body_seq) == n:
            return REORDERED, f"events {n} and {body_seq} were swapped"
        return DELETED, f"event {n} was appended as {body_seq}: events were removed and the rest renumbered"
    if body is not None and body.get("previous_hash") == walk.prev_hash:
        return EDITED, f"event {n}'s previous-hash column was changed"
    if walk.prev_prev_hash is not None and row.prev_hash == walk.prev_prev_hash:
        return INSERTED, f"event {n} links to event {n - 2}: event {n - 1} was inserted"
    return EDITED, f"event {n - 1} was altered or replaced and re-hashed; event {n} still links to the original"


def _body_seq_at(sessions: sessionmaker[Session], seq: Any) -> int | None:
    """The sequence the body stored at column ``seq`` claims (only read once, to name a break)."""
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None
    with sessions() as session:
        text = session.execute(select(AuditEventRow.body).where(AuditEventRow.seq == seq)).scalar_one_or_none()
        session.rollback()
    body = _parse(text) if text is not None else None
    value = body.get("sequence") if body is not None else None
    return value if isinstance(value, int) else None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


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
            raise _Broken(from_seq, HEAD_MISMATCH, TRUNCATED, f"the head names {head_seq}; the chain ends earlier")
        return
    if head is None and last_seq >= from_seq:
        raise _Broken(min(head_seq, last_seq) + 1, HEAD_MISMATCH, EDITED, "the chain head row is missing")
    if head_seq < last_seq:
        raise _Broken(head_seq + 1, HEAD_MISMATCH, INSERTED, f"events after the head ({head_seq}) were added")
    if head_seq > last_seq:
        raise _Broken(last_seq + 1, HEAD_MISMATCH, TRUNCATED,
                      f"the head names {head_seq}; the chain ends at {last_seq}")
    if head_hash != last_hash:
        raise _Broken(head_seq, HEAD_MISMATCH, EDITED, f"the head's hash is not event {head_seq}'s")
