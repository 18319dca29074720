"""Break-glass grants: create them, list one's own, find the one in force, queue them for review.

Functions are keyword-only, synchronous (run in a worker thread) and take an open Session;
writers commit. Only an active member of an open team may break the glass, and a grant
counts only while that membership lasts. Anything else is the one ``Forbidden(NO_ACCESS)``.
The reason is written to the database for the reviewer and nowhere else: no function here
logs it or returns it.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.breakglass import schemas
from broker.domain import Principal
from broker.errors import NO_ACCESS, Forbidden
from broker.registry.service import active_membership
from broker.store.db import as_utc as _utc
from broker.store.models import BreakGlassGrant, Mdt

BREAK_GLASS = "break-glass"
PENDING = "pending"




def _member_team(session: Session, *, mdt_id: str, principal: Principal, now: datetime) -> Mdt | None:
    """The team, if it is open and the requester is an active member of it right now."""
    mdt = session.get(Mdt, mdt_id)
    if mdt is None or active_membership(session, mdt=mdt, principal=principal, now=now) is None:
        return None
    return mdt


def create_grant(session: Session, *, principal: Principal, mdt_id: str, body: schemas.BreakGlassIn,
                 now: datetime, minutes: int) -> schemas.BreakGlassOut:
    """Open a grant for ``minutes`` for this member, in the role and agency they act in now."""
    mdt = _member_team(session, mdt_id=mdt_id, principal=principal, now=now)
    if mdt is None:
        raise Forbidden(NO_ACCESS)
    grant = BreakGlassGrant(id=f"bg-{uuid.uuid4().hex}", mdt_id=mdt.id, youth_id=mdt.youth_id, sub=principal.sub,
                            agency_id=principal.agency, role=principal.role, purpose=body.purpose,
                            reason=body.reason, granted_at=now, expires_at=now + timedelta(minutes=minutes),
                            review_status=PENDING)
    session.add(grant)
    session.commit()
    return to_out(grant)


def list_own_grants(session: Session, *, principal: Principal, mdt_id: str, now: datetime) -> schemas.BreakGlassList:
    """The requester's own grants on a team they are an active member of, newest first."""
    if _member_team(session, mdt_id=mdt_id, principal=principal, now=now) is None:
        raise Forbidden(NO_ACCESS)
    rows = _own_grants(session, mdt_id=mdt_id, principal=principal)
    return schemas.BreakGlassList(mdt_id=mdt_id, grants=[to_out(r) for r in rows])


def active_break_glass(session: Session, *, mdt_id: str, principal: Principal, now: datetime) -> BreakGlassGrant | None:
    """The requester's most recent grant in force at ``now``, only while their membership is active."""
    if _member_team(session, mdt_id=mdt_id, principal=principal, now=now) is None:
        return None
    now = _utc(now)
    for row in _own_grants(session, mdt_id=mdt_id, principal=principal):
        if _utc(row.granted_at) <= now < _utc(row.expires_at):
            return row
    return None


def _own_grants(session: Session, *, mdt_id: str, principal: Principal) -> list[BreakGlassGrant]:
    """Grants to this person acting in this role for this agency (another role of theirs does not inherit it)."""
    return list(session.scalars(select(BreakGlassGrant).where(
        BreakGlassGrant.mdt_id == mdt_id, BreakGlassGrant.sub == principal.sub,
        BreakGlassGrant.agency_id == principal.agency, BreakGlassGrant.role == principal.role)
        .order_by(BreakGlassGrant.granted_at.desc(), BreakGlassGrant.id.desc())).all())


def pending_reviews(session: Session) -> list[BreakGlassGrant]:
    """Grants not yet reviewed, oldest first, for the review queue."""
    return list(session.scalars(select(BreakGlassGrant).where(BreakGlassGrant.review_status == PENDING)
                                .order_by(BreakGlassGrant.granted_at, BreakGlassGrant.id)).all())


def to_out(row: BreakGlassGrant) -> schemas.BreakGlassOut:
    """The API view of a grant: everything except the reason and the review notes."""
    return schemas.BreakGlassOut(id=row.id, mdt_id=row.mdt_id, purpose=row.purpose, granted_at=_utc(row.granted_at),
                                 expires_at=_utc(row.expires_at), review_status=row.review_status)
