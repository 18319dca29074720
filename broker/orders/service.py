"""Court orders: record, list, read and revoke them; find the orders in force for a requester.

Functions are keyword-only, synchronous (run in a worker thread) and take an open Session;
writers commit. Every refusal to see or change an order, an unknown youth and an unknown
order id all raise the same ``Forbidden(NO_ACCESS)``, so nothing can be probed. Validation
errors are fixed texts that never echo what was sent.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.domain import Principal
from broker.errors import NO_ACCESS, BadRequest, Conflict, Forbidden
from broker.grounds import recipient_matches
from broker.orders import schemas
from broker.registry.service import ADMIN_ROLE, active_membership
from broker.store.db import as_utc as _utc
from broker.store.models import Agency, CourtOrderRow, Mdt, Youth
from broker.vocabulary import Vocabulary

COURT_ORDER = "court-order"
CHILD_WELFARE_WORKER = "child-welfare-worker"
PSYCHOTHERAPY_NOTES = "psychotherapy-notes"
"""Never released through the broker, not even under an order (45 CFR 164.508(a)(2); Evid. 1014)."""




def names_principal(recipients: list[dict[str, Any]], principal: Principal) -> bool:
    """An order names a requester by person (sub), team role or agency; any one suffices."""
    return recipient_matches(recipients, principal)


def in_force(order: CourtOrderRow, now: datetime) -> bool:
    """From period_start inclusive to period_end exclusive, and not revoked by this instant."""
    now = _utc(now)
    if _utc(order.period_start) > now:
        return False
    if order.period_end is not None and now >= _utc(order.period_end):
        return False
    return order.revoked_at is None or _utc(order.revoked_at) > now


def may_record(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> bool:
    """County program staff who receive orders, or a child welfare worker on one of the youth's open teams."""
    if session.get(Youth, youth_id) is None:
        return False
    if principal.role == ADMIN_ROLE:
        return True
    if principal.role != CHILD_WELFARE_WORKER:
        return False
    for mdt in session.scalars(select(Mdt).where(Mdt.youth_id == youth_id)).all():
        if active_membership(session, mdt=mdt, principal=principal, now=now) is not None:
            return True
    return False


def active_orders_for(session: Session, *, youth_id: str, principal: Principal,
                      now: datetime) -> list[CourtOrderRow]:
    """Orders for the youth in force at ``now`` that name the requester (the ``court-order`` ground)."""
    rows = session.scalars(select(CourtOrderRow).where(CourtOrderRow.youth_id == youth_id)
                           .order_by(CourtOrderRow.created_at, CourtOrderRow.id)).all()
    return [r for r in rows if in_force(r, now) and names_principal(r.recipients, principal)]


def create_order(session: Session, *, principal: Principal, body: schemas.CourtOrderIn, now: datetime,
                 vocabulary: Vocabulary) -> schemas.CourtOrderOut:
    """Record an order received from the court; authority is checked before the body's terms."""
    if not may_record(session, principal=principal, youth_id=body.youth_id, now=now):
        raise Forbidden(NO_ACCESS)
    categories = _categories(body.categories, vocabulary)
    purposes = _purposes(body.purposes, vocabulary)
    recipients = _recipients(session, body.recipients, vocabulary)
    start = body.period_start or now
    if start.tzinfo is None or (body.period_end is not None and body.period_end.tzinfo is None):
        raise BadRequest("period_start and period_end must carry a time zone")
    if body.period_end is not None and body.period_end <= start:
        raise BadRequest("period_end must be after period_start")
    row = CourtOrderRow(id=f"co-{uuid.uuid4().hex}", youth_id=body.youth_id, case_number=body.case_number,
                        court=body.court, categories=categories, purposes=purposes, recipients=recipients,
                        period_start=_utc(start), period_end=_utc(body.period_end), created_at=now,
                        created_by=principal.sub, revoked_at=None, revoked_by=None)
    session.add(row)
    session.commit()
    return to_out(row)


def _categories(values: list[str], vocabulary: Vocabulary) -> list[str]:
    """Known categories, without repeats; psychotherapy notes are refused outright."""
    if PSYCHOTHERAPY_NOTES in values:
        raise BadRequest("psychotherapy notes are never released through the broker, even under a court order")
    if any(v not in vocabulary.categories for v in values):
        raise BadRequest("unknown category in categories")
    return list(dict.fromkeys(values))


def _purposes(values: list[str], vocabulary: Vocabulary) -> list[str]:
    """Known purpose-of-use codes, without repeats."""
    if any(v not in vocabulary.purposes for v in values):
        raise BadRequest("unknown purpose of use in purposes")
    return list(dict.fromkeys(values))


def _recipients(session: Session, values: list[schemas.RecipientIn], vocabulary: Vocabulary) -> list[dict]:
    """Roles must be team roles and agencies registered, so a typo cannot silently name nobody."""
    out: dict[tuple[str, str], None] = {}
    for r in values:
        if r.kind == "role" and r.value not in vocabulary.roles:
            raise BadRequest("unknown team role in recipients")
        if r.kind == "agency" and session.get(Agency, r.value) is None:
            raise BadRequest("unknown agency in recipients")
        out[(r.kind, r.value)] = None
    return [{"kind": k, "value": v} for k, v in out]


def list_orders(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> schemas.CourtOrderList:
    """All of the youth's orders for those who may record them; otherwise only the orders naming the caller."""
    rows = session.scalars(select(CourtOrderRow).where(CourtOrderRow.youth_id == youth_id)
                           .order_by(CourtOrderRow.created_at, CourtOrderRow.id)).all()
    if not may_record(session, principal=principal, youth_id=youth_id, now=now):
        rows = [r for r in rows if names_principal(r.recipients, principal)]
        if not rows:
            raise Forbidden(NO_ACCESS)
    return schemas.CourtOrderList(youth_id=youth_id, orders=[to_out(r) for r in rows])


def get_order(session: Session, *, principal: Principal, order_id: str, now: datetime) -> schemas.CourtOrderOut:
    """One order, for those who may record orders for the youth or a requester the order names."""
    row = session.get(CourtOrderRow, order_id)
    if row is None or not (names_principal(row.recipients, principal)
                           or may_record(session, principal=principal, youth_id=row.youth_id, now=now)):
        raise Forbidden(NO_ACCESS)
    return to_out(row)


def revoke_order(session: Session, *, principal: Principal, order_id: str, now: datetime) -> schemas.CourtOrderOut:
    """Record that the order was vacated; it stops counting from this instant and the row is kept."""
    row = session.get(CourtOrderRow, order_id, with_for_update=True)
    if row is None or not may_record(session, principal=principal, youth_id=row.youth_id, now=now):
        raise Forbidden(NO_ACCESS)
    if row.revoked_at is not None:
        raise Conflict("the order is already revoked")
    row.revoked_at, row.revoked_by = now, principal.sub
    session.commit()
    return to_out(row)


def to_out(row: CourtOrderRow) -> schemas.CourtOrderOut:
    """The API view of a stored order."""
    return schemas.CourtOrderOut(
        id=row.id, youth_id=row.youth_id, case_number=row.case_number, court=row.court,
        categories=list(row.categories), purposes=list(row.purposes),
        recipients=[schemas.RecipientIn(kind=r["kind"], value=r["value"]) for r in row.recipients],
        period_start=_utc(row.period_start), period_end=_utc(row.period_end), created_at=_utc(row.created_at),
        created_by=row.created_by, revoked_at=_utc(row.revoked_at), revoked_by=row.revoked_by)
