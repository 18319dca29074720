"""Ranges checked in helper processes give exactly the serial walk's report, whatever was tampered with.

verify_chain splits a long chain into ranges that this process and helper processes check side
by side; at the first range that does not check out it walks serially from that range's start.
Here the threshold and the range size are set low so that ten- and two-thousand-event chains
take that path, and every report (every field, the kind and the detail included) is compared
with the serial walk's (``workers=1``), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, insert, text

from broker.audit import SqlAuditSink, canonical_json, chain_hash, verify_chain
from broker.audit import verify as verify_module
from broker.audit import verify_worker
from broker.audit.checkpoint import AuditKey, sign_checkpoint, write_checkpoint
from broker.audit.sink import index_columns
from broker.store.models import AuditEventRow

from . import test_verify, test_verify_kinds
from .bulk import bulk_chain
from .events import make_event


@pytest.fixture
def key() -> AuditKey:
    return AuditKey(Ed25519PrivateKey.generate())


@pytest.fixture
def ranges_seen(monkeypatch):
    """Every range result of every parallel walk, with who checked it ("here" or "helper")."""
    seen: list[dict | None] = []
    real = verify_module._check_ranges

    def recording(spec, tasks, workers):
        results = real(spec, tasks, workers)
        seen.extend(results)
        return results

    monkeypatch.setattr(verify_module, "_check_ranges", recording)
    return seen


@pytest.fixture(params=["spawn", "fork"])
def helpers_only(request, db, monkeypatch):
    """Every range goes through a helper process (this process only takes what a failed helper gives back).

    Helpers are fresh interpreters ("spawn") or, on PostgreSQL, forks of this process ("fork").
    """
    assert request.param == "spawn" or db.backend == "postgresql"  # conftest leaves SQLite x fork out
    monkeypatch.setattr(verify_module, "_parent_takes_chunks", False)
    monkeypatch.setattr(verify_module, "_helper_start", request.param)
    return request.param


def _children() -> set[int]:
    """Live child processes of this process."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid():
                pids.add(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_helper_is_left_behind():
    before = _children()
    yield
    assert _children() <= before, "a helper process outlived verify_chain"


def _same_as_serial(sessions, *, public_key=None, from_seq: int = 1, chunks=(1, 3, 4), batches=(1000,),
                    workers: int = 2):
    """The serial report, after checking that the parallel walk gives the same one for every setting."""
    serial = verify_chain(sessions, workers=1, public_key=public_key, from_seq=from_seq)
    for batch in batches:
        assert verify_chain(sessions, workers=1, public_key=public_key, from_seq=from_seq,
                            batch=batch).to_dict() == serial.to_dict()
        for chunk in chunks:
            parallel = verify_chain(sessions, workers=workers, parallel_min=1, chunk=chunk, batch=batch,
                                    public_key=public_key, from_seq=from_seq)
            assert parallel.to_dict() == serial.to_dict(), (chunk, batch)
    return serial


# --- Every tamper of test_verify.py and test_verify_kinds.py, on their ten-event chains ---------


@pytest.fixture
def chain(db):
    sink = SqlAuditSink(db.sessions)
    for i in range(1, test_verify.N + 1):
        sink.append(make_event(i))
    return db


@pytest.fixture
def signed_chain(db, key):
    sink = SqlAuditSink(db.sessions)
    for i in range(1, test_verify_kinds.N + 1):
        sink.append(make_event(i))
        if i in test_verify_kinds.SIGNED_AT:
            write_checkpoint(db.sessions, key, reason="manual")
    return db


@pytest.mark.parametrize(("tamper", "bad_seq", "problem"), test_verify.TAMPERS,
                         ids=[t[0].__name__ for t in test_verify.TAMPERS])
def test_every_break_is_reported_as_the_serial_walk_reports_it(chain, tamper, bad_seq, problem, ranges_seen):
    assert _same_as_serial(chain.sessions, chunks=(3,)).ok
    with chain.engine.begin() as conn:
        tamper(conn)
    report = _same_as_serial(chain.sessions, chunks=(1, 4), batches=(1000, 2))
    assert (report.ok, report.first_bad_seq, report.problem) == (False, bad_seq, problem)
    assert ranges_seen


@pytest.mark.parametrize(("tamper", "bad_seq", "problem", "kind", "place"), test_verify_kinds.KINDS,
                         ids=[k[0].__name__ for k in test_verify_kinds.KINDS])
def test_every_kind_is_named_as_the_serial_walk_names_it(signed_chain, key, tamper, bad_seq, problem, kind, place,
                                                         ranges_seen):
    intact = _same_as_serial(signed_chain.sessions, public_key=key.public_key, chunks=(3,))
    assert intact.ok and intact.signed_through == test_verify_kinds.N and intact.checkpoints == 2
    with signed_chain.engine.begin() as conn:
        tamper(conn)
    report = _same_as_serial(signed_chain.sessions, public_key=key.public_key, chunks=(1, 4), batches=(1000, 3))
    assert (report.ok, report.first_bad_seq, report.problem, report.kind) == (False, bad_seq, problem, kind)
    assert place in report.detail
    assert ranges_seen


@pytest.mark.parametrize(("tamper", "bad_seq", "problem", "kind", "place"), test_verify_kinds.KINDS,
                         ids=[k[0].__name__ for k in test_verify_kinds.KINDS])
def test_helper_processes_alone_give_the_serial_report(signed_chain, key, tamper, bad_seq, problem, kind, place,
                                                       helpers_only, ranges_seen):
    with signed_chain.engine.begin() as conn:
        tamper(conn)
    report = _same_as_serial(signed_chain.sessions, public_key=key.public_key, chunks=(3,))
    assert (report.first_bad_seq, report.kind) == (bad_seq, kind)
    checked = [r for r in ranges_seen if r is not None]
    assert checked and all(r["by"] == "helper" for r in checked), ranges_seen


# --- A longer chain: many ranges, several helpers, checkpoints inside ranges ----------------------

LONG = 2000
CHUNK = 150
SIGNED = (149, 150, 151, 777, 1500, LONG)  # on, just before and just after range boundaries


@pytest.fixture
def long_chain(db, key):
    """Two thousand events written straight into the tables, with checkpoints at SIGNED."""
    bulk_chain(db.engine, LONG)
    with db.engine.connect() as conn:
        hashes = dict(conn.execute(text("SELECT seq, hash FROM audit_events WHERE seq IN "
                                        f"({', '.join(str(s) for s in SIGNED)})")).all())
    with db.sessions.begin() as session:
        for seq in SIGNED:
            sign_checkpoint(session, key, seq=seq, head_hash=hashes[seq], reason="manual",
                            now=datetime(2025, 3, 2, tzinfo=UTC))
    return db


def _row(conn, seq):
    return conn.execute(text("SELECT * FROM audit_events WHERE seq = :s"), {"s": seq}).one()


def _set(conn, seq, **values):
    assignments = ", ".join(f"{k} = :{k}" for k in values)
    conn.execute(text(f"UPDATE audit_events SET {assignments} WHERE seq = :seq"), {"seq": seq, **values})


def _rechain(conn, start, last):
    prev = _row(conn, start - 1).hash
    for seq in range(start, last + 1):
        body = json.loads(_row(conn, seq).body) | {"previous_hash": prev}
        raw = canonical_json(body)
        digest = chain_hash(prev, raw)
        _set(conn, seq, body=raw.decode(), prev_hash=prev, hash=digest)
        prev = digest
    conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": last, "h": prev})


def edit_body(conn):
    body = json.loads(_row(conn, 1234).body) | {"obligations": []}
    _set(conn, 1234, body=canonical_json(body).decode())


def edit_index_column_in_last_range(conn):
    _set(conn, 1990, youth_id="Y-other")


def edit_prev_hash_on_a_range_boundary(conn):
    _set(conn, 301, prev_hash="a" * 64)  # 301 is the first event of a range


def delete_on_a_range_boundary(conn):
    conn.execute(text("DELETE FROM audit_events WHERE seq = 451"))


def delete_a_whole_range(conn):
    conn.execute(text("DELETE FROM audit_events WHERE seq BETWEEN 601 AND 750"))


def insert_shifting_later_events(conn):
    conn.execute(text("UPDATE audit_events SET seq = -seq - 1 WHERE seq >= 900"))
    conn.execute(text("UPDATE audit_events SET seq = -seq WHERE seq < 0"))
    event = make_event(900, youth_id="Y-forged") | {"sequence": 900, "previous_hash": _row(conn, 899).hash}
    body = canonical_json(event)
    conn.execute(insert(AuditEventRow).values(seq=900, body=body.decode(), prev_hash=event["previous_hash"],
                                              hash=chain_hash(event["previous_hash"], body), **index_columns(event)))
    conn.execute(text("UPDATE audit_head SET seq = :s"), {"s": LONG + 1})


def swap_whole_rows_across_ranges(conn):
    conn.execute(text("UPDATE audit_events SET seq = -3 WHERE seq = 200"))
    conn.execute(text("UPDATE audit_events SET seq = 200 WHERE seq = 1700"))
    conn.execute(text("UPDATE audit_events SET seq = 1700 WHERE seq = -3"))


def swap_bodies_across_ranges(conn):
    a, b = _row(conn, 333), _row(conn, 1444)
    _set(conn, 333, body=b.body)
    _set(conn, 1444, body=a.body)


def truncate_tail(conn):
    conn.execute(text(f"DELETE FROM audit_events WHERE seq > {LONG - 5}"))


def truncate_tail_and_move_head_back(conn):
    conn.execute(text(f"DELETE FROM audit_events WHERE seq > {LONG - 5}"))
    conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": LONG - 5, "h": _row(conn, LONG - 5).hash})


def rewrite_without_key(conn):
    body = json.loads(_row(conn, 700).body) | {"categories_released": ["general-health", "sud-part2"]}
    _set(conn, 700, body=canonical_json(body).decode())
    _rechain(conn, 700, LONG)


def rewrite_and_patch_checkpoints(conn):
    rewrite_without_key(conn)
    for seq in SIGNED:
        conn.execute(text("UPDATE audit_checkpoints SET head_hash = :h WHERE seq = :s"),
                     {"h": _row(conn, seq).hash, "s": seq})


def append_past_head(conn):
    event = make_event(LONG + 1) | {"sequence": LONG + 1, "previous_hash": _row(conn, LONG).hash}
    body = canonical_json(event)
    conn.execute(insert(AuditEventRow).values(seq=LONG + 1, body=body.decode(), prev_hash=event["previous_hash"],
                                              hash=chain_hash(event["previous_hash"], body), **index_columns(event)))


LONG_TAMPERS = [
    (edit_body, 1234, "edited"),
    (edit_index_column_in_last_range, 1990, "edited"),
    (edit_prev_hash_on_a_range_boundary, 301, "edited"),
    (delete_on_a_range_boundary, 451, "deleted"),
    (delete_a_whole_range, 601, "deleted"),
    (insert_shifting_later_events, 901, "inserted"),
    (swap_whole_rows_across_ranges, 200, "reordered"),
    (swap_bodies_across_ranges, 333, "reordered"),
    (truncate_tail, LONG - 4, "truncated"),
    (truncate_tail_and_move_head_back, LONG - 4, "truncated"),
    (rewrite_without_key, 777, "rewritten"),
    (rewrite_and_patch_checkpoints, 777, "rewritten"),
    (append_past_head, LONG + 1, "inserted"),
]


def test_an_intact_long_chain_is_checked_in_ranges_by_this_process_and_helpers(long_chain, key, ranges_seen):
    report = _same_as_serial(long_chain.sessions, public_key=key.public_key, chunks=(CHUNK, 1000), workers=3)
    assert report.ok and report.count == LONG and report.checkpoints == len(SIGNED) and report.signed_through == LONG
    assert all(r is not None and r["ok"] for r in ranges_seen)


@pytest.mark.parametrize(("tamper", "bad_seq", "kind"), LONG_TAMPERS, ids=[t[0].__name__ for t in LONG_TAMPERS])
def test_a_break_anywhere_in_a_long_chain_is_reported_as_serially(long_chain, key, tamper, bad_seq, kind,
                                                                 ranges_seen):
    with long_chain.engine.begin() as conn:
        tamper(conn)
    report = _same_as_serial(long_chain.sessions, public_key=key.public_key, chunks=(CHUNK,), batches=(1000, 64))
    assert (report.ok, report.first_bad_seq, report.kind) == (False, bad_seq, kind), report
    assert ranges_seen


# Tampers that make the range holding them fail (not only a link between ranges).
IN_RANGE = [t for t in LONG_TAMPERS if t[0] in (edit_body, edit_index_column_in_last_range, delete_on_a_range_boundary,
                                                 delete_a_whole_range, insert_shifting_later_events,
                                                 swap_whole_rows_across_ranges)]


@pytest.mark.parametrize(("tamper", "bad_seq", "kind"), IN_RANGE, ids=[t[0].__name__ for t in IN_RANGE])
def test_a_break_found_by_a_helper_is_reported_as_serially(long_chain, key, tamper, bad_seq, kind, helpers_only,
                                                          ranges_seen):
    with long_chain.engine.begin() as conn:
        tamper(conn)
    report = _same_as_serial(long_chain.sessions, public_key=key.public_key, chunks=(CHUNK,), workers=3)
    assert (report.first_bad_seq, report.kind) == (bad_seq, kind)
    assert any(r is not None and r["by"] == "helper" and not r["ok"] for r in ranges_seen)


def test_from_a_later_sequence_the_ranges_start_there(long_chain, key):
    with long_chain.engine.begin() as conn:
        edit_body(conn)
    for from_seq in (2, 150, 1235, LONG):
        assert _same_as_serial(long_chain.sessions, public_key=key.public_key, from_seq=from_seq,
                               chunks=(CHUNK,)).ok == (from_seq > 1234)


# --- What the parallel walk must not do --------------------------------------------------------


def test_a_short_chain_stays_in_this_process(long_chain, ranges_seen):
    assert verify_chain(long_chain.sessions, workers=2, parallel_min=LONG + 1).ok
    assert verify_chain(long_chain.sessions, workers=1, parallel_min=1).ok
    assert ranges_seen == []
    assert verify_chain(long_chain.sessions, workers=2, parallel_min=LONG).ok
    assert ranges_seen


def test_a_second_walk_while_one_runs_in_parallel_walks_serially(long_chain, key, ranges_seen):
    """Concurrent verifications (say, several /audit/verify calls) never multiply helper processes."""
    assert verify_module._PARALLEL_WALK.acquire(blocking=False)  # a parallel walk is under way
    try:
        report = verify_chain(long_chain.sessions, workers=2, parallel_min=1, chunk=CHUNK,
                              public_key=key.public_key)
    finally:
        verify_module._PARALLEL_WALK.release()
    assert report.ok and report.count == LONG
    assert ranges_seen == []  # no range was handed out
    assert verify_chain(long_chain.sessions, workers=2, parallel_min=1, chunk=CHUNK, public_key=key.public_key).ok
    assert ranges_seen


def test_an_in_memory_database_is_not_shared_with_helpers():
    assert verify_module._connect_spec(create_engine("sqlite://")) is None
    assert verify_module._connect_spec(create_engine("sqlite:///:memory:")) is None


def _failing_helpers(monkeypatch, how: str, start: str) -> None:
    """Helpers that exit at once, hang before answering, or die after checking one range."""
    parent = os.getpid()
    if start == "spawn":
        boot = {"exits": "import sys; sys.exit(3)\n",
                "hangs": "import time; time.sleep(60)\n",
                "dies": verify_worker.BOOT.replace("module.main()\n", (
                    "import os\n"
                    "real, calls = module.verify_range, []\n"
                    "def once(*args):\n"
                    "    calls.append(1)\n"
                    "    if len(calls) > 1:\n"
                    "        os._exit(1)\n"
                    "    return real(*args)\n"
                    "module.verify_range = once\n"
                    "module.main()\n"))}[how]
        monkeypatch.setattr(verify_worker, "BOOT", boot)
    elif how == "exits":
        monkeypatch.setattr(verify_worker, "serve", lambda inp, out: None)
    elif how == "hangs":
        monkeypatch.setattr(verify_worker, "serve", lambda inp, out: time.sleep(60))
    else:
        real, calls = verify_worker.verify_range, []

        def once(*args):
            if os.getpid() != parent:  # a forked helper: this process keeps working
                calls.append(1)
                if len(calls) > 1:
                    os._exit(1)
            return real(*args)

        monkeypatch.setattr(verify_worker, "verify_range", once)


@pytest.mark.parametrize("start", ["spawn", "fork"])
@pytest.mark.parametrize("how", ["exits", "hangs", "dies"])
def test_a_failing_helper_leaves_its_work_to_this_process(long_chain, key, monkeypatch, how, start):
    assert start == "spawn" or long_chain.backend == "postgresql"  # conftest leaves SQLite x fork out
    monkeypatch.setattr(verify_module, "_helper_start", start)
    _failing_helpers(monkeypatch, how, start)
    with long_chain.engine.begin() as conn:
        edit_body(conn)
    _same_as_serial(long_chain.sessions, public_key=key.public_key, chunks=(CHUNK,), workers=3)
    if how != "hangs":  # a helper that never answers is waited for when this process takes no range
        monkeypatch.setattr(verify_module, "_parent_takes_chunks", False)
        _same_as_serial(long_chain.sessions, public_key=key.public_key, chunks=(CHUNK,), workers=3)


def test_concurrent_appends_never_make_the_parallel_walk_report_a_break(chain):
    sink = SqlAuditSink(chain.sessions)
    done = threading.Event()

    def writer() -> None:
        for i in range(test_verify.N + 1, test_verify.N + 61):
            sink.append(make_event(i))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reports = []
    while not done.is_set():
        reports.append(verify_chain(chain.sessions, workers=2, parallel_min=1, chunk=4, batch=3))
    thread.join()
    assert reports and all(r.ok for r in reports), [r for r in reports if not r.ok][:3]
    assert verify_chain(chain.sessions, workers=2, parallel_min=1, chunk=7).count == test_verify.N + 60
