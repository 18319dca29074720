"""Group commit for the audit chain: many callers' events chained and committed in one transaction.

``GroupCommitAuditSink`` keeps the :class:`~broker.audit.sink.AuditSink` contract of
``SqlAuditSink`` -- ``append`` blocks the calling thread until *its* event is durably committed
and chained, or raises AuditWriteError with nothing of the event stored -- but it amortises the
head lock and the commit (the fsync) over every event waiting at the time.

Design: one writer, a daemon thread started lazily by the first ``append``. Callers validate
their event's index columns in their own thread, put it on a queue and wait on their own latch
(a held lock; a future on the caller's loop for ``append_async``). The writer takes the queue in
order, up to ``max_batch`` events, and in ONE transaction: locks the head (the same
``_lock_head`` as ``SqlAuditSink``: FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite, so
other sinks and other processes still serialize with it), gives the events consecutive sequences
and chain hashes in queue order, inserts every row, moves the head once, commits once, and only
then wakes every waiter with its outcome. The rows
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

``append_async`` is the same for a coroutine: the caller awaits a future the writer resolves on
the caller's event loop, so a request waiting for its commit holds no thread (at 32 concurrent
requests, a worker thread blocked per request cost more than the waiting itself).

``close()`` refuses new appends, lets the writer commit everything already queued, and joins it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, update
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import chain_hash, dump_plain, reduce
from broker.audit.sink import HEAD_ID, AuditWriteError, _lock_head, index_columns
from broker.domain import AuditOutcome
from broker.store.models import AuditEventRow, AuditHead

__all__ = ["GroupCommitAuditSink"]


def _held_lock() -> Any:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False, slots=True)
class _Pending:
    """One caller's event on its way through the writer."""

    record: dict[str, Any]
    """The event without ``hash``, already reduced to plain JSON values by canonical.reduce."""
    stdlib: bool
    """canonical.reduce found a value only the standard library renders canonically."""
    columns: dict[str, Any]
    outcome: AuditOutcome | None = None
    previous_hash: str | None = None
    error: AuditWriteError | None = None
    finished: bool = False
    """Set (by the writer only) once outcome or error is final."""
    _latch: Any = None
    """A thread caller's: held until finish(), the caller blocks acquiring it (cheaper than a threading.Event)."""
    _future: asyncio.Future[None] | None = None
    """A coroutine caller's: resolved on its own loop by finish()."""

    @classmethod
    def for_thread(cls, record: dict[str, Any], stdlib: bool, columns: dict[str, Any]) -> _Pending:
        return cls(record, stdlib, columns, _latch=_held_lock())

    @classmethod
    def for_loop(cls, record: dict[str, Any], stdlib: bool, columns: dict[str, Any]) -> _Pending:
        return cls(record, stdlib, columns, _future=asyncio.get_running_loop().create_future())

    def wait(self) -> None:
        self._latch.acquire()

    def finish(self) -> None:
        """Wake the caller, once; called by the writer thread alone."""
        if self.finished:
            return
        self.finished = True
        if self._future is None:
            self._latch.release()
            return
        try:
            self._future.get_loop().call_soon_threadsafe(_resolve, self._future)
        except RuntimeError:  # the caller's loop is closed: nobody is left to wake
            pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the awaiting task may have been cancelled
        future.set_result(None)


