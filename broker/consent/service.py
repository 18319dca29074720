"""Consent operations: file, list, read, revoke, and the queries the grounds resolver runs.

Functions are keyword-only, synchronous (run in a worker thread) and take an open Session;
those that write commit. Any refusal of access is ``Forbidden(NO_ACCESS)`` with one text, so
a caller cannot tell an unknown youth or consent id from one they may not see.

Who may do what:
- file and revoke: an active member of an open MDT of the youth whose team role is one of
  ``FILER_ROLES`` (the treating program or the youth's worker or attorney records the
  authorization it received), or the registry admin;
- read: the same people see all of the youth's consents; any other active member sees only the
  consents that name them (a consent's categories would otherwise tell the whole team that
  Part 2 or HIV records exist).
"""

from __future__ import annotations

import copy
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker.consent.validation import YouthFacts, patient_youth_id, validate_consent
from broker.domain import Principal
from broker.errors import NO_ACCESS, Forbidden, Unprocessable
from broker.grounds import recipient_matches
from broker.registry.service import ADMIN_ROLE, active_membership
from broker.store.db import as_utc as _utc
from broker.store.models import Agency, ConsentRow, Mdt, Staff, Youth

FILER_ROLES = frozenset({"child-welfare-worker", "dependency-attorney", "mental-health-clinician",
                         "substance-use-counselor", "public-health-nurse"})
ACTIVE, REVOKED = "active", "revoked"
REVOKED_AT_URL = "https://mdt-broker.example.org/StructureDefinition/revoked-at"




