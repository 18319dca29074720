"""GroupCommitAuditSink on SQLite and PostgreSQL: same chain as SqlAuditSink, batches all-or-nothing."""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, func, select, text

from broker.audit import AuditWriteError, SqlAuditSink, verify_chain
from broker.audit import group
from broker.audit.group import GroupCommitAuditSink
from broker.audit.sink import _lock_head
from broker.store.db import make_engine, make_sessionmaker
from broker.store.models import AuditEventRow, AuditHead

from .events import make_event
from .test_sink import _HEAD_TRIGGER, UNSTORABLE


def _rows(sessions) -> list[tuple]:
    with sessions() as session:
        return [(r.seq, r.body, r.prev_hash, r.hash, r.request_id, r.youth_id, r.mdt_id, r.actor_sub,
                 r.actor_agency, r.actor_role, r.client_id, r.action, r.outcome, r.policy_version,
                 r.time)
                for r in session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq))]


def _head(sessions) -> tuple[int, str] | None:
    with sessions() as session:
        row = session.execute(select(AuditHead.seq, AuditHead.hash)).one_or_none()
        return None if row is None else tuple(row)


def _count(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditEventRow))


class _HeadHold:
    """A thread holding the chain head's lock (SQLite: BEGIN IMMEDIATE takes the write lock;
    PostgreSQL: the head row lock) from ``start`` until ``release``.

    It locks the head as the sinks do (``_lock_head``), which first creates the row: on a fresh
    PostgreSQL database there is none yet, and a FOR UPDATE that matches no row holds nothing."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine, self.holding, self._release = engine, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def _hold(self) -> None:
        with self.engine.begin() as conn:
            _lock_head(conn)
            self.holding.set()
            self._release.wait(30)

    def start(self) -> _HeadHold:
        self.thread.start()
        return self

    def release(self) -> None:
        self._release.set()
        self.thread.join(30)


def _run_together(sink: GroupCommitAuditSink, events: list[dict], *, engine=None) -> list:
    """Append every event from its own thread; each result is an outcome or the raised error.

    With ``engine``, the chain head is locked until every caller has queued, so the callers
    share batches however slowly the threads start (a loaded CI machine starts them one by one).
    """
    results: list = [None] * len(events)
    holder = None
    if engine is not None:
        holder = _HeadHold(engine).start()
        assert holder.holding.wait(30)

    def one(i: int) -> None:
        try:
            results[i] = sink.append(events[i])
        except AuditWriteError as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(events))]
    for t in threads:
        t.start()
    if holder is not None:
        deadline = time.monotonic() + 30
        while sink._inside < len(events) and time.monotonic() < deadline:
            time.sleep(0.01)
        holder.release()
    for t in threads:
        t.join(60)
    return results


def test_32_threads_x_50_appends_make_one_gapless_chain(sessions):
    sink = GroupCommitAuditSink(sessions)
    got: dict[str, tuple[int, str]] = {}
    lock = threading.Lock()

    def writer(t: int) -> None:
        for k in range(50):
            event = make_event(t * 50 + k)
            outcome = sink.append(event)
            assert event["sequence"] == outcome.sequence
            with lock:
                got[event["request_id"]] = (outcome.sequence, outcome.hash)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(writer, range(32)))
    sink.close()

    rows = _rows(sessions)
    assert [r[0] for r in rows] == list(range(1, 1601))
    assert len(got) == 1600
    assert {request_id: (seq, digest) for seq, _, _, digest, request_id, *_ in rows} == got
    assert _head(sessions) == (1600, rows[-1][3])
    report = verify_chain(sessions)
    assert report.ok and report.count == 1600, report
    assert sink.events == 1600 and sink.batches < 1600  # some batching did happen


def test_same_rows_and_hashes_as_sql_audit_sink(sessions):
    events = [make_event(i) for i in range(1, 21)]
    events.append({"time": make_event()["time"], "request_id": "req-min", "action": "token.issue",
                   "outcome": 401})
    events.append(make_event(30, actor=None, youth_id=None, hash="caller-supplied-and-ignored"))
    plain_events, group_events = copy.deepcopy(events), copy.deepcopy(events)

    plain = [SqlAuditSink(sessions).append(e) for e in plain_events]
    expected, expected_head = _rows(sessions), _head(sessions)
    with sessions.begin() as session:
        session.execute(delete(AuditEventRow))
        session.execute(delete(AuditHead))

    with GroupCommitAuditSink(sessions) as sink:
        grouped = [sink.append(e) for e in group_events]

    assert grouped == plain
    assert _rows(sessions) == expected
    assert _head(sessions) == expected_head
    assert group_events == plain_events  # the callers' dicts gained the same sequence/previous_hash


def test_interleaves_with_sql_audit_sink_on_one_chain(sessions):
    plain = SqlAuditSink(sessions)
    with GroupCommitAuditSink(sessions) as group:
        for i in range(1, 11):
            (plain if i % 3 == 0 else group).append(make_event(i))
    assert [r[0] for r in _rows(sessions)] == list(range(1, 11))
    assert verify_chain(sessions).ok


def test_invalid_event_is_refused_alone_within_a_batch(sessions):
    sink = GroupCommitAuditSink(sessions, max_wait_ms=5000)
    sink.append(make_event(0))
    # Both kinds of bad event: refused before queueing (columns) and inside the writer (JSON).
    events = [make_event(i, **UNSTORABLE[i % len(UNSTORABLE)]) if i % 4 == 1 else make_event(i)
              for i in range(1, 17)]
    bad = {i for i in range(1, 17) if i % 4 == 1}
    keys = [set(e) for e in events]

    results = _run_together(sink, events)
    sink.close()

    for i, result in enumerate(results, start=1):
        if i in bad:
            assert isinstance(result, AuditWriteError), (i, result)
            assert set(events[i - 1]) == keys[i - 1]
        else:
            assert not isinstance(result, Exception), (i, result)
    assert _count(sessions) == 1 + 16 - len(bad)
    assert verify_chain(sessions).ok


def test_nan_in_body_refused_alone_in_the_writer(sessions):
    # NaN passes the column checks and fails only at canonical JSON, inside the batch.
    with GroupCommitAuditSink(sessions, max_wait_ms=5000) as sink:
        events = [make_event(i, detail=float("nan")) if i == 3 else make_event(i) for i in range(1, 7)]
        results = _run_together(sink, events)
    assert [isinstance(r, AuditWriteError) for r in results] == [False, False, True, False, False, False]
    assert "sequence" not in events[2]
    assert sorted(r.sequence for r in results if not isinstance(r, Exception)) == [1, 2, 3, 4, 5]
    assert verify_chain(sessions).ok


def test_failed_batch_fails_every_waiter_and_writes_nothing(db):
    sink = GroupCommitAuditSink(db.sessions, max_wait_ms=5000)
    first = sink.append(make_event(0))
    with db.engine.begin() as conn:  # fails the head update, after the batch's rows were inserted
        for statement in _HEAD_TRIGGER[db.backend]:
            conn.execute(text(statement))
    events = [make_event(i) for i in range(1, 13)]
    batches_before = sink.batches

    results = _run_together(sink, events, engine=db.engine)

    assert all(isinstance(r, AuditWriteError) for r in results), results
    assert all("head frozen" not in str(r) for r in results)
    assert all("sequence" not in e for e in events)
    assert sink.batches - batches_before < len(events)  # the waiters did share batches
    assert _count(db.sessions) == 1 and _head(db.sessions) == (1, first.hash)

    with db.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER no_head" + (" ON audit_head" if db.backend == "postgresql" else "")))
    results = _run_together(sink, events)
    sink.close()
    assert sorted(r.sequence for r in results) == list(range(2, 14))
    assert verify_chain(db.sessions).ok


def test_dropped_head_table_fails_the_batch(db):
    sink = GroupCommitAuditSink(db.sessions, max_wait_ms=5000)
    sink.append(make_event(0))
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_head"))
    events = [make_event(i) for i in range(1, 9)]
    results = _run_together(sink, events)
    sink.close()
    assert all(isinstance(r, AuditWriteError) for r in results), results
    assert _count(db.sessions) == 1


def test_unreachable_sqlite_database_raises_audit_write_error(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'broker.db'}")
    sink = GroupCommitAuditSink(make_sessionmaker(engine))
    with pytest.raises(AuditWriteError):
        sink.append(make_event(1))
    sink.close()
    engine.dispose()


def test_close_drains_and_refuses_later_appends(sessions):
    sink = GroupCommitAuditSink(sessions, max_wait_ms=50)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(sink.append, make_event(i)) for i in range(40)]
        outcomes = [f.result(timeout=60) for f in futures]
    sink.close()
    assert sorted(o.sequence for o in outcomes) == list(range(1, 41))
    with pytest.raises(AuditWriteError):
        sink.append(make_event(99))
    sink.close()  # idempotent
    assert _count(sessions) == 40
    assert verify_chain(sessions).ok


def _terminate_other_backends(db) -> int:
    """Kill every other connection to this test database (the writer's among them), as a failover would."""
    with db.engine.connect() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        conn.commit()
    return int(killed)


@pytest.mark.postgresql_only
def test_a_writer_connection_killed_mid_burst_fails_one_batch_then_the_writer_reconnects(db, monkeypatch):
    """The writer keeps its connection between batches (no liveness ping while busy): losing it
    fails the batch that finds it dead, never silently, and the next batch runs on a new one."""
    monkeypatch.setattr(group, "CONNECTION_RECHECK_S", 3600.0)
    sink = GroupCommitAuditSink(db.sessions)
    sink.append(make_event(0))
    held = sink._conn
    assert held is not None and _terminate_other_backends(db) >= 1
    with pytest.raises(AuditWriteError):
        sink.append(make_event(1))
    outcomes = [sink.append(make_event(i)) for i in range(2, 5)]
    sink.close()
    assert [o.sequence for o in outcomes] == [2, 3, 4]
    assert sink._conn is None  # given back when the writer stopped
    assert verify_chain(db.sessions).ok


@pytest.mark.postgresql_only
def test_after_a_pause_the_writer_checks_out_a_pinged_connection(db, monkeypatch):
    monkeypatch.setattr(group, "CONNECTION_RECHECK_S", 0.0)
    sink = GroupCommitAuditSink(db.sessions)
    sink.append(make_event(0))
    assert _terminate_other_backends(db) >= 1
    time.sleep(0.01)
    outcomes = [sink.append(make_event(i)) for i in range(1, 4)]  # the pool's ping finds the dead one
    sink.close()
    assert [o.sequence for o in outcomes] == [2, 3, 4]
    assert verify_chain(db.sessions).ok


# ---- append_async: the same contract for coroutines, on the caller's loop ---------------------------

async def _gather_async(sink: GroupCommitAuditSink, events: list[dict], *, engine=None) -> list:
    """append_async every event as its own task on this loop; each result is an outcome or the error.

    With ``engine``, the head is locked until every task has queued, so they share batches.
    """
    import asyncio

    holder = None
    if engine is not None:
        holder = _HeadHold(engine).start()
        assert await asyncio.to_thread(holder.holding.wait, 30)
    tasks = [asyncio.create_task(sink.append_async(e)) for e in events]
    if holder is not None:
        deadline = time.monotonic() + 30
        while sink._inside < len(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(holder.release)
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


async def test_async_appends_share_batches_and_make_the_chain_thread_callers_make(db):
    sink = GroupCommitAuditSink(db.sessions, max_wait_ms=50)
    events = [make_event(i) for i in range(1, 41)]
    outcomes = await _gather_async(sink, events, engine=db.engine)
    # thread callers and coroutine callers at once, on one chain
    mixed = [make_event(i) for i in range(41, 61)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        threaded = [pool.submit(sink.append, e) for e in mixed[:10]]
        awaited = await _gather_async(sink, mixed[10:])
        threaded = [f.result(timeout=60) for f in threaded]
    sink.close()

    assert sorted(o.sequence for o in outcomes) == list(range(1, 41))
    assert all(e["sequence"] == o.sequence for e, o in zip(events, outcomes))  # the caller's dict, as append
    assert sorted(o.sequence for o in [*threaded, *awaited]) == list(range(41, 61))
    assert sink.batches < 60 and sink._inside == 0
    report = verify_chain(db.sessions)
    assert report.ok and report.count == 60, report


async def test_a_failed_batch_fails_every_async_waiter_and_writes_nothing(db):
    sink = GroupCommitAuditSink(db.sessions, max_wait_ms=5000)
    first = await sink.append_async(make_event(0))
    with db.engine.begin() as conn:
        for statement in _HEAD_TRIGGER[db.backend]:
            conn.execute(text(statement))
    events = [make_event(i) for i in range(1, 9)]
    results = await _gather_async(sink, events, engine=db.engine)
    assert all(isinstance(r, AuditWriteError) for r in results), results
    assert all("sequence" not in e for e in events)
    assert _count(db.sessions) == 1 and _head(db.sessions) == (1, first.hash)
    with pytest.raises(AuditWriteError):  # an event that cannot be stored is refused before it is queued
        await sink.append_async(make_event(9, **UNSTORABLE[0]))
    sink.close()
    with pytest.raises(AuditWriteError):
        await sink.append_async(make_event(10))
    assert sink._inside == 0


async def test_a_cancelled_async_caller_is_still_audited(db):
    import asyncio

    sink = GroupCommitAuditSink(db.sessions)
    holder = _HeadHold(db.engine).start()
    assert await asyncio.to_thread(holder.holding.wait, 30)
    cancelled = asyncio.create_task(sink.append_async(make_event(1)))
    deadline = time.monotonic() + 30
    while sink._inside < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.to_thread(holder.release)
    after = await asyncio.wait_for(sink.append_async(make_event(2)), 60)  # the writer went on, chained after it
    sink.close()
    assert after.sequence == 2 and _count(db.sessions) == 2 and sink._inside == 0
    assert verify_chain(db.sessions).ok