class GroupCommitAuditSink:
    """AuditSink that commits the events of concurrent callers together (see module docstring).

    Thread-safe. ``max_batch`` bounds the events of one transaction; ``max_wait_ms`` bounds how
    long the writer waits for callers already inside ``append`` to queue before it commits.
    """

    def __init__(self, sessions: sessionmaker[Session], *, max_batch: int = 256,
                 max_wait_ms: float = 2.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be positive and max_wait_ms not negative")
        engine = sessions.kw.get("bind")
        if not isinstance(engine, Engine):
            raise TypeError("GroupCommitAuditSink needs a sessionmaker bound to an Engine")
        self._engine = engine
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
        self._head: tuple[int, str] | None = None
        self._conn: Connection | None = None  # the writer's own, between batches (writer thread only)
        self._conn_used = 0.0

    def append(self, event: dict[str, Any]) -> AuditOutcome:
        """Chain and commit ``event``; blocks until its batch is committed, else AuditWriteError."""
        pending = self._enqueue(event, _Pending.for_thread)
        try:
            pending.wait()
        finally:
            self._leave()
        return self._result(event, pending)

    async def append_async(self, event: dict[str, Any]) -> AuditOutcome:
        """``append`` for a coroutine: awaits the commit on the running loop, holding no thread.

        If the awaiting task is cancelled, the event is still committed (or refused) with its
        batch; only the answer is lost.
        """
        pending = self._enqueue(event, _Pending.for_loop)
        try:
            await pending._future
        finally:
            self._leave()
        return self._result(event, pending)

    def _enqueue(self, event: dict[str, Any], make: Any) -> _Pending:
        try:
            record = {k: v for k, v in event.items() if k != "hash"}
            columns = index_columns(record)
            # The costly part of canonical JSON (reducing sets, datetimes...) is done here, in the
            # caller's thread, overlapping the writer's commit; the writer adds the two chain
            # fields (a plain int and str) and renders with dump_plain, byte-identical to
            # canonical_json of the whole record.
            reduced, stdlib = reduce(record)
        except Exception as exc:
            raise AuditWriteError(f"audit append failed: {type(exc).__name__}") from exc
        pending = make(reduced, stdlib, columns)
        with self._cond:
            if self._closed:
                raise AuditWriteError("audit append failed: sink closed")
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="audit-group-commit", daemon=True)
                self._writer.start()
            self._inside += 1
            self._queue.append(pending)
            # Only the writer waits on the condition, and only for these two changes (an enqueue
            # leaves "queue < inside" as it was): waking it for every caller cost more than the rest.
            if len(self._queue) == 1 or len(self._queue) >= self._max_batch:
                self._cond.notify()
        return pending

    def _leave(self) -> None:
        """The caller is done waiting: the writer need not wait for it to queue again."""
        with self._cond:
            self._inside -= 1
            if self._queue and len(self._queue) >= self._inside:
                self._cond.notify()

    @staticmethod
    def _result(event: dict[str, Any], pending: _Pending) -> AuditOutcome:
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
                self._drop_connection()
                return
            try:
                self._commit(batch)
            except BaseException as exc:  # never leave a caller waiting forever
                error = AuditWriteError(f"audit append failed: {type(exc).__name__}")
                error.__cause__ = exc
                for p in batch:
                    if not p.finished:
                        p.outcome, p.error = None, error
                        p.finish()
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

    def _connection(self) -> Connection:
        """The writer's connection: kept while batches follow each other, so that a busy writer
        does not pay the pool's liveness ping (a round trip) per batch; after a pause of
        CONNECTION_RECHECK_S it goes back to the pool and a fresh checkout is pinged."""
        now = time.monotonic()
        if self._conn is not None and now - self._conn_used > CONNECTION_RECHECK_S:
            self._drop_connection()
        if self._conn is None:
            self._conn = self._engine.connect()
        self._conn_used = now
        return self._conn

    def _drop_connection(self, *, broken: bool = False) -> None:
        """Give the writer's connection back to the pool, or (``broken``) have the pool discard it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if broken:
                    conn.invalidate()
                conn.close()
            except Exception:  # noqa: BLE001 - a connection being given up on may fail to close
                pass

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction, committed on leaving (no ORM Session: the writer
        only runs Core statements, and a Session's bookkeeping was a visible part of a lone
        request's cost)."""
        conn = self._connection()
        with conn.begin():
            yield conn

    def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for the whole batch; waiters are woken only after it committed.

        The writer remembers the head it last committed and chains the batch onto it, then
        moves the head with a compare-and-set UPDATE (which also takes the row lock). Only if
        another writer (another process) moved the head meanwhile does it lock and read the
        head and chain again, in the same transaction. This saves a round trip per batch.
        """
        self.batches += 1
        known, self._head = self._head, None  # forgotten unless this commit succeeds
        try:
            with self._transaction() as conn:
                plan = None
                if known is not None:
                    plan = _chain(batch, *known)
                    if not _move_head(conn, known, plan):
                        plan = None
                if plan is None:
                    plan = _chain(batch, *_lock_head(conn))
                    conn.execute(update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(seq=plan.seq, hash=plan.prev))
                if plan.rows:
                    if conn.dialect.name == "postgresql":
                        _copy_rows(conn, plan.rows)
                    else:
                        _insert_rows(conn, plan.rows)
        except Exception as exc:
            self._drop_connection(broken=True)  # whatever state it is in, the next batch starts on a fresh one
            error = AuditWriteError(f"audit append failed: {type(exc).__name__}")
            error.__cause__ = exc
            for p in batch:
                p.error = error
                p.finish()
            return
        self._head = (plan.seq, plan.prev)
        self.events += len(plan.chained)
        for p, error in plan.refused:
            p.error = error
            p.finish()
        for p, outcome, previous in plan.chained:
            p.outcome, p.previous_hash = outcome, previous
            p.finish()


@dataclass
class _Plan:
    """A batch chained onto a head: the rows to insert and what each caller will be told."""

    seq: int
    prev: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    chained: list[tuple[_Pending, AuditOutcome, str]] = field(default_factory=list)
    refused: list[tuple[_Pending, AuditWriteError]] = field(default_factory=list)


def _chain(batch: list[_Pending], seq: int, prev: str) -> _Plan:
    """Render and hash each event after (seq, prev); an event that cannot be rendered is refused alone."""
    plan = _Plan(seq, prev)
    for p in batch:
        record = dict(p.record)
        record["sequence"] = plan.seq + 1
        record["previous_hash"] = plan.prev
        try:
            body = dump_plain(record, p.stdlib)
        except Exception as exc:
            error = AuditWriteError(f"audit append failed: {type(exc).__name__}")
            error.__cause__ = exc
            plan.refused.append((p, error))
            continue
        plan.seq += 1
        digest = chain_hash(plan.prev, body)
        plan.rows.append({"seq": plan.seq, "body": body.decode("utf-8"), "prev_hash": plan.prev,
                          "hash": digest, **p.columns})
        plan.chained.append((p, AuditOutcome(sequence=plan.seq, hash=digest), plan.prev))
        plan.prev = digest
    return plan


CONNECTION_RECHECK_S = 1.0
"""A writer connection idle longer than this is returned to the pool and the next batch checks one out anew."""

_HEAD = AuditHead.__table__
_CAS_SQL = {dialect: f"UPDATE {_HEAD.name} SET seq = {p}, hash = {p} WHERE id = {p} AND seq = {p} AND hash = {p}"
            for dialect, p in (("postgresql", "%s"), ("sqlite", "?"))}


def _move_head(conn: Connection, known: tuple[int, str], plan: _Plan) -> bool:
    """Move the head from ``known`` to the plan's end if nobody else moved it; False if somebody did.

    It is the batch's first statement, sent on the driver's own cursor (``conn`` has begun the
    transaction: BEGIN IMMEDIATE on SQLite); building and compiling the SQLAlchemy UPDATE cost
    ~10% of a lone request's time. PostgreSQL: the transaction's BEGIN and the UPDATE go in one
    pipeline, one round trip.
    """
    dialect = conn.dialect.name
    driver = conn.connection.driver_connection
    params = (plan.seq, plan.prev, HEAD_ID, known[0], known[1])
    if dialect == "postgresql":
        with driver.pipeline():
            cursor = driver.execute(_CAS_SQL[dialect], params)
        return cursor.rowcount == 1
    cursor = driver.execute(_CAS_SQL[dialect], params)
    try:
        return cursor.rowcount == 1
    finally:
        cursor.close()


_COPY_COLUMNS = tuple(c.name for c in AuditEventRow.__table__.columns)


_INSERT_SQL = (f"INSERT INTO {AuditEventRow.__tablename__} ({', '.join(_COPY_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in _COPY_COLUMNS)})")
_BINDERS: dict[str, tuple[Any, ...]] = {}


def _insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """SQLite: insert the batch on the driver's cursor, inside the open transaction.

    Each value goes through the bind processor SQLAlchemy would apply to its column (the event
    time becomes SQLite's DATETIME text), so the rows are those a Core INSERT writes; building and
    executing that INSERT through SQLAlchemy cost more than the statement itself.
    """
    binders = _BINDERS.get(conn.dialect.name)
    if binders is None:
        binders = tuple(c.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
                        for c in AuditEventRow.__table__.columns)
        _BINDERS[conn.dialect.name] = binders
    params = [tuple(value if bind is None else bind(value)
                    for bind, value in zip(binders, (row[c] for c in _COPY_COLUMNS))) for row in rows]
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.executemany(_INSERT_SQL, params)
    finally:
        cursor.close()


def _copy_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: COPY the batch in, inside the open transaction.

    psycopg's executemany sends one INSERT per row; COPY sends the batch as one stream, which
    is what lets a single writer keep up with many concurrent requests.
    """
    cursor = conn.connection.driver_connection.cursor()
    with cursor.copy(f"COPY {AuditEventRow.__tablename__} ({', '.join(_COPY_COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[c] for c in _COPY_COLUMNS])
