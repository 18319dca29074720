"""Each kind of tampering is detected, placed and named, with signed checkpoints, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, insert, text

from broker.audit import SqlAuditSink, canonical_json, chain_hash, format_report, verify_chain
from broker.audit.checkpoint import AuditKey, checkpoint_payload, write_checkpoint
from broker.audit.sink import index_columns
from broker.store.models import AuditEventRow

from .events import make_event

N = 10
SIGNED_AT = (4, N)


@pytest.fixture
def key() -> AuditKey:
    return AuditKey(Ed25519PrivateKey.generate())


@pytest.fixture
def signed_chain(db, key):
    """Ten events with checkpoints at 4 and at the head."""
    sink = SqlAuditSink(db.sessions)
    for i in range(1, N + 1):
        sink.append(make_event(i))
        if i in SIGNED_AT:
            write_checkpoint(db.sessions, key, reason="manual")
    return db


def _row(conn: Connection, seq: int):
    return conn.execute(text("SELECT * FROM audit_events WHERE seq = :s"), {"s": seq}).one()


def _set(conn: Connection, seq: int, **values) -> None:
    assignments = ", ".join(f"{k} = :{k}" for k in values)
    conn.execute(text(f"UPDATE audit_events SET {assignments} WHERE seq = :seq"), {"seq": seq, **values})


def _body(conn: Connection, seq: int) -> dict:
    return json.loads(_row(conn, seq).body)


def _forged_row(seq: int, prev: str, **overrides) -> dict:
    event = make_event(seq, **overrides) | {"sequence": seq, "previous_hash": prev}
    body = canonical_json(event)
    return {"seq": seq, "body": body.decode(), "prev_hash": prev, "hash": chain_hash(prev, body),
            **index_columns(event)}


def _rechain_from(conn: Connection, start: int, last: int) -> None:
    """What a careful forger without the key does: recompute every later link and the head."""
    prev = _row(conn, start - 1).hash if start > 1 else "0" * 64
    for seq in range(start, last + 1):
        body = _body(conn, seq) | {"previous_hash": prev}
        raw = canonical_json(body)
        digest = chain_hash(prev, raw)
        _set(conn, seq, body=raw.decode(), prev_hash=prev, hash=digest)
        prev = digest
    conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": last, "h": prev})


def edit_field(conn):
    body = _body(conn, 5) | {"categories_released": ["general-health", "mental-health", "substance-use"]}
    _set(conn, 5, body=canonical_json(body).decode())


def edit_field_and_rehash_that_event(conn):
    body = _body(conn, 5) | {"obligations": []}
    raw = canonical_json(body)
    _set(conn, 5, body=raw.decode(), hash=chain_hash(_row(conn, 5).prev_hash, raw))


def delete_event(conn):
    conn.execute(text("DELETE FROM audit_events WHERE seq = 5"))


def delete_first_event(conn):
    conn.execute(text("DELETE FROM audit_events WHERE seq = 1"))


def insert_forged_shifting_later_events(conn):
    for seq in range(N, 4, -1):  # one by one, from the top, so the primary key never collides
        conn.execute(text("UPDATE audit_events SET seq = :n WHERE seq = :s"), {"n": seq + 1, "s": seq})
    conn.execute(insert(AuditEventRow).values(**_forged_row(5, _row(conn, 4).hash, youth_id="Y-forged")))
    conn.execute(text("UPDATE audit_head SET seq = :s"), {"s": N + 1})


def insert_forged_after_head(conn):
    conn.execute(insert(AuditEventRow).values(**_forged_row(N + 1, _row(conn, N).hash)))


def insert_forged_before_genesis(conn):
    conn.execute(insert(AuditEventRow).values(**_forged_row(0, "0" * 64)))


def swap_two_bodies(conn):
    third, seventh = _row(conn, 3), _row(conn, 7)
    _set(conn, 3, body=seventh.body)
    _set(conn, 7, body=third.body)


def swap_two_whole_rows(conn):
    conn.execute(text("UPDATE audit_events SET seq = -3 WHERE seq = 3"))
    conn.execute(text("UPDATE audit_events SET seq = 3 WHERE seq = 7"))
    conn.execute(text("UPDATE audit_events SET seq = 7 WHERE seq = -3"))


def truncate_tail(conn):
    conn.execute(text(f"DELETE FROM audit_events WHERE seq = {N}"))


def truncate_tail_and_move_head_back(conn):
    conn.execute(text(f"DELETE FROM audit_events WHERE seq >= {N - 1}"))
    conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": N - 2, "h": _row(conn, N - 2).hash})


def rewrite_whole_chain_consistently_without_key(conn):
    body = _body(conn, 3) | {"categories_released": ["general-health", "sud-part2"]}
    _set(conn, 3, body=canonical_json(body).decode())
    _rechain_from(conn, 3, N)


def rewrite_from_the_start(conn):
    body = _body(conn, 1) | {"youth_id": "Y-1", "actor": {"sub": "nobody", "agency": "x", "role": "y"}}
    _set(conn, 1, body=canonical_json(body).decode(), youth_id="Y-1", actor_sub="nobody", actor_agency="x",
         actor_role="y")
    _rechain_from(conn, 1, N)


def rewrite_and_patch_checkpoint_hashes(conn):
    rewrite_whole_chain_consistently_without_key(conn)
    conn.execute(text("UPDATE audit_checkpoints SET head_hash = :h WHERE seq = 4"), {"h": _row(conn, 4).hash})
    conn.execute(text("UPDATE audit_checkpoints SET head_hash = :h WHERE seq = :s"), {"h": _row(conn, N).hash, "s": N})


def rewrite_and_resign_with_own_key(conn):
    rewrite_whole_chain_consistently_without_key(conn)
    forger = AuditKey(Ed25519PrivateKey.generate())
    for cp in conn.execute(text("SELECT id, seq, time FROM audit_checkpoints")).all():
        digest = _row(conn, cp.seq).hash
        signature = forger.sign(checkpoint_payload(cp.seq, digest, cp.time if not isinstance(cp.time, str)
                                                   else _parse_sqlite_time(cp.time), forger.key_id))
        conn.execute(text("UPDATE audit_checkpoints SET head_hash = :h, key_id = :k, signature = :g WHERE id = :i"),
                     {"h": digest, "k": forger.key_id, "g": signature, "i": cp.id})


def _parse_sqlite_time(value: str):
    from datetime import UTC, datetime

    return datetime.fromisoformat(value).replace(tzinfo=UTC)


KINDS = [
    # tamper, first bad sequence, problem, kind, a phrase of the detail naming the place
    (edit_field, 5, "hash mismatch", "edited", "event 5"),
    (edit_field_and_rehash_that_event, 6, "previous hash mismatch", "edited", "event 5"),
    (delete_event, 5, "sequence gap", "deleted", "5"),
    (delete_first_event, 1, "sequence gap", "deleted", "1"),
    (insert_forged_shifting_later_events, 6, "previous hash mismatch", "inserted", "at 5..5"),
    (insert_forged_after_head, N + 1, "head mismatch", "inserted", "after the head"),
    (insert_forged_before_genesis, 0, "sequence gap", "inserted", "event 0"),
    (swap_two_bodies, 3, "hash mismatch", "reordered", "event 7"),
    (swap_two_whole_rows, 3, "previous hash mismatch", "reordered", "3 and 7"),
    (truncate_tail, N, "head mismatch", "truncated", f"ends at {N - 1}"),
    (truncate_tail_and_move_head_back, N - 1, "checkpoint beyond the end of the chain", "truncated",
     f"signed sequence {N}"),
    (rewrite_whole_chain_consistently_without_key, 4, "checkpoint mismatch", "rewritten", "rewritten"),
    (rewrite_from_the_start, 4, "checkpoint mismatch", "rewritten", "rewritten"),
    (rewrite_and_patch_checkpoint_hashes, 4, "checkpoint signature invalid", "rewritten", "forged"),
    (rewrite_and_resign_with_own_key, 4, "checkpoint signed by an unknown key", "unsigned-checkpoint", "not a trusted"),
]


@pytest.mark.parametrize(("tamper", "bad_seq", "problem", "kind", "place"), KINDS, ids=[k[0].__name__ for k in KINDS])
def test_each_tampering_is_detected_placed_and_named(signed_chain, key, tamper: Callable, bad_seq, problem, kind,
                                                     place):
    intact = verify_chain(signed_chain.sessions, public_key=key.public_key)
    assert intact.ok and intact.count == N and intact.signed_through == N and intact.checkpoints == 2
    with signed_chain.engine.begin() as conn:
        tamper(conn)

    for batch in (1000, 4, 3, 1):  # one read, and breaks on and inside batch boundaries
        report = verify_chain(signed_chain.sessions, public_key=key.public_key, batch=batch)
        assert (report.ok, report.first_bad_seq, report.problem, report.kind) == (False, bad_seq, problem, kind), batch
        assert report.count == max(bad_seq - 1, 0), batch
        assert place in (report.detail or ""), report.detail
    assert format_report(report).startswith(f"BROKEN at sequence {bad_seq}: {problem} ({kind}")


def test_a_consistent_rewrite_passes_the_hashes_and_is_caught_only_by_the_checkpoints(signed_chain, key):
    with signed_chain.engine.begin() as conn:
        rewrite_whole_chain_consistently_without_key(conn)
        conn.execute(text("DELETE FROM audit_checkpoints"))
    assert verify_chain(signed_chain.sessions, public_key=key.public_key).ok  # hashes alone prove nothing here
    assert verify_chain(signed_chain.sessions, public_key=key.public_key).signed_through is None


def test_checkpoints_are_compared_even_without_the_public_key(signed_chain):
    with signed_chain.engine.begin() as conn:
        rewrite_whole_chain_consistently_without_key(conn)
    report = verify_chain(signed_chain.sessions)
    assert (report.ok, report.first_bad_seq, report.kind) == (False, 4, "rewritten")
    assert report.signed_through is None


def test_verification_accepts_every_trusted_key_after_a_rotation(db, key):
    sink = SqlAuditSink(db.sessions)
    sink.append(make_event(1))
    write_checkpoint(db.sessions, key, reason="manual")
    new_key = AuditKey(Ed25519PrivateKey.generate())
    sink.append(make_event(2))
    write_checkpoint(db.sessions, new_key, reason="manual")

    assert verify_chain(db.sessions, public_key=new_key.public_key).kind == "unsigned-checkpoint"
    both = verify_chain(db.sessions, public_key=[key.public_key, new_key.public_key])
    assert both.ok and both.signed_through == 2 and both.checkpoints == 2
