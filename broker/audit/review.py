"""The break-glass review queue: every grant waits for a privacy officer's finding; late ones are listed.

Functions are keyword-only and synchronous (run them in a worker thread). The requester's
free-text reason is returned only when the caller asks for it (the routes do so for
privacy officers, who need it to review); nothing here logs it, the reviewer's note, or
puts either into an audit event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from broker.errors import Conflict, Forbidden, NotFound
from broker.registry.schemas import Strict
from broker.store.db import as_utc
from broker.store.models import BreakGlassGrant

PENDING, JUSTIFIED, NOT_JUSTIFIED = "pending", "justified", "not-justified"
STATUSES = ("pending", "reviewed", "all")
NOTE_MAX = 2000


class ReviewIn(Strict):
    finding: Literal["justified", "not-justified"] = Field(description="Whether the emergency access was justified")
    note: str = Field(description=f"The reviewer's note (1-{NOTE_MAX} characters); never logged")

    @field_validator("note")
    @classmethod
    def _present(cls, value: str) -> str:
        """A finding without a note cannot be explained later; the error names the field, never the text."""
        value = value.strip()
        if not 1 <= len(value) <= NOTE_MAX:
            raise ValueError("note length")
        return value


class GrantOut(BaseModel):
    """A grant as auditors see it: everything but the requester's reason."""

    id: str
    mdt_id: str
    youth_id: str
    sub: str
    agency: str
    role: str
    purpose: str
    granted_at: datetime
    expires_at: datetime
    review_status: str
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None


class GrantWithReason(GrantOut):
    """A grant as a privacy officer sees it, with the reason they must judge."""

    reason: str


class GrantList(BaseModel):
    status: str
    grants: list[GrantWithReason | GrantOut]


class OverdueList(BaseModel):
    max_age_hours: int
    as_of: datetime
    grants: list[GrantWithReason | GrantOut]


def view(row: BreakGlassGrant, *, with_reason: bool) -> GrantOut:
    """The API view of a grant; the reason only when asked for."""
    fields = dict(id=row.id, mdt_id=row.mdt_id, youth_id=row.youth_id, sub=row.sub, agency=row.agency_id,
                  role=row.role, purpose=row.purpose, granted_at=as_utc(row.granted_at),
                  expires_at=as_utc(row.expires_at), review_status=row.review_status,
                  reviewed_at=as_utc(row.reviewed_at), reviewed_by=row.reviewed_by, review_note=row.review_note)
    return GrantWithReason(reason=row.reason, **fields) if with_reason else GrantOut(**fields)


def list_grants(session: Session, *, status: str, with_reason: bool) -> list[GrantOut]:
    """Grants by review status (pending, reviewed or all), oldest first."""
    if status not in STATUSES:
        raise ValueError("unknown status")
    q = select(BreakGlassGrant)
    if status == "pending":
        q = q.where(BreakGlassGrant.review_status == PENDING)
    elif status == "reviewed":
        q = q.where(BreakGlassGrant.review_status != PENDING)
    rows = session.scalars(q.order_by(BreakGlassGrant.granted_at, BreakGlassGrant.id)).all()
    return [view(r, with_reason=with_reason) for r in rows]


def record_review(session: Session, *, grant_id: str, body: ReviewIn, reviewer: str, now: datetime) -> GrantOut:
    """Record the one finding a grant gets; a second review is a Conflict, nobody reviews their own grant."""
    row = session.get(BreakGlassGrant, grant_id)
    if row is None:
        raise NotFound("no such break-glass grant")
    if row.sub == reviewer:
        raise Forbidden("nobody may review their own break-glass grant")
    done = session.execute(update(BreakGlassGrant)
                           .where(BreakGlassGrant.id == grant_id, BreakGlassGrant.review_status == PENDING)
                           .values(review_status=body.finding, reviewed_at=now, reviewed_by=reviewer,
                                   review_note=body.note)
                           .execution_options(synchronize_session=False))
    if done.rowcount != 1:
        session.rollback()
        raise Conflict("this break-glass grant has already been reviewed")
    session.commit()
    session.refresh(row)
    return view(row, with_reason=False)


def overdue(sessions: sessionmaker[Session], *, now: datetime, max_age: timedelta,
            with_reason: bool = False) -> list[GrantOut]:
    """Unreviewed grants granted more than ``max_age`` before ``now``, oldest first."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    cutoff = now.astimezone(UTC) - max_age
    with sessions() as session:
        rows = session.scalars(select(BreakGlassGrant)
                               .where(BreakGlassGrant.review_status == PENDING,
                                      BreakGlassGrant.granted_at < cutoff)
                               .order_by(BreakGlassGrant.granted_at, BreakGlassGrant.id)).all()
        return [view(r, with_reason=with_reason) for r in rows]


def format_table(grants: list[GrantOut], *, now: datetime) -> str:
    """A plain-text table for the CLI (no reason, no note)."""
    header = ("grant", "mdt", "youth", "sub", "agency", "role", "purpose", "granted_at", "age_hours")
    lines = [header]
    for g in grants:
        age = (now.astimezone(UTC) - g.granted_at).total_seconds() / 3600
        lines.append((g.id, g.mdt_id, g.youth_id, g.sub, g.agency, g.role, g.purpose,
                      g.granted_at.strftime("%Y-%m-%dT%H:%MZ"), f"{age:.1f}"))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines)
