"""Signed checkpoints: real Ed25519 keys, the head read under the sink's lock, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text

from broker.audit import SqlAuditSink, verify_chain
from broker.audit.checkpoint import (
    AuditKey,
    AuditKeyError,
    CheckpointTask,
    checkpoint_payload,
    generate_audit_key_pem,
    load_audit_key,
    load_public_key,
    verify_checkpoint_signature,
    write_checkpoint,
)
from broker.audit.canonical import canonical_json
from broker.store.models import AuditCheckpoint, AuditEventRow, AuditHead

from .events import make_event

NOW = datetime(2025, 3, 2, 9, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def key(tmp_path) -> AuditKey:
    """A real key, written to and loaded from a PEM file as the broker does."""
    path = tmp_path / "audit.pem"
    path.write_bytes(generate_audit_key_pem())
    return load_audit_key(path)


def _checkpoints(sessions) -> list[AuditCheckpoint]:
    with sessions() as s:
        return list(s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)))


def _row_hash(sessions, seq: int) -> str:
    with sessions() as s:
        return s.execute(select(AuditEventRow.hash).where(AuditEventRow.seq == seq)).scalar_one()


def test_key_id_jwk_and_pem_describe_the_same_public_key(key):
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.key_id == hashlib.sha256(raw).hexdigest()[: len(key.key_id)] and len(key.key_id) >= 16
    jwk = key.public_jwk()
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["kid"] == key.key_id
    assert base64.urlsafe_b64decode(jwk["x"] + "=") == raw
    assert load_public_key(key.public_pem()).public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw) == raw
    assert "PRIVATE" not in key.public_pem()


def test_only_unencrypted_ed25519_private_keys_are_accepted(tmp_path):
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-pass"))
    for name, data in [("ec.pem", ec_pem), ("enc.pem", encrypted), ("junk.pem", b"not a key")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AuditKeyError):
            load_audit_key(tmp_path / name)


def test_nothing_is_signed_on_an_empty_chain(sessions, key):
    assert write_checkpoint(sessions, key, reason="manual", now=NOW) is None
    assert _checkpoints(sessions) == []
    with sessions() as s:
        assert s.get(AuditHead, 1) is None  # the checkpoint did not create a head either


def test_checkpoint_signs_the_head_and_verifies_only_with_its_key(sessions, key):
    sink = SqlAuditSink(sessions)
    for i in range(1, 6):
        sink.append(make_event(i))
    cp = write_checkpoint(sessions, key, reason="manual", now=NOW)

    assert (cp.seq, cp.head_hash, cp.key_id, cp.reason) == (5, _row_hash(sessions, 5), key.key_id, "manual")
    stored = _checkpoints(sessions)[0]
    assert verify_checkpoint_signature(stored, key.public_key)
    payload = canonical_json({"seq": 5, "head_hash": cp.head_hash, "time": "2025-03-02T09:00:00.123456Z",
                              "key_id": key.key_id})
    assert checkpoint_payload(stored.seq, stored.head_hash, stored.time, stored.key_id) == payload
    key.public_key.verify(base64.b64decode(stored.signature), payload)

    other = AuditKey(Ed25519PrivateKey.generate())
    assert not verify_checkpoint_signature(stored, other.public_key)
    as_dict = {"seq": 5, "head_hash": cp.head_hash, "time": stored.time, "key_id": key.key_id,
               "signature": stored.signature}
    assert verify_checkpoint_signature(as_dict, key.public_key)
    for change in ({"seq": 4}, {"head_hash": "0" * 64}, {"time": "2025-03-02T09:00:01.123456Z"},
                   {"signature": "AAAA"}, {"signature": "not base64!"}):
        assert not verify_checkpoint_signature(as_dict | change, key.public_key), change


def test_interval_checkpoints_skip_an_unchanged_head_but_manual_ones_do_not(sessions, key):
    sink = SqlAuditSink(sessions)
    sink.append(make_event(1))
    assert write_checkpoint(sessions, key, reason="interval", now=NOW) is not None
    assert write_checkpoint(sessions, key, reason="interval", now=NOW) is None
    assert write_checkpoint(sessions, key, reason="manual", now=NOW) is not None
    sink.append(make_event(2))
    assert write_checkpoint(sessions, key, reason="interval", now=NOW).seq == 2
    assert [c.reason for c in _checkpoints(sessions)] == ["interval", "manual", "interval"]
    with pytest.raises(ValueError):
        write_checkpoint(sessions, key, reason="whenever", now=NOW)


def test_checkpoints_taken_during_concurrent_appends_always_name_a_committed_head(db, key):
    sink = SqlAuditSink(db.sessions)
    sink.append(make_event(1))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(40):
                sink.append(make_event(offset + i))
        except BaseException as err:  # surfaced below
            errors.append(err)

    def checkpointer() -> None:
        while not stop.is_set():
            write_checkpoint(db.sessions, key, reason="manual")

    threads = [threading.Thread(target=writer, args=(100 * n,)) for n in range(1, 4)]
    signer = threading.Thread(target=checkpointer)
    signer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    signer.join()

    assert not errors
    checkpoints = _checkpoints(db.sessions)
    assert len(checkpoints) >= 2
    for cp in checkpoints:
        assert cp.head_hash == _row_hash(db.sessions, cp.seq)
        assert verify_checkpoint_signature(cp, key.public_key)
    report = verify_chain(db.sessions, public_key=key.public_key, batch=16)
    assert report.ok and report.count == 121 and report.checkpoints == len(checkpoints)
    assert report.signed_through == max(cp.seq for cp in checkpoints)


async def test_checkpoint_task_signs_periodically_and_on_shutdown(sessions, key):
    sink = SqlAuditSink(sessions)
    task = CheckpointTask(sessions, key, interval=0.05)
    runner = asyncio.create_task(task.run())
    for i in range(1, 4):
        await asyncio.to_thread(sink.append, make_event(i))
        await asyncio.sleep(0.12)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    await asyncio.to_thread(sink.append, make_event(4))
    final = await task.final()

    checkpoints = _checkpoints(sessions)
    assert {c.reason for c in checkpoints[:-1]} == {"interval"} and len(checkpoints) >= 3
    assert (final.seq, final.reason) == (4, "shutdown") and checkpoints[-1].id == final.id
    assert verify_chain(sessions, public_key=key.public_key).signed_through == 4


async def test_checkpoint_task_survives_a_database_failure(sessions, key):
    SqlAuditSink(sessions).append(make_event(1))
    with sessions.begin() as s:
        s.execute(text("DROP TABLE audit_archives"))
        s.execute(text("DROP TABLE audit_checkpoints"))
    assert await CheckpointTask(sessions, key, interval=1).final() is None
