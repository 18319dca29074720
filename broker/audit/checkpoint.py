"""Signed checkpoints of the audit chain head (Ed25519), so a whole-chain rewrite needs the key.

A checkpoint is the broker's signature over ``canonical_json({seq, head_hash, time, key_id})``.
Hashes alone let anyone recompute a consistent forged chain; a signature made before the
forgery cannot be recomputed without the private key, so the old checkpoints stop matching.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.canonical import canonical_json, format_time
from broker.audit.sink import HEAD_ID
from broker.store.db import as_utc
from broker.store.models import AuditCheckpoint, AuditHead

__all__ = ["AuditKey", "AuditKeyError", "CheckpointTask", "checkpoint_payload", "generate_audit_key_pem",
           "key_id_of", "load_audit_key", "load_public_key", "sign_checkpoint", "verify_checkpoint_signature",
           "write_checkpoint"]

log = structlog.get_logger("broker.audit.checkpoint")
REASONS = frozenset({"interval", "shutdown", "archive", "manual"})


class AuditKeyError(ValueError):
    """An audit key the broker refuses; the message never contains key material."""


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """A stable, short name for a public key, so checkpoints say which key signed them."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class AuditKey:
    """The Ed25519 private key that signs checkpoints; thread-safe (immutable)."""

    private_key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The half auditors get."""
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        """sha256 hex prefix of the raw public key."""
        return key_id_of(self.public_key)

    def public_pem(self) -> str:
        """SubjectPublicKeyInfo PEM, for `broker audit verify --export FILE --public-key PEM`."""
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def public_jwk(self) -> dict[str, str]:
        """RFC 8037 OKP JWK, for auditors whose tools speak JOSE."""
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "alg": "EdDSA", "use": "sig"}

    def sign(self, payload: bytes) -> str:
        """Base64 signature, as stored in ``audit_checkpoints.signature``."""
        return base64.b64encode(self.private_key.sign(payload)).decode("ascii")


def generate_audit_key_pem() -> bytes:
    """A fresh unencrypted PKCS#8 PEM Ed25519 key, for `deploy/` and tests."""
    return Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption())


def load_audit_key(path: Path | str) -> AuditKey:
    """Read the PEM key at ``path``; refuses anything but an unencrypted Ed25519 private key."""
    try:
        native = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except TypeError as exc:
        raise AuditKeyError("the audit key must be an unencrypted PEM private key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuditKeyError("the audit key is not a readable PEM private key") from exc
    if not isinstance(native, Ed25519PrivateKey):
        raise AuditKeyError("the audit key must be an Ed25519 key")
    return AuditKey(native)


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An auditor's copy of the checkpoint key; refuses anything but Ed25519."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuditKeyError("not a readable PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError("the checkpoint key must be an Ed25519 key")
    return key


def checkpoint_payload(seq: int, head_hash: str, time: datetime | str, key_id: str) -> bytes:
    """The exact bytes signed; the same function serves signing and both verifiers."""
    when = time if isinstance(time, str) else format_time(as_utc(time))
    return canonical_json({"seq": int(seq), "head_hash": head_hash, "time": when, "key_id": key_id})


def sign_checkpoint(session: Session, key: AuditKey, *, seq: int, head_hash: str, reason: str,
                    now: datetime) -> AuditCheckpoint:
    """Add a signed checkpoint row in the caller's transaction (the caller vouches for seq/hash)."""
    if reason not in REASONS:
        raise ValueError(f"unknown checkpoint reason {reason!r}")
    when = as_utc(now)
    signature = key.sign(checkpoint_payload(seq, head_hash, when, key.key_id))
    row = AuditCheckpoint(seq=seq, head_hash=head_hash, time=when, key_id=key.key_id, signature=signature,
                          reason=reason)
    session.add(row)
    session.flush()
    return row


def write_checkpoint(sessions: sessionmaker[Session], key: AuditKey, *, reason: str,
                     now: datetime | None = None) -> AuditCheckpoint | None:
    """Sign the current head; None on an empty chain, or for "interval" when the head is already signed.

    The head row is locked exactly as SqlAuditSink locks it (FOR UPDATE on PostgreSQL, BEGIN
    IMMEDIATE on SQLite), so a head that is mid-append is never signed, and the checkpoint
    commits in the same transaction that held the lock.
    """
    now = now or datetime.now(UTC)
    with sessions.begin() as session:
        head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == HEAD_ID)
                               .with_for_update()).one_or_none()
        if head is None or head.seq == 0:
            return None
        if reason == "interval" and _already_signed(session, key, int(head.seq), str(head.hash)):
            return None
        return sign_checkpoint(session, key, seq=int(head.seq), head_hash=str(head.hash), reason=reason, now=now)


def _already_signed(session: Session, key: AuditKey, seq: int, head_hash: str) -> bool:
    """An idle broker should not add a checkpoint every interval that says nothing new."""
    last = session.execute(select(AuditCheckpoint.seq, AuditCheckpoint.head_hash)
                           .where(AuditCheckpoint.key_id == key.key_id)
                           .order_by(AuditCheckpoint.id.desc()).limit(1)).one_or_none()
    return last is not None and (last.seq, last.head_hash) == (seq, head_hash)


def verify_checkpoint_signature(checkpoint: AuditCheckpoint | Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True only if ``public_key`` signed exactly this (seq, head_hash, time, key_id)."""
    get = checkpoint.get if isinstance(checkpoint, Mapping) else lambda name: getattr(checkpoint, name, None)
    try:
        if get("key_id") != key_id_of(public_key):
            return False
        payload = checkpoint_payload(int(get("seq")), str(get("head_hash")), get("time"), str(get("key_id")))
        public_key.verify(base64.b64decode(str(get("signature")), validate=True), payload)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def public_keys_by_id(public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None) -> dict[str, Ed25519PublicKey]:
    """Accept one key or several (after a rotation), indexed by key id."""
    if public_key is None:
        return {}
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    return {key_id_of(k): k for k in keys}


class CheckpointTask:
    """Signs the head every ``interval`` seconds and once more on shutdown.

    ``run()`` loops until cancelled; the database work happens in a worker thread so the event
    loop never blocks. A failed checkpoint is logged (error class only) and retried at the
    next interval: a missed checkpoint weakens the proof but must never stop the broker.
    """

    def __init__(self, sessions: sessionmaker[Session], key: AuditKey, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._sessions, self._key, self._interval = sessions, key, interval

    async def run(self) -> None:
        """Periodic loop; cancel the task to stop it, then await ``final()``."""
        while True:
            await asyncio.sleep(self._interval)
            await self._write("interval")

    async def final(self) -> AuditCheckpoint | None:
        """The shutdown checkpoint, so the last events before a stop are signed too."""
        return await self._write("shutdown")

    async def _write(self, reason: str) -> AuditCheckpoint | None:
        try:
            return await asyncio.to_thread(write_checkpoint, self._sessions, self._key, reason=reason)
        except Exception as err:  # never take the broker down over a checkpoint
            log.error("audit_checkpoint_failed", reason=reason, error_type=type(err).__name__)
            return None
