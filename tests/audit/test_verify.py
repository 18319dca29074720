"""verify_chain finds the first break, whatever was tampered with, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import tracemalloc
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, insert, text

from broker.audit import (
    GENESIS_HASH,
    SqlAuditSink,
    VerifyReport,
    canonical_json,
    chain_hash,
    format_report,
    verify_chain,
)
from broker.audit.sink import index_columns
from broker.store.models import AuditEventRow, AuditHead

from .events import make_event

N = 10


@pytest.fixture
def chain(db):
    """Ten events appended through the sink."""
    sink = SqlAuditSink(db.sessions)
    for i in range(1, N + 1):
        sink.append(make_event(i))
    return db


def _row(conn: Connection, seq: int):
    return conn.execute(text("SELECT * FROM audit_events WHERE seq = :s"), {"s": seq}).one()


def _set(conn: Connection, seq: int, **values) -> None:
    assignments = ", ".join(f"{k} = :{k}" for k in values)
    conn.execute(text(f"UPDATE audit_events SET {assignments} WHERE seq = :seq"), {"seq": seq, **values})


def _rewrite_body(conn: Connection, seq: int, change: Callable[[dict], None], *, rehash: bool) -> None:
    row = _row(conn, seq)
    body = json.loads(row.body)
    change(body)
    new_body = canonical_json(body)
    values = {"body": new_body.decode()}
    if rehash:
        values["hash"] = chain_hash(row.prev_hash, new_body)
    _set(conn, seq, **values)


def edit_body(conn):
    _rewrite_body(conn, 5, lambda b: b.update(categories_released=["general-health", "mental-health"]),
                  rehash=False)


def edit_body_and_rehash(conn):
    _rewrite_body(conn, 5, lambda b: b.update(obligations=[]), rehash=True)


def edit_hash_column(conn):
    _set(conn, 5, hash="f" * 64)


def edit_prev_hash_column(conn):
    _set(conn, 5, prev_hash=_row(conn, 3).hash)


def delete_middle_row(conn):
    conn.execute(text("DELETE FROM audit_events WHERE seq = 5"))


def delete_first_row(conn):
    conn.execute(text("DELETE FROM audit_events WHERE seq = 1"))


def replace_with_forged_row(conn):
    original = _row(conn, 5)
    conn.execute(text("DELETE FROM audit_events WHERE seq = 5"))
    _insert_forged(conn, 5, original.prev_hash, youth_id="Y-forged")


def append_forged_row_past_head(conn):
    _insert_forged(conn, N + 1, _row(conn, N).hash)


def insert_row_before_genesis(conn):
    _insert_forged(conn, 0, GENESIS_HASH)


def swap_bodies(conn):
    third, seventh = _row(conn, 3), _row(conn, 7)
    _set(conn, 3, body=seventh.body)
    _set(conn, 7, body=third.body)


def truncate_last_row(conn):
    conn.execute(text(f"DELETE FROM audit_events WHERE seq = {N}"))


def edit_head_hash(conn):
    conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": "e" * 64})


def delete_head(conn):
    conn.execute(text("DELETE FROM audit_head"))


def edit_index_column(conn):
    _set(conn, 4, youth_id="Y-other")


def edit_actor_column(conn):
    _set(conn, 6, actor_sub="someone-else")


def body_sequence_disagrees(conn):
    _rewrite_body(conn, 8, lambda b: b.update(sequence=80), rehash=True)
    _chain_forward(conn, 8)


def body_not_json(conn):
    _set(conn, 9, body="{truncated", hash=chain_hash(_row(conn, 9).prev_hash, b"{truncated"))
    _chain_forward(conn, 9)


def _chain_forward(conn: Connection, start: int) -> None:
    """Re-link every later row and the head, as a careful forger without the checkpoints would."""
    prev = _row(conn, start).hash
    for seq in range(start + 1, N + 1):
        body = _row(conn, seq).body
        digest = chain_hash(prev, body.encode())
        _set(conn, seq, prev_hash=prev, hash=digest)
        prev = digest
    conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})


def _insert_forged(conn: Connection, seq: int, prev: str, **overrides) -> None:
    event = make_event(seq, **overrides) | {"sequence": seq, "previous_hash": prev}
    body = canonical_json(event)
    conn.execute(insert(AuditEventRow).values(seq=seq, body=body.decode(), prev_hash=prev,
                                              hash=chain_hash(prev, body), **index_columns(event)))


TAMPERS = [
    (edit_body, 5, "hash mismatch"),
    (edit_body_and_rehash, 6, "previous hash mismatch"),
    (edit_hash_column, 5, "hash mismatch"),
    (edit_prev_hash_column, 5, "previous hash mismatch"),
    (delete_middle_row, 5, "sequence gap"),
    (delete_first_row, 1, "sequence gap"),
    (replace_with_forged_row, 6, "previous hash mismatch"),
    (append_forged_row_past_head, N + 1, "head mismatch"),
    (insert_row_before_genesis, 0, "sequence gap"),
    (swap_bodies, 3, "hash mismatch"),
    (truncate_last_row, N, "head mismatch"),
    (edit_head_hash, N, "head mismatch"),
    (delete_head, 1, "head mismatch"),
    (edit_index_column, 4, "index columns disagree with body"),
    (edit_actor_column, 6, "index columns disagree with body"),
    (body_sequence_disagrees, 8, "body sequence or previous hash disagrees with columns"),
    (body_not_json, 9, "body is not a JSON object"),
]


@pytest.mark.parametrize(("tamper", "bad_seq", "problem"), TAMPERS, ids=[t[0].__name__ for t in TAMPERS])
def test_tampering_is_detected_at_the_first_bad_sequence(chain, tamper, bad_seq, problem):
    assert verify_chain(chain.sessions) == VerifyReport(ok=True, count=N)
    with chain.engine.begin() as conn:
        tamper(conn)

    expected = VerifyReport(ok=False, count=max(bad_seq - 1, 0), first_bad_seq=bad_seq, problem=problem)
    for batch in (1000, 4, 1):  # one read, and breaks falling on and inside batch boundaries
        assert verify_chain(chain.sessions, batch=batch) == expected
    assert format_report(expected) == f"BROKEN at sequence {bad_seq}: {problem}"


def test_intact_chain_verifies_across_batch_boundaries(chain):
    for batch in (1, 3, 5, 9, 10, 11, 1000):
        report = verify_chain(chain.sessions, batch=batch)
        assert report == VerifyReport(ok=True, count=N, first_bad_seq=None, problem=None), batch
    assert format_report(report) == f"OK: {N} events verified"


def test_empty_database_verifies(sessions):
    assert verify_chain(sessions) == VerifyReport(ok=True, count=0)
    assert format_report(verify_chain(sessions)) == "OK: 0 events verified"


def test_verify_from_a_later_sequence_anchors_on_its_stored_previous_hash(chain):
    for from_seq, count in [(1, N), (2, N - 1), (7, N - 6), (N, 1), (N + 1, 0), (N + 5, 0)]:
        for batch in (3, 1000):
            assert verify_chain(chain.sessions, from_seq=from_seq, batch=batch) == VerifyReport(
                ok=True, count=count), (from_seq, batch)


def test_verify_from_later_sequence_ignores_earlier_damage_but_not_later(chain):
    with chain.engine.begin() as conn:
        edit_body(conn)  # row 5 no longer matches its hash
    assert verify_chain(chain.sessions, from_seq=6) == VerifyReport(ok=True, count=N - 5)
    assert verify_chain(chain.sessions, from_seq=5) == VerifyReport(False, 0, 5, "hash mismatch")
    with chain.engine.begin() as conn:
        _set(conn, 9, youth_id="Y-moved")
    assert verify_chain(chain.sessions, from_seq=7) == VerifyReport(
        ok=False, count=2, first_bad_seq=9, problem="index columns disagree with body")


def test_from_seq_past_a_truncated_end_reports_head_mismatch(chain):
    with chain.engine.begin() as conn:
        truncate_last_row(conn)
    assert verify_chain(chain.sessions, from_seq=N) == VerifyReport(False, 0, N, "head mismatch")


def test_verify_rejects_nonsense_arguments(sessions):
    with pytest.raises(ValueError):
        verify_chain(sessions, from_seq=0)
    with pytest.raises(ValueError):
        verify_chain(sessions, batch=0)


def test_appends_continue_a_verified_chain(chain):
    SqlAuditSink(chain.sessions).append(make_event(99))
    assert verify_chain(chain.sessions, batch=7) == VerifyReport(ok=True, count=N + 1)


def _bulk_chain(db, n: int) -> None:
    """Write n valid events directly (much faster than the sink) to exercise streaming."""
    prev, rows = GENESIS_HASH, []
    for seq in range(1, n + 1):
        event = make_event(seq) | {"sequence": seq, "previous_hash": prev}
        body = canonical_json(event)
        digest = chain_hash(prev, body)
        rows.append({"seq": seq, "body": body.decode(), "prev_hash": prev, "hash": digest,
                     **index_columns(event)})
        prev = digest
    with db.engine.begin() as conn:
        conn.execute(insert(AuditEventRow), rows)
        conn.execute(insert(AuditHead).values(id=1, seq=n, hash=prev))


def test_memory_stays_flat_while_streaming(db):
    n = 1500
    _bulk_chain(db, n)
    verify_chain(db.sessions, batch=50)  # warm caches (compiled statements, pool) outside the measurement

    peaks = {}
    for batch in (50, n):
        tracemalloc.start()
        report = verify_chain(db.sessions, batch=batch)
        peaks[batch] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report == VerifyReport(ok=True, count=n)

    assert peaks[50] * 5 < peaks[n], peaks


def test_verify_during_concurrent_appends_never_reports_a_false_break(chain):
    sink = SqlAuditSink(chain.sessions)
    done = threading.Event()

    def writer() -> None:
        for i in range(N + 1, N + 121):
            sink.append(make_event(i))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reports = []
    while not done.is_set():
        reports.append(verify_chain(chain.sessions, batch=7))
    thread.join()

    assert reports and all(r.ok for r in reports), [r for r in reports if not r.ok][:3]
    assert verify_chain(chain.sessions) == VerifyReport(ok=True, count=N + 120)
