"""SqlAuditSink on SQLite and PostgreSQL: chaining, concurrency, and all-or-nothing failure."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text

from broker.audit import GENESIS_HASH, AuditWriteError, SqlAuditSink, canonical_json, chain_hash, verify_chain
from broker.domain import AuditOutcome
from broker.store.db import make_engine, make_sessionmaker
from broker.store.models import AuditEventRow, AuditHead

from .events import make_event


def _rows(sessions) -> list[AuditEventRow]:
    with sessions() as session:
        return list(session.scalars(select(AuditEventRow).order_by(AuditEventRow.seq)))


def _head(sessions) -> tuple[int, str] | None:
    with sessions() as session:
        row = session.execute(select(AuditHead.seq, AuditHead.hash)).one_or_none()
        return None if row is None else tuple(row)


def test_append_chains_events_from_genesis(sessions):
    sink = SqlAuditSink(sessions)
    outcomes = [sink.append(make_event(i)) for i in range(1, 4)]

    rows = _rows(sessions)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert outcomes == [AuditOutcome(sequence=r.seq, hash=r.hash) for r in rows]
    assert rows[0].prev_hash == GENESIS_HASH
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]
    for row in rows:
        assert row.hash == chain_hash(row.prev_hash, row.body.encode())
    assert _head(sessions) == (3, rows[-1].hash)


def test_body_is_canonical_event_with_chain_fields_and_columns_match(sessions):
    event = make_event(5, hash="caller-supplied-and-ignored")
    SqlAuditSink(sessions).append(event)

    row = _rows(sessions)[0]
    expected = {k: v for k, v in event.items() if k != "hash"}
    assert row.body.encode() == canonical_json(expected)
    body = json.loads(row.body)
    assert body["sequence"] == 1 and body["previous_hash"] == GENESIS_HASH
    assert "hash" not in body
    assert body["categories_withheld"] == ["mental-health", "substance-use"]
    assert (row.request_id, row.youth_id, row.mdt_id, row.actor_sub, row.actor_agency, row.actor_role,
            row.client_id, row.action, row.outcome, row.policy_version) == (
        "req-00005", "Y-2", "MDT-7", "staff-42", "probation", "probation-officer", "probation-cms",
        "record.read", 200, "a" * 64)
    stored = row.time if row.time.tzinfo else row.time.replace(tzinfo=event["time"].tzinfo)
    assert stored == event["time"]


def test_caller_dict_gains_only_sequence_and_previous_hash(sessions):
    sink = SqlAuditSink(sessions)
    sink.append(make_event(1))
    event = make_event(2, hash="x")
    before = copy.deepcopy(event)

    sink.append(event)

    assert set(event) - set(before) == {"sequence", "previous_hash"}
    assert event["sequence"] == 2 and event["previous_hash"] == _rows(sessions)[0].hash
    assert {k: v for k, v in event.items() if k not in ("sequence", "previous_hash")} == before


def test_optional_keys_may_be_missing_or_none(sessions):
    sink = SqlAuditSink(sessions)
    minimal = {"time": make_event()["time"], "request_id": "req-min", "action": "token.issue",
               "outcome": 401}
    sink.append(minimal)
    sink.append(make_event(2, actor=None, youth_id=None, client_id=None, policy_version=None))

    rows = _rows(sessions)
    assert [(r.actor_sub, r.youth_id, r.client_id, r.policy_version) for r in rows] == [(None,) * 4] * 2
    assert verify_chain(sessions).ok


def test_non_utc_time_is_stored_as_the_same_instant(sessions):
    pacific = timezone(timedelta(hours=-7))
    event = make_event(1, time=datetime(2025, 3, 1, 10, 30, 0, 250, tzinfo=pacific))
    SqlAuditSink(sessions).append(event)

    row = _rows(sessions)[0]
    assert json.loads(row.body)["time"] == "2025-03-01T17:30:00.000250Z"
    stored = row.time if row.time.tzinfo else row.time.replace(tzinfo=UTC)
    assert stored == event["time"]
    assert verify_chain(sessions).ok


def test_concurrent_appends_never_fork_the_chain(sessions):
    sink = SqlAuditSink(sessions)
    with ThreadPoolExecutor(max_workers=32) as pool:
        outcomes = list(pool.map(lambda i: sink.append(make_event(i)), range(200)))

    assert sorted(o.sequence for o in outcomes) == list(range(1, 201))
    assert [r.seq for r in _rows(sessions)] == list(range(1, 201))
    assert {r.request_id for r in _rows(sessions)} == {f"req-{i:05d}" for i in range(200)}
    report = verify_chain(sessions)
    assert report.ok and report.count == 200, report


def _count(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditEventRow))


UNSTORABLE = [
    {"detail": float("nan")},
    {"detail": object()},
    {"time": datetime(2025, 3, 1, 17, 30)},
    {"time": "2025-03-01T17:30:00Z"},
    {"request_id": None},
    {"action": None},
    {"outcome": "200"},
    {"outcome": True},
    {"actor": "staff-42"},
    {"youth_id": "Y" * 65},
    {"policy_version": 7},
]


def test_unstorable_events_are_refused_whole(sessions):
    sink = SqlAuditSink(sessions)
    sink.append(make_event(0))
    for i, bad in enumerate(UNSTORABLE, start=1):
        event = make_event(i, **bad)
        keys = set(event)
        with pytest.raises(AuditWriteError):
            sink.append(event)
        assert set(event) == keys, bad
    assert _count(sessions) == 1 and _head(sessions)[0] == 1
    assert sink.append(make_event(99)).sequence == 2
    assert verify_chain(sessions).ok


_HEAD_TRIGGER = {
    "sqlite": ["CREATE TRIGGER no_head BEFORE UPDATE ON audit_head "
               "BEGIN SELECT RAISE(ABORT, 'head frozen'); END"],
    "postgresql": ["CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'head frozen'; END $$ LANGUAGE plpgsql",
                   "CREATE TRIGGER no_head BEFORE UPDATE ON audit_head "
                   "FOR EACH ROW EXECUTE FUNCTION refuse()"],
}


def test_failure_after_the_event_insert_rolls_back_everything(db):
    sink = SqlAuditSink(db.sessions)
    first = sink.append(make_event(1))
    with db.engine.begin() as conn:
        for statement in _HEAD_TRIGGER[db.backend]:
            conn.execute(text(statement))
    event = make_event(2)

    with pytest.raises(AuditWriteError) as caught:
        sink.append(event)

    assert "head frozen" not in str(caught.value)
    assert "sequence" not in event
    assert _count(db.sessions) == 1 and _head(db.sessions) == (1, first.hash)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER no_head" + (" ON audit_head" if db.backend == "postgresql" else "")))
    assert sink.append(event).sequence == 2
    assert verify_chain(db.sessions).ok


def test_dropped_tables_raise_audit_write_error(db):
    sink = SqlAuditSink(db.sessions)
    sink.append(make_event(1))
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_events"))
    event = make_event(2)

    with pytest.raises(AuditWriteError):
        sink.append(event)
    assert "sequence" not in event
    assert _head(db.sessions)[0] == 1


def test_unreachable_sqlite_database_raises_audit_write_error(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'broker.db'}")
    with pytest.raises(AuditWriteError):
        SqlAuditSink(make_sessionmaker(engine)).append(make_event(1))
    engine.dispose()
    assert not (tmp_path / "missing-dir").exists()


@pytest.mark.postgres
def test_unreachable_postgres_database_raises_audit_write_error(pg_server):
    engine = make_engine(pg_server.url("no_such_database"))
    with pytest.raises(AuditWriteError):
        SqlAuditSink(make_sessionmaker(engine)).append(make_event(1))
    engine.dispose()
