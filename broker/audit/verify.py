"""Recompute the audit hash chain, check the signed checkpoints, and report the first break.

The report names the kind of tampering where the evidence allows it: ``edited`` (an event or
its link changed in place), ``deleted`` (a gap), ``inserted`` (an event that was never
appended), ``reordered`` (events swapped), ``truncated`` (the tail is gone), ``rewritten`` (a
consistent chain that no longer matches what the broker signed) and ``unsigned-checkpoint``
(a checkpoint no known key vouches for).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from broker.audit import verify_worker
from broker.audit.canonical import GENESIS_HASH, chain_hash, format_time
from broker.audit.checkpoint import public_keys_by_id, verify_checkpoint_signature
from broker.audit.sink import HEAD_ID
from broker.audit.verify_worker import HASH, SEQ, scan
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


# The walk reads rows through verify_worker.COLUMNS, whose columns are already in the body's terms
# (the time as the canonical text, the body as UTF-8 bytes where the driver hands them over
# cheaply), so that a row that checks out costs a hash, an orjson parse and two tuple comparisons
# (verify_worker.scan). Any row that does not check out is re-read through the ORM and judged
# by _check_row, which names the break.

PARALLEL_MIN = 50_000
"""From this many events on, verify_chain also walks in helper processes (a spawned one takes ~0.1-0.3 s to start)."""
MAX_WORKERS = 4
"""Processes (this one included) a walk uses at most when ``workers`` is not given."""
_PARALLEL_WALK = threading.Lock()
_parent_takes_chunks = True  # tests set False so that every range goes through a helper process
_helper_start = "auto"
"""How helpers start: "spawn" runs a fresh interpreter (~0.1 s with SQLite, ~0.3 s with psycopg to
import); "fork" forks this process (PostgreSQL only: an SQLite connection must not be opened in a
forked child of a process that has the same file open); "auto" forks for PostgreSQL when this
process runs no other thread (the CLI), else spawns (a server)."""


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
                 public_key: Any = None, workers: int | None = None, parallel_min: int = PARALLEL_MIN,
                 chunk: int | None = None) -> VerifyReport:
    """Walk the chain from ``from_seq`` in batches of ``batch`` rows, so memory stays flat.

    From sequence 1 the chain must start at the genesis hash, or, once events were archived,
    at the latest archive's last hash (itself vouched for by its signed checkpoint); from a
    later sequence the stored previous hash of ``from_seq`` is trusted as the anchor. Every
    checkpoint in range must name a (seq, hash) of the chain; with ``public_key`` (one Ed25519
    public key or several) each signature is checked too. Each batch is its own short snapshot
    transaction, so appends are not held up for the length of a long walk. A database that
    cannot be read raises (SQLAlchemyError): that is not evidence of tampering.

    A chain of ``parallel_min`` events or more (on a database file or server another process
    can open) is split into ranges of ``chunk`` events (default: sized from the chain), which
    this process and ``workers - 1`` helper processes (default: the usable CPUs, at most
    MAX_WORKERS) check side by side; this process then checks that the ranges link up, and
    the checkpoints. Should any range not check out, the walk continues serially from the start
    of the first such range, so the report is exactly the serial walk's.
    """
    if from_seq < 1 or batch < 1:
        raise ValueError("from_seq and batch must be positive")
    if (workers is not None and workers < 1) or parallel_min < 1 or (chunk is not None and chunk < 1):
        raise ValueError("workers, parallel_min and chunk must be positive")
    keys = public_keys_by_id(public_key)
    walk = _Walk(expected_seq=from_seq, prev_hash=GENESIS_HASH if from_seq == 1 else None,
                 cursor=from_seq - 1 if from_seq > 1 else None, start=from_seq)
    try:
        _anchor_on_archives(sessions, walk, keys)
        workers = _default_workers() if workers is None else workers
        # One parallel walk at a time per process: concurrent /audit/verify calls must not
        # multiply helper processes; a walk that finds another one running walks serially.
        if workers > 1 and _PARALLEL_WALK.acquire(blocking=False):
            try:
                _walk_in_parallel(sessions, walk, keys, batch=batch, workers=workers,
                                  parallel_min=parallel_min, chunk=chunk)
            finally:
                _PARALLEL_WALK.release()
        return _walk_serially(sessions, walk, keys, batch)
    except _Broken as broken:
        before = min(walk.count, max(broken.seq - walk.start, 0))  # a head break can follow good rows
        return VerifyReport(ok=False, count=before, first_bad_seq=broken.seq, problem=broken.problem,
                            kind=broken.kind, detail=broken.detail, checkpoints=walk.checkpoints,
                            signed_through=walk.signed_through, first_seq=walk.start)


def _walk_serially(sessions: sessionmaker[Session], walk: _Walk, keys: dict[str, Any], batch: int) -> VerifyReport:
    """From where ``walk`` stands to the head, in batches; raises _Broken at the first break."""
    while True:
        rows, head, checkpoints = _read_batch(sessions, walk.cursor, batch)
        at_seq = _by_seq(checkpoints)
        i, n = 0, len(rows)
        while i < n:
            j = scan(rows, i, walk.expected_seq, walk.prev_hash)  # rows[i:j] check out
            if j == i:
                _check_row(sessions, _orm_row(sessions, rows[i][SEQ]), walk)  # raises, or the row is fine after all
                j = i + 1
            _advance(walk, rows, i, j)
            if at_seq:
                _check_checkpoints_on(rows, i, j, at_seq, keys, walk)
            i = j
        if n < batch:
            _check_head(head, last_seq=walk.expected_seq - 1, last_hash=walk.prev_hash, from_seq=walk.start)
            if at_seq:
                seq = min(at_seq)
                raise _Broken(walk.expected_seq, CHECKPOINT_PAST_END, TRUNCATED,
                              f"a checkpoint signed sequence {seq}; the chain ends at {walk.expected_seq - 1}")
            return VerifyReport(ok=True, count=walk.count, checkpoints=walk.checkpoints,
                                signed_through=walk.signed_through, first_seq=walk.start)


def _advance(walk: _Walk, rows: list[Any], i: int, j: int) -> None:
    """Move the walk past rows[i:j], which were found good, as a row-by-row walk would have."""
    last = rows[j - 1]
    walk.count += j - i
    walk.prev_prev_hash = rows[j - 2][HASH] if j - i >= 2 else walk.prev_hash
    walk.expected_seq, walk.prev_hash, walk.cursor = last[SEQ] + 1, last[HASH], last[SEQ]


def _check_checkpoints_on(rows: list[Any], i: int, j: int, at_seq: dict[int, list[Any]], keys: dict[str, Any],
                          walk: _Walk) -> None:
    """The checkpoints that sign one of rows[i:j] (consecutive sequences), in sequence order."""
    lo, hi = rows[i][SEQ], rows[j - 1][SEQ]
    for seq in sorted(s for s in at_seq if lo <= s <= hi):
        row_hash = rows[i + seq - lo][HASH]
        for cp in at_seq.pop(seq):
            _check_checkpoint(cp, row_hash, keys, walk)


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
    """Rows after ``cursor`` (verify_worker.COLUMNS, as the driver's tuples), the head and the checkpoints
    over those rows, read in one snapshot.

    For the last (short) batch every later checkpoint is returned, so one that signed an
    event the chain no longer holds shows up.
    """
    with sessions() as session:
        dialect = session.get_bind().dialect
        if dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        columns = verify_worker.COLUMNS.get(dialect.name)
        if columns is None:
            raise ValueError(f"audit verification does not support {dialect.name}")
        result = session.connection().execute(
            text(f"SELECT {columns} FROM audit_events WHERE seq > :cursor ORDER BY seq LIMIT :batch"),
            {"cursor": -1 if cursor is None else cursor, "batch": batch})
        rows = _fetch_tuples(result, dialect)
        head = session.execute(select(AuditHead.seq, AuditHead.hash)
                               .where(AuditHead.id == HEAD_ID)).one_or_none()
        cps = select(*_CHECKPOINT_COLUMNS).order_by(AuditCheckpoint.seq, AuditCheckpoint.id)
        if cursor is not None:
            cps = cps.where(AuditCheckpoint.seq > cursor)
        if len(rows) == batch:
            cps = cps.where(AuditCheckpoint.seq <= rows[-1][SEQ])
        checkpoints = list(session.execute(cps))
        session.rollback()
    return rows, (None if head is None else (int(head.seq), str(head.hash))), checkpoints


def _fetch_tuples(result: Any, dialect: Any) -> list[Any]:
    """The driver's own row tuples (a SQLAlchemy Row costs ~1 µs more each); its errors still raise as SQLAlchemy's."""
    try:
        return result.cursor.fetchall()
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect) from exc
    finally:
        result.close()


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


# --- Long chains: ranges checked side by side in helper processes --------------------------------


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _walk_in_parallel(sessions: sessionmaker[Session], walk: _Walk, keys: dict[str, Any], *, batch: int,
                      workers: int, parallel_min: int, chunk: int | None) -> None:
    """Move ``walk`` as far as ranges checked in parallel take it; the serial walk does the rest.

    Each range must check out entirely (verify_worker.verify_range) and start from the hash the
    previous range ended with; then the walk moves past it exactly as the serial walk would
    have (count, the last two hashes, the checkpoints signing its events, in order). At the first
    range that does not, or was not checked (a helper failed), the walk stops at that range's
    start and the serial walk takes over there, so the report is the serial walk's.
    """
    plan = _plan_ranges(sessions, walk, workers=workers, parallel_min=parallel_min, chunk=chunk, batch=batch)
    if plan is None:
        return
    spec, tasks, checkpoints = plan
    results = _check_ranges(spec, tasks, workers)
    for task, result in zip(tasks, results):
        if result is None or not result["ok"]:
            return
        if walk.prev_hash is not None and result["first_prev"] != walk.prev_hash:
            return
        size = task["last"] - task["first"] + 1
        walk.count += size
        walk.prev_prev_hash = result["last_prev"] if size >= 2 else walk.prev_hash
        walk.prev_hash, walk.expected_seq, walk.cursor = result["last_hash"], task["last"] + 1, task["last"]
        for cp in checkpoints.get(task["first"], ()):
            _check_checkpoint(cp, result["hashes"][str(cp.seq)], keys, walk)


def _plan_ranges(sessions: sessionmaker[Session], walk: _Walk, *, workers: int, parallel_min: int, chunk: int | None,
                 batch: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, list[Any]]] | None:
    """The ranges from where the walk stands to the highest stored sequence, or None to stay serial.

    Stays serial for a chain shorter than ``parallel_min``, a database no other process can
    open (an in-memory SQLite, an unknown driver), and the one case where the serial walk would
    weigh a checkpoint that signs no event in range (one below sequence 1, seen only by a walk
    from the very start).
    """
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine):
        return None
    spec = _connect_spec(engine)
    if spec is None:
        return None
    lo = -1 if walk.cursor is None else walk.cursor
    with sessions() as session:
        last = session.execute(text("SELECT max(seq) FROM audit_events WHERE seq > :lo"), {"lo": lo}).scalar()
        if last is None or last - walk.start + 1 < parallel_min:
            session.rollback()
            return None
        cps = select(*_CHECKPOINT_COLUMNS).where(AuditCheckpoint.seq <= last).order_by(AuditCheckpoint.seq,
                                                                                        AuditCheckpoint.id)
        if walk.cursor is not None:
            cps = cps.where(AuditCheckpoint.seq > walk.cursor)
        checkpoints = list(session.execute(cps))
        session.rollback()
    if any(cp.seq < walk.start for cp in checkpoints):
        return None
    total = last - walk.start + 1
    # Small ranges, so that no process idles long while another finishes the last one (~4,000
    # events for 200,000 on 2 processes); a range costs one more transaction and a message.
    size = chunk or min(max(total // (workers * 25), 1_000), 5_000)
    size = max(size, -(-total // 10_000))  # a forged huge sequence must not mean millions of ranges
    by_first: dict[int, list[Any]] = {}
    for cp in checkpoints:  # in (seq, id) order, so each range's list is too
        by_first.setdefault(walk.start + (cp.seq - walk.start) // size * size, []).append(cp)
    tasks = [{"lo": lo if first == walk.start else first - 1, "first": first, "last": min(first + size - 1, last),
              "limit": batch, "want": sorted({int(cp.seq) for cp in by_first.get(first, ())})}
             for first in range(walk.start, last + 1, size)]
    return spec, tasks, by_first


def _connect_spec(engine: Engine) -> dict[str, Any] | None:
    """What a helper process needs to open its own connection (JSON-ready), or None if it cannot."""
    dialect = engine.dialect
    if (dialect.name, dialect.driver) not in {("sqlite", "pysqlite"), ("postgresql", "psycopg")}:
        return None
    args, kwargs = dialect.create_connect_args(engine.url)
    kwargs = {k: v for k, v in kwargs.items() if v is None or isinstance(v, str | int | float | bool)}
    if dialect.name == "sqlite":
        database = engine.url.database or ""
        if database in ("", ":memory:") or "mode=memory" in str(engine.url):
            return None
        kwargs.setdefault("timeout", 30)
        kwargs.pop("check_same_thread", None)
    if not all(isinstance(a, str | int) for a in args):
        return None
    return {"dialect": dialect.name, "args": list(args), "kwargs": kwargs}


def _check_ranges(spec: dict[str, Any], tasks: list[dict[str, Any]], workers: int) -> list[dict[str, Any] | None]:
    """Run verify_range over every task, here and in ``workers - 1`` helper processes; None where not done.

    Tasks are handed out in order to whoever is free, so a helper that starts late or a busy
    core only takes fewer; a helper still starting when no task is left is not waited for.
    After a range that does not check out, later ranges are not started (the serial walk will
    continue from there). A helper that fails gives its range back. Every helper process has
    ended when this returns, whatever happens.
    """
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    pending = deque(range(len(tasks)))
    lock = threading.Lock()
    stop_at = [len(tasks)]
    helpers = min(workers - 1, len(tasks))
    forked = _fork_helpers(helpers) if helpers and _may_fork(spec) else None
    procs: list[Any] = list(forked) if forked else [None] * helpers
    working = [False] * helpers
    cancelled = [False]

    def take() -> int | None:
        with lock:
            while pending:
                k = pending.popleft()
                if k < stop_at[0]:
                    return k
            return None

    def done(k: int, result: dict[str, Any], by: str) -> None:
        with lock:
            results[k] = result | {"by": by}
            if not result.get("ok"):
                stop_at[0] = min(stop_at[0], k)

    def helper(h: int) -> None:
        k = proc = None
        try:
            proc = forked[h] if forked else subprocess.Popen(
                [sys.executable, "-c", verify_worker.BOOT, verify_worker.__file__],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            with lock:
                procs[h] = proc
                if cancelled[0]:
                    return
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(orjson.dumps(spec) + b"\n")
            proc.stdin.flush()
            ready = orjson.loads(proc.stdout.readline() or b"{}").get("ready")
            with lock:
                if not ready or cancelled[0]:
                    return
                working[h] = True
            while (k := take()) is not None:
                proc.stdin.write(orjson.dumps(tasks[k]) + b"\n")
                proc.stdin.flush()
                result = orjson.loads(proc.stdout.readline() or b'{"error": "EOF"}')
                if "error" in result:
                    break
                done(k, result, "helper")
                k = None
        except Exception:  # noqa: BLE001 - a helper that cannot help leaves its range to this process
            pass
        finally:
            if k is not None:
                with lock:
                    pending.appendleft(k)
            if proc is not None:
                _stop(proc)

    def work_here(conn: Any) -> None:
        while (k := take()) is not None:
            try:
                done(k, verify_worker.verify_range(conn, spec["dialect"], tasks[k]), "here")
            except Exception:  # noqa: BLE001 - the serial walk from here reads it again and raises properly
                done(k, {"ok": False}, "here")

    def cancel(*, all_helpers: bool) -> None:
        """Kill the helpers still starting (or all of them): nothing is left for them to do."""
        with lock:
            cancelled[0] = True
            if all_helpers:
                stop_at[0] = -1
            doomed = [p for p, busy in zip(procs, working) if p is not None and (all_helpers or not busy)]
        for proc in doomed:
            proc.kill()

    threads = [threading.Thread(target=helper, args=(h,), name=f"audit-verify-helper-{h}", daemon=True)
               for h in range(helpers)]
    conn = None
    try:
        for thread in threads:
            thread.start()
        try:
            conn = verify_worker.connect(spec)
        except Exception:  # noqa: BLE001 - the helpers may still do the work; the serial walk does the rest
            conn = None
        if conn is not None and _parent_takes_chunks:
            work_here(conn)
            cancel(all_helpers=False)
        for thread in threads:
            thread.join()
        if conn is not None:
            work_here(conn)  # what a failed helper gave back
    except BaseException:
        cancel(all_helpers=True)
        raise
    finally:
        for thread in threads:
            thread.join()
        for proc in procs:  # a forked helper whose thread never ran is still ours to end
            if proc is not None:
                _stop(proc)
        if conn is not None:
            conn.close()
    return results


def _may_fork(spec: dict[str, Any]) -> bool:
    if spec["dialect"] != "postgresql" or not hasattr(os, "fork") or _helper_start == "spawn":
        return False
    return _helper_start == "fork" or (threading.active_count() == 1
                                       and threading.current_thread() is threading.main_thread())


def _fork_helpers(n: int) -> list[Any] | None:
    """``n`` helpers forked from this (single-threaded) process, or None if forking failed.

    A child runs verify_worker.serve over its two pipes with the collector off, touches nothing
    it inherited (the parent's pooled connections included) and leaves through os._exit, so no
    finalizer or exit handler of the parent's runs in it.
    """
    helpers: list[_ForkedHelper] = []
    parent_ends: list[int] = []
    try:
        for _ in range(n):
            task_r, task_w = os.pipe()
            result_r, result_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child; coverage does not follow it
                code = 1
                try:
                    gc.disable()
                    for fd in (task_w, result_r, *parent_ends):
                        os.close(fd)
                    verify_worker.serve(os.fdopen(task_r, "rb"), os.fdopen(result_w, "wb"))
                    code = 0
                finally:
                    os._exit(code)
            os.close(task_r)
            os.close(result_w)
            parent_ends += [task_w, result_r]
            helpers.append(_ForkedHelper(pid, os.fdopen(task_w, "wb"), os.fdopen(result_r, "rb")))
    except OSError:
        for helper in helpers:
            helper.kill()
            _stop(helper)
        return None
    return helpers


class _ForkedHelper:
    """What the walk uses of subprocess.Popen, for a forked helper."""

    def __init__(self, pid: int, stdin: Any, stdout: Any) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.returncode is None:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
                if self.returncode is not None:
                    return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.002)


def _stop(proc: Any) -> None:
    """End a helper: EOF on its stdin lets it exit; one that does not within seconds is killed."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