def _membership_role(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> str | None:
    """The requester's team role on an open MDT of the youth, if they are an active member."""
    for mdt in session.scalars(select(Mdt).where(Mdt.youth_id == youth_id).order_by(Mdt.id)).all():
        membership = active_membership(session, mdt=mdt, principal=principal, now=now)
        if membership is not None:
            return membership.team_role
    return None


def _may_write(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> bool:
    if principal.role == ADMIN_ROLE:
        return True
    return _membership_role(session, principal=principal, youth_id=youth_id, now=now) in FILER_ROLES


def _may_read(session: Session, *, principal: Principal, youth_id: str, now: datetime,
              row: ConsentRow | None = None) -> bool:
    """Filers see every consent of the youth; other members only those naming them."""
    if principal.role == ADMIN_ROLE:
        return True
    role = _membership_role(session, principal=principal, youth_id=youth_id, now=now)
    if role is None:
        return False
    return role in FILER_ROLES or (row is not None and recipient_matches(row.recipients, principal))


def _known_recipient(session: Session) -> Any:
    """A named person or agency must be registered, so a typo cannot create a consent nobody matches."""

    def known(kind: str, value: str) -> bool:
        if kind == "agency":
            return session.get(Agency, value) is not None
        return session.get(Staff, value) is not None

    return known


def _stored_resource(resource: dict, consent_id: str) -> dict:
    """The Consent as filed, minus names the broker does not keep (narrative, signer display)."""
    stored = copy.deepcopy(resource)
    stored.pop("text", None)
    stored.pop("meta", None)
    stored["id"] = consent_id
    for performer in stored.get("performer") or ():
        if isinstance(performer, dict):
            performer.pop("display", None)
    return stored


def render(row: ConsentRow) -> dict:
    """The FHIR R4 Consent for a row; a revoked consent is ``inactive`` (R4 has no revoked status)."""
    resource = copy.deepcopy(row.resource)
    resource["id"] = row.id
    if row.status == ACTIVE:
        resource["status"] = "active"
    else:
        resource["status"] = "inactive"
        revoked = _utc(row.revoked_at)
        if revoked is not None:
            ext = [e for e in resource.get("extension") or () if e.get("url") != REVOKED_AT_URL]
            ext.append({"url": REVOKED_AT_URL, "valueDateTime": revoked.isoformat().replace("+00:00", "Z")})
            resource["extension"] = ext
    return resource


def file_consent(session: Session, *, principal: Principal, resource: dict, now: datetime,
                 vocabulary: Any) -> dict:
    """Validate and store a Consent; the youth's team decides who may file, the form decides validity."""
    youth_id = patient_youth_id(resource)
    if youth_id is None:
        raise Unprocessable("the consent does not name the youth", issues=[
            ("Consent.patient", "42 CFR 2.31(a)(1): the patient must be referenced as Patient/<broker youth id>")])
    youth = session.get(Youth, youth_id)
    if youth is None or not _may_write(session, principal=principal, youth_id=youth_id, now=now):
        raise Forbidden(NO_ACCESS)
    facts = YouthFacts(youth_id=youth.id, birth_date=youth.birth_date, removed=bool(youth.removed))
    valid = validate_consent(resource, youth=facts, vocabulary=vocabulary, now=now,
                             known_recipient=_known_recipient(session))
    consent_id = f"c-{uuid.uuid4().hex}"
    row = ConsentRow(
        id=consent_id, youth_id=youth.id, status=ACTIVE, form=valid.form, signer_capacity=valid.signer_capacity,
        signer_reference=valid.signer_reference, categories=list(valid.categories),
        recipients=[dict(r) for r in valid.recipients], purposes=list(valid.purposes),
        period_start=valid.period_start, period_end=valid.period_end, expiry_event=valid.expiry_event,
        disclosure_limit=valid.disclosure_limit, disclosures_used=0, signed_at=valid.signed_at,
        resource=_stored_resource(resource, consent_id), created_at=now, created_by=principal.sub,
        revoked_at=None, revoked_by=None)
    session.add(row)
    session.commit()
    return {**render(row), "_youth_id": youth.id}


def list_consents(session: Session, *, principal: Principal, youth_id: str, now: datetime,
                  base_url: str = "") -> dict:
    """A searchset of the youth's consents, revoked ones included, with no total (counts leak)."""
    if session.get(Youth, youth_id) is None or _membership_role(
            session, principal=principal, youth_id=youth_id, now=now) is None and principal.role != ADMIN_ROLE:
        raise Forbidden(NO_ACCESS)
    rows = [row for row in session.scalars(select(ConsentRow).where(ConsentRow.youth_id == youth_id)
                                           .order_by(ConsentRow.created_at, ConsentRow.id)).all()
            if _may_read(session, principal=principal, youth_id=youth_id, now=now, row=row)]
    bundle: dict = {"resourceType": "Bundle", "id": uuid.uuid4().hex, "type": "searchset",
                    "link": [{"relation": "self", "url": f"{base_url}/consents?youth={youth_id}"}]}
    if rows:
        bundle["entry"] = [{"fullUrl": f"{base_url}/consents/{row.id}", "resource": render(row),
                            "search": {"mode": "match"}} for row in rows]
    return {**bundle, "_youth_id": youth_id}


def _readable_row(session: Session, *, principal: Principal, consent_id: str, now: datetime,
                  write: bool) -> ConsentRow:
    row = session.get(ConsentRow, consent_id)
    if row is None:
        raise Forbidden(NO_ACCESS)
    allowed = (_may_write(session, principal=principal, youth_id=row.youth_id, now=now) if write
               else _may_read(session, principal=principal, youth_id=row.youth_id, now=now, row=row))
    if not allowed:
        raise Forbidden(NO_ACCESS)
    return row


def get_consent(session: Session, *, principal: Principal, consent_id: str, now: datetime) -> dict:
    """One consent, for its filers, the members it names and the registry admin."""
    row = _readable_row(session, principal=principal, consent_id=consent_id, now=now, write=False)
    return {**render(row), "_youth_id": row.youth_id}


def revoke_consent(session: Session, *, principal: Principal, consent_id: str, now: datetime) -> dict:
    """Revoke from this instant; revoking again changes nothing, so retries are safe."""
    row = _readable_row(session, principal=principal, consent_id=consent_id, now=now, write=True)
    if row.status != REVOKED:
        row.status = REVOKED
        row.revoked_at = now
        row.revoked_by = principal.sub
        session.commit()
    return {**render(row), "_youth_id": row.youth_id}


def active_consents(session: Session, *, youth_id: str, now: datetime) -> list[ConsentRow]:
    """Consents in force at ``now``: active, not revoked, and inside their period."""
    rows = session.scalars(select(ConsentRow).where(
        ConsentRow.youth_id == youth_id, ConsentRow.status == ACTIVE, ConsentRow.revoked_at.is_(None))
        .order_by(ConsentRow.created_at, ConsentRow.id)).all()
    out = []
    for row in rows:
        start, end = _utc(row.period_start), _utc(row.period_end)
        if start <= now and (end is None or now < end):
            out.append(row)
    return out


def consume_disclosure(session: Session, *, consent_id: str) -> bool:
    """Take one use of a limited consent atomically; True iff this caller got it (safe under races).

    The conditional UPDATE is one statement: PostgreSQL re-checks the WHERE clause after a
    concurrent writer commits, and SQLite serializes writers, so the limit is never exceeded.
    A consent revoked in the meantime yields nothing.
    """
    result = session.execute(
        update(ConsentRow)
        .where(ConsentRow.id == consent_id, ConsentRow.status == ACTIVE, ConsentRow.revoked_at.is_(None),
               (ConsentRow.disclosure_limit.is_(None))
               | (ConsentRow.disclosures_used < ConsentRow.disclosure_limit))
        .values(disclosures_used=ConsentRow.disclosures_used + 1)
        .execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount == 1
