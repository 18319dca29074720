"""SQLAlchemy 2.x models: the registry, the roster, clients, audit and policy versions.

Every timestamp is stored timezone-aware in UTC. Nothing here stores record content:
records stay in the source systems.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    false,
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base with explicit constraint names so Alembic diffs are stable."""

    type_annotation_map = {datetime: DateTime(timezone=True)}


class Agency(Base):
    """A county agency (child welfare, probation, behavioral health, ...)."""

    __tablename__ = "agencies"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Team roles this agency's staff may hold."""


class Staff(Base):
    """A staff member an agency system may speak for (pseudonymous subject id)."""

    __tablename__ = "staff"

    sub: Mapped[str] = mapped_column(String(128), primary_key=True)
    agency_id: Mapped[str] = mapped_column(ForeignKey("agencies.id"), index=True)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class OAuthClient(Base):
    """An agency system registered to call the broker; bound to exactly one agency."""

    __tablename__ = "oauth_clients"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    agency_id: Mapped[str] = mapped_column(ForeignKey("agencies.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    jwks: Mapped[dict] = mapped_column(JSON)
    """Public keys (a JWK Set) that verify this client's signed assertions."""
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime]


class UsedAssertion(Base):
    """Client assertion ids already seen, kept until they expire (RFC 7523 replay defence)."""

    __tablename__ = "used_assertions"

    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    """``broker.auth.client_assertion.replay_key(client_id, jti)``: per client, fixed length."""
    client_id: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Youth(Base):
    """A youth served by a CSEC MDT, under a pseudonymous broker id."""

    __tablename__ = "youth"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    birth_date: Mapped[date | None] = mapped_column(Date, nullable=True)
    removed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Removed from parental custody: a parent may then not authorise mental health release (Civ. 56.106)."""
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))


class YouthIdentifier(Base):
    """How one source system identifies the youth; one source id links to one youth only."""

    __tablename__ = "youth_identifiers"
    __table_args__ = (UniqueConstraint("system", "value", name="uq_youth_identifiers_system_value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    youth_id: Mapped[str] = mapped_column(ForeignKey("youth.id"), index=True)
    source: Mapped[str] = mapped_column(String(64))
    system: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(String(255))


class Mdt(Base):
    """A multidisciplinary team for one youth, led by one agency."""

    __tablename__ = "mdts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    youth_id: Mapped[str] = mapped_column(ForeignKey("youth.id"), index=True)
    lead_agency_id: Mapped[str] = mapped_column(ForeignKey("agencies.id"))
    opened_at: Mapped[datetime]
    closed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))


class MembershipRow(Base):
    """A person's place on an MDT for a period; ending it sets valid_to, nothing is deleted."""

    __tablename__ = "memberships"
    __table_args__ = (Index("ix_memberships_mdt_sub", "mdt_id", "sub"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    mdt_id: Mapped[str] = mapped_column(ForeignKey("mdts.id"))
    agency_id: Mapped[str] = mapped_column(ForeignKey("agencies.id"))
    sub: Mapped[str] = mapped_column(String(128))
    team_role: Mapped[str] = mapped_column(String(64))
    statutory: Mapped[bool] = mapped_column(Boolean, default=False)
    valid_from: Mapped[datetime]
    valid_to: Mapped[datetime | None] = mapped_column(nullable=True)
    added_by: Mapped[str] = mapped_column(String(128))
    ended_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class AuditEventRow(Base):
    """One audit event in the hash chain; ``body`` is the canonical JSON that was hashed."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(index=True)
    request_id: Mapped[str] = mapped_column(String(64))
    youth_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    mdt_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actor_sub: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    actor_agency: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actor_role: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[str | None] = mapped_column(String(80), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """Single row holding the chain head; locked by each append so the chain never forks."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class PolicyVersion(Base):
    """A policy version that has been in force, identified by the hash of its files."""

    __tablename__ = "policy_versions"

    hash: Mapped[str] = mapped_column(String(80), primary_key=True)
    loaded_at: Mapped[datetime]
    files: Mapped[dict] = mapped_column(JSON)
    """File name -> sha256 of its bytes."""


class ConsentRow(Base):
    """A validated consent or authorization, with the FHIR Consent as filed and indexed terms.

    ``recipients`` is a list of ``{"kind": "person"|"role"|"agency", "value": str}``.
    ``ground`` is the policy ground it yields (consent-part2, consent-hiv, consent-cmia, ...).
    """

    __tablename__ = "consents"
    __table_args__ = (Index("ix_consents_youth_status", "youth_id", "status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    youth_id: Mapped[str] = mapped_column(ForeignKey("youth.id"))
    status: Mapped[str] = mapped_column(String(16))
    form: Mapped[str] = mapped_column(String(32))
    signer_capacity: Mapped[str] = mapped_column(String(32))
    signer_reference: Mapped[str] = mapped_column(String(255))
    categories: Mapped[list[str]] = mapped_column(JSON)
    recipients: Mapped[list[dict]] = mapped_column(JSON)
    purposes: Mapped[list[str]] = mapped_column(JSON)
    period_start: Mapped[datetime]
    period_end: Mapped[datetime | None] = mapped_column(nullable=True)
    expiry_event: Mapped[str | None] = mapped_column(String(500), nullable=True)
    disclosure_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    disclosures_used: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    signed_at: Mapped[datetime]
    resource: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class CourtOrderRow(Base):
    """A court order recorded as a ground; the policy decides what it unlocks."""

    __tablename__ = "court_orders"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    youth_id: Mapped[str] = mapped_column(ForeignKey("youth.id"), index=True)
    case_number: Mapped[str] = mapped_column(String(64))
    court: Mapped[str] = mapped_column(String(200))
    categories: Mapped[list[str]] = mapped_column(JSON)
    purposes: Mapped[list[str]] = mapped_column(JSON)
    recipients: Mapped[list[dict]] = mapped_column(JSON)
    period_start: Mapped[datetime]
    period_end: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class BreakGlassGrant(Base):
    """Emergency access for one member on one MDT, time-limited and queued for review."""

    __tablename__ = "break_glass_grants"
    __table_args__ = (Index("ix_break_glass_mdt_sub", "mdt_id", "sub"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    mdt_id: Mapped[str] = mapped_column(ForeignKey("mdts.id"))
    youth_id: Mapped[str] = mapped_column(ForeignKey("youth.id"))
    sub: Mapped[str] = mapped_column(String(128))
    agency_id: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    """Free text from the requester; never logged, never copied into audit events."""
    granted_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    review_status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    reviewed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    reviewed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    review_note: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditCheckpoint(Base):
    """A signed statement of the chain head (Ed25519): rewriting the whole chain needs the key."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime]
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    """Base64 Ed25519 signature over the canonical JSON of {seq, head_hash, time, key_id}."""
    reason: Mapped[str] = mapped_column(String(32))
    """interval | shutdown | archive | manual"""


class AuditArchive(Base):
    """Events moved out of the live table into a signed, compressed NDJSON file."""

    __tablename__ = "audit_archives"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    first_seq: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    first_prev_hash: Mapped[str] = mapped_column(String(64))
    last_hash: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("audit_checkpoints.id"))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))


class RegistryGeneration(Base):
    """One row (id 1) whose ``value`` database triggers raise on any change to the registry.

    The triggers (migration 0004) fire on every insert, update and delete, whoever makes it (the
    broker, another broker process, an administrator at a SQL prompt), in the writing transaction,
    so the new value becomes visible exactly when the change does. The pipeline keeps each
    requester's resolved context and grounds only as long as this value stays the same
    (``broker/pipeline/context_cache.py``).
    """

    __tablename__ = "registry_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
