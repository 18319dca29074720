"""Group commit for the audit chain: many callers' events chained and committed in one transaction.

``GroupCommitAuditSink`` keeps the :class:`~broker.audit.sink.AuditSink` contract of
``SqlAuditSink`` -- ``append`` blocks the calling thread until *its* event is durably committed
and chained, or raises AuditWriteError with nothing of the event stored -- but it amortises the
head lock and the commit (the fsync) over every event waiting at the time.

Design: one writer, a daemon thread started lazily by the first ``append``. Callers validate
their event's index columns in their own thread, put it on a queue and wait on their own
``threading.Event``. The writer takes the queue in order, up to ``max_batch`` events, and in ONE
transaction: locks the head (the same ``_lock_head`` as ``SqlAuditSink``: FOR UPDATE on
PostgreSQL, BEGIN IMMEDIATE on SQLite, so other sinks and other processes still serialize with
it), gives the events consecutive sequences and chain hashes in queue order, inserts every row,
moves the head once, commits once, and only then wakes every waiter with its outcome. The rows
and hashes are byte-for-byte those ``SqlAuditSink`` would have written for the same order.

Failure: if anything in the transaction fails, it is rolled back whole and every waiter of that
batch gets AuditWriteError (no sequence is consumed, the caller's dict is untouched). An event
that cannot be stored on its own merits (bad index columns, no canonical JSON form) is refused
alone: columns and JSON values are checked in the caller's thread before queueing (and should
canonical JSON still fail in the writer, that event alone is skipped without a sequence), so the
rest of the batch is unaffected.

Batching: the writer never waits for a batch to fill when nobody else is inside ``append`` (a
lone caller pays no latency); while other callers are inside ``append`` but not yet queued (for
example just woken by the previous commit), it waits up to ``max_wait_ms`` for them to queue.

``close()`` refuses new appends, lets the writer commit everything already queued, and joins it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import _plain, canonical_json, chain_hash
from broker.audit.sink import HEAD_ID, AuditWriteError, _lock_head, index_columns
from broker.domain import AuditOutcome
from broker.store.models import AuditEventRow, AuditHead

__all__ = ["GroupCommitAuditSink"]


@dataclass(eq=False, slots=True)
class _Pending:
    """One caller's event on its way through the writer."""

    record: dict[str, Any]
    """The event without ``hash``, already reduced to plain JSON values by canonical._plain."""
    columns: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: AuditOutcome | None = None
    previous_hash: str | None = None
    error: AuditWriteError | None = None


class GroupCommitAuditSink:
    """AuditSink that commits the events of concurrent callers together (see module docstring).

    Thread-safe. ``max_batch`` bounds the events of one transaction; ``max_wait_ms`` bounds how
    long the writer waits for callers already inside ``append`` to queue before it commits.
    """

    def __init__(self, sessions: sessionmaker[Session], *, max_batch: int = 256,
                 max_wait_ms: float = 2.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be positive and max_wait_ms not negative")
        self._sessions = sessions
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._inside = 0  # callers inside append() that have not returned yet
        self._closed = False
        self._writer: threading.Thread | None = None
        self.batches = 0
        """Transactions attempted so far (committed or failed): events / batches is the batch size."""
        self.events = 0
        """Events committed so far."""

    def append(self, event: dict[str, Any]) -> AuditOutcome:
        """Chain and commit ``event``; blocks until its batch is committed, else AuditWriteError."""
        try:
            record = {k: v for k, v in event.items() if k != "hash"}
            columns = index_columns(record)
            # The costly part of canonical JSON (reducing sets, datetimes...) is done here, in the
            # caller's thread, overlapping the writer's commit; _plain is idempotent, so the
            # writer's canonical_json over this plus the two chain fields is byte-identical.
            plain = _plain(record)
        except Exception as exc:
            raise AuditWriteError(f"audit append failed: {type(exc).__name__}") from exc
        pending = _Pending(plain, columns)
        with self._cond:
            if self._closed:
                raise AuditWriteError("audit append failed: sink closed")
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="audit-group-commit", daemon=True)
                self._writer.start()
            self._inside += 1
            self._queue.append(pending)
            self._cond.notify_all()
        try:
            pending.done.wait()
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        event["sequence"] = pending.outcome.sequence
        event["previous_hash"] = pending.previous_hash
        return pending.outcome

    def close(self, timeout: float | None = None) -> None:
        """Refuse new appends, commit what is queued, stop the writer. Idempotent."""
        with self._cond:
            self._closed = True
            writer = self._writer
            self._cond.notify_all()
        if writer is not None:
            writer.join(timeout)

    def __enter__(self) -> GroupCommitAuditSink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._commit(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                error = AuditWriteError(f"audit append failed: {type(exc).__name__}")
                error.__cause__ = exc
                for p in batch:
                    if not p.done.is_set():
                        p.outcome, p.error = None, error
                        p.done.set()
                if not isinstance(exc, Exception):
                    raise

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for work; then for callers already inside append, within max_wait. None: closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self._max_wait
            while (len(self._queue) < self._max_batch and len(self._queue) < self._inside
                   and not self._closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(len(self._queue), self._max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for the whole batch; waiters are woken only after it committed."""
        self.batches += 1
        chained: list[tuple[_Pending, AuditOutcome, str]] = []
        refused: list[tuple[_Pending, AuditWriteError]] = []
        try:
            with self._sessions.begin() as session:
                seq, prev = _lock_head(session)
                rows = []
                for p in batch:
                    record = dict(p.record)
                    record["sequence"] = seq + 1
                    record["previous_hash"] = prev
                    try:
                        body = canonical_json(record)
                    except Exception as exc:  # this event alone cannot be stored
                        error = AuditWriteError(f"audit append failed: {type(exc).__name__}")
                        error.__cause__ = exc
                        refused.append((p, error))
                        continue
                    seq += 1
                    digest = chain_hash(prev, body)
                    rows.append({"seq": seq, "body": body.decode("utf-8"), "prev_hash": prev,
                                 "hash": digest, **p.columns})
                    chained.append((p, AuditOutcome(sequence=seq, hash=digest), prev))
                    prev = digest
                if rows:
                    session.execute(insert(AuditEventRow.__table__), rows)
                    session.execute(update(AuditHead).where(AuditHead.id == HEAD_ID)
                                    .values(seq=seq, hash=prev))
        except Exception as exc:
            error = AuditWriteError(f"audit append failed: {type(exc).__name__}")
            error.__cause__ = exc
            for p in batch:
                p.error = error
                p.done.set()
            return
        self.events += len(chained)
        for p, error in refused:
            p.error = error
            p.done.set()
        for p, outcome, previous in chained:
            p.outcome, p.previous_hash = outcome, previous
            p.done.set()
