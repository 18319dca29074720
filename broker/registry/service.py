"""Registry operations: youth, identifiers, MDTs and memberships.

Functions are keyword-only, synchronous (run in a worker thread) and take an open
Session; they commit. Authorization failures raise ``Forbidden(NO_ACCESS)`` with one
text whatever the reason, so a caller cannot tell a missing MDT from one they may not see.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.domain import Membership, Principal, SourceLink
from broker.errors import NO_ACCESS, BadRequest, Conflict, Forbidden, NotFound
from broker.registry import schemas
from broker.store.db import as_utc as _utc
from broker.store.models import Agency, Mdt, MembershipRow, Staff, Youth, YouthIdentifier

ADMIN_ROLE = "registry-admin"
# Roles that may register a youth or open an MDT (the agencies that identify CSEC youth).
REGISTRAR_ROLES = frozenset({ADMIN_ROLE, "child-welfare-worker", "probation-officer"})


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def to_membership(row: MembershipRow) -> Membership:
    """Frozen domain view of a roster row."""
    return Membership(id=row.id, mdt_id=row.mdt_id, agency=row.agency_id, sub=row.sub, team_role=row.team_role,
                      statutory=row.statutory, valid_from=_utc(row.valid_from), valid_to=_utc(row.valid_to))




def mdt_open(mdt: Mdt, now: datetime) -> bool:
    """Open until its closing instant."""
    return mdt.closed_at is None or _utc(mdt.closed_at) > now


def active_membership(session: Session, *, mdt: Mdt, principal: Principal, now: datetime) -> Membership | None:
    """The requester's membership on an open MDT at this instant, matching agency and role."""
    if not mdt_open(mdt, now):
        return None
    rows = session.scalars(select(MembershipRow).where(
        MembershipRow.mdt_id == mdt.id, MembershipRow.sub == principal.sub)).all()
    for row in rows:
        if _held_by(row, principal, now):
            return to_membership(row)
    return None


def _held_by(row: MembershipRow, principal: Principal, now: datetime) -> bool:
    """The roster row is the requester's (person, agency and team role) and in force at ``now``."""
    m = to_membership(row)
    return m.sub == principal.sub and m.agency == principal.agency and m.team_role == principal.role \
        and m.active_at(now)


def youth_links(session: Session, *, youth_id: str) -> tuple[SourceLink, ...]:
    """How each source identifies the youth."""
    rows = session.scalars(select(YouthIdentifier).where(YouthIdentifier.youth_id == youth_id)
                           .order_by(YouthIdentifier.id)).all()
    return tuple(SourceLink(source=r.source, system=r.system, value=r.value) for r in rows)


def create_youth(session: Session, *, principal: Principal, body: schemas.YouthIn, now: datetime,
                 known_sources: frozenset[str]) -> schemas.YouthOut:
    """Register a youth and the identifiers each source uses for them."""
    if principal.role not in REGISTRAR_ROLES:
        raise Forbidden("your role may not register youth")
    for ident in body.identifiers:
        if ident.source not in known_sources:
            raise BadRequest("unknown source in identifiers")
    pairs = [(i.system, i.value) for i in body.identifiers]
    if len(pairs) != len(set(pairs)):
        raise BadRequest("duplicate identifier")
    youth = Youth(id=_new_id("y"), birth_date=body.birth_date, removed=body.removed, created_at=now,
                  created_by=principal.sub)
    session.add(youth)
    session.flush()
    for ident in body.identifiers:
        session.add(YouthIdentifier(youth_id=youth.id, source=ident.source, system=ident.system, value=ident.value))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("an identifier is already linked to another youth") from None
    return schemas.YouthOut(id=youth.id, birth_date=youth.birth_date, removed=youth.removed,
                            identifiers=body.identifiers)


def get_youth(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> schemas.YouthOut:
    """A youth's record, for the registry admin or an active member of one of the youth's MDTs."""
    youth = session.get(Youth, youth_id)
    if youth is None or not _may_see_youth(session, principal=principal, youth_id=youth_id, now=now):
        raise Forbidden(NO_ACCESS)
    return _youth_out(session, youth)


def _youth_out(session: Session, youth: Youth) -> schemas.YouthOut:
    """The API view of a youth with every source link, as stored now."""
    links = youth_links(session, youth_id=youth.id)
    return schemas.YouthOut(id=youth.id, birth_date=youth.birth_date, removed=youth.removed, identifiers=[
        schemas.IdentifierIn(source=link.source, system=link.system, value=link.value) for link in links])


def _may_see_youth(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> bool:
    if principal.role == ADMIN_ROLE:
        return True
    for mdt in session.scalars(select(Mdt).where(Mdt.youth_id == youth_id)).all():
        if active_membership(session, mdt=mdt, principal=principal, now=now):
            return True
    return False


def create_mdt(session: Session, *, principal: Principal, body: schemas.MdtIn, now: datetime) -> schemas.MdtOut:
    """Open an MDT for a youth; the requester must belong to the lead agency (or be an admin)."""
    if principal.role not in REGISTRAR_ROLES:
        raise Forbidden("your role may not open a team")
    if principal.role != ADMIN_ROLE and principal.agency != body.lead_agency:
        raise Forbidden("only the lead agency may open its team")
    if session.get(Agency, body.lead_agency) is None:
        raise BadRequest("unknown lead agency")
    youth = session.get(Youth, body.youth_id)
    open_mdt = session.scalars(select(Mdt).where(Mdt.youth_id == body.youth_id, Mdt.closed_at.is_(None))).first()
    # No such youth, and a youth whose open team the requester may not manage, get the one 403:
    # opening a team must not tell anyone that a youth is registered or already on a team.
    if youth is None or (open_mdt is not None and principal.role != ADMIN_ROLE
                         and principal.agency != open_mdt.lead_agency_id):
        raise Forbidden(NO_ACCESS)
    if open_mdt is not None:
        raise Conflict("the youth already has an open team")
    mdt = Mdt(id=_new_id("mdt"), youth_id=body.youth_id, lead_agency_id=body.lead_agency, opened_at=now,
              closed_at=None, created_by=principal.sub)
    session.add(mdt)
    session.commit()
    return _mdt_out(session, mdt)


def _mdt_out(session: Session, mdt: Mdt) -> schemas.MdtOut:
    rows = session.scalars(select(MembershipRow).where(MembershipRow.mdt_id == mdt.id)
                           .order_by(MembershipRow.valid_from, MembershipRow.id)).all()
    return schemas.MdtOut(id=mdt.id, youth_id=mdt.youth_id, lead_agency=mdt.lead_agency_id,
                          opened_at=_utc(mdt.opened_at), closed_at=_utc(mdt.closed_at),
                          members=[_member_out(r) for r in rows])


def _member_out(row: MembershipRow) -> schemas.MembershipOut:
    return schemas.MembershipOut(id=row.id, sub=row.sub, agency=row.agency_id, team_role=row.team_role,
                                 statutory=row.statutory, valid_from=_utc(row.valid_from),
                                 valid_to=_utc(row.valid_to), added_by=row.added_by, ended_by=row.ended_by)


def load_mdt(session: Session, mdt_id: str) -> Mdt | None:
    """The MDT row, or None."""
    return session.get(Mdt, mdt_id)


def get_mdt(session: Session, *, principal: Principal, mdt_id: str, now: datetime) -> schemas.MdtOut:
    """An MDT and its roster, for its active members and the registry admin."""
    mdt = session.get(Mdt, mdt_id)
    if mdt is None:
        raise Forbidden(NO_ACCESS)
    if principal.role != ADMIN_ROLE and active_membership(session, mdt=mdt, principal=principal, now=now) is None:
        raise Forbidden(NO_ACCESS)
    return _mdt_out(session, mdt)


def _roster_manager(session: Session, *, principal: Principal, mdt_id: str, now: datetime) -> Mdt:
    mdt = session.get(Mdt, mdt_id)
    if mdt is None or (mdt.closed_at is not None and _utc(mdt.closed_at) <= now):
        raise Forbidden(NO_ACCESS)
    if principal.role != ADMIN_ROLE and principal.agency != mdt.lead_agency_id:
        raise Forbidden(NO_ACCESS)
    return mdt


def add_member(session: Session, *, principal: Principal, mdt_id: str, body: schemas.MembershipIn,
               now: datetime, team_roles: frozenset[str]) -> schemas.MembershipOut:
    """Add a member; only the lead agency's staff or the registry admin may change a roster."""
    mdt = _roster_manager(session, principal=principal, mdt_id=mdt_id, now=now)
    if body.team_role not in team_roles:
        raise BadRequest("unknown team role")
    staff = session.get(Staff, body.sub)
    if staff is None or not staff.active or staff.agency_id != body.agency or body.team_role not in staff.roles:
        raise BadRequest("the staff member does not hold that role in that agency")
    valid_from = body.valid_from or now
    if valid_from.tzinfo is None or (body.valid_to is not None and body.valid_to.tzinfo is None):
        raise BadRequest("valid_from and valid_to must carry a time zone")
    if body.valid_to is not None and body.valid_to <= valid_from:
        raise BadRequest("valid_to must be after valid_from")
    for row in session.scalars(select(MembershipRow).where(MembershipRow.mdt_id == mdt.id,
                                                           MembershipRow.sub == body.sub)).all():
        existing = to_membership(row)
        if existing.valid_to is None or existing.valid_to > now:
            raise Conflict("the person already has a current membership on this team")
    row = MembershipRow(id=_new_id("m"), mdt_id=mdt.id, agency_id=body.agency, sub=body.sub,
                        team_role=body.team_role, statutory=body.statutory, valid_from=valid_from,
                        valid_to=body.valid_to, added_by=principal.sub, ended_by=None)
    session.add(row)
    session.commit()
    return _member_out(row)


def end_member(session: Session, *, principal: Principal, mdt_id: str, membership_id: str,
               now: datetime) -> schemas.MembershipOut:
    """End a membership now; the row stays for the audit trail."""
    mdt = _roster_manager(session, principal=principal, mdt_id=mdt_id, now=now)
    row = session.get(MembershipRow, membership_id)
    if row is None or row.mdt_id != mdt.id:
        raise NotFound("no such membership on this team")
    current_end = _utc(row.valid_to)
    if current_end is None or current_end > now:
        row.valid_to = now
        row.ended_by = principal.sub
        session.commit()
    return _member_out(row)


# ---- identity linking -------------------------------------------------------------------

LINKED_ELSEWHERE = ("the identifier is already linked to another youth; if that link is a mistake, "
                    "the registry admin can remove it")
SOURCE_TAKEN = ("the youth already has an identifier in that source; if it is a mistake, "
                "the registry admin can remove it first")
ONLY_ADMIN_UNLINKS = "only the registry admin may remove an identifier link"
NOT_FOUND_BY_IDENTIFIER = "no youth that you may see has that identifier"
"""The one answer to a lookup that is not answered, whatever the reason."""
NO_YOUTH = ""
"""Stands in for the youth id when an identifier is not linked, so the lookup runs the same queries."""
IDENTIFIER_PARAM = "identifier"
_SYSTEM = re.compile(r"^\S{1,255}$")
_VALUE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_TOKEN = 255 + 1 + 64


def may_link(session: Session, *, principal: Principal, youth_id: str, now: datetime) -> bool:
    """The registry admin, or staff of the lead agency of one of the youth's open teams (as for the roster)."""
    if principal.role == ADMIN_ROLE:
        return True
    teams = session.scalars(select(Mdt).where(Mdt.youth_id == youth_id)).all()
    return any(mdt_open(mdt, now) and mdt.lead_agency_id == principal.agency for mdt in teams)


def link_identifiers(session: Session, *, principal: Principal, youth_id: str, body: schemas.IdentifiersIn,
                     now: datetime, source_systems: Mapping[str, str]) -> schemas.YouthOut:
    """Link source identifiers to a youth, all or none; relinking what is already there changes nothing.

    Authority is checked before the body's terms. One source id belongs to one youth (the
    unique constraint decides a race between two requests) and a youth has one id per source.
    """
    if session.get(Youth, youth_id) is None or not may_link(session, principal=principal, youth_id=youth_id,
                                                             now=now):
        raise Forbidden(NO_ACCESS)
    _check_identifiers(body.identifiers, source_systems)
    # Serializes linkers of one youth on PostgreSQL (SQLite transactions are already serial).
    youth = session.scalars(select(Youth).where(Youth.id == youth_id).with_for_update()).one()
    held = {(link.source, link.system, link.value) for link in youth_links(session, youth_id=youth_id)}
    held_sources = {source for source, _system, _value in held}
    for ident in body.identifiers:
        owner = _owner(session, ident.system, ident.value)
        if owner is not None and owner != youth_id:
            raise Conflict(LINKED_ELSEWHERE)
        if owner == youth_id:
            continue
        if ident.source in held_sources:
            raise Conflict(SOURCE_TAKEN)
        session.add(YouthIdentifier(youth_id=youth_id, source=ident.source, system=ident.system, value=ident.value))
    try:
        session.commit()
    except IntegrityError:  # another request linked one of these ids between our check and our insert
        session.rollback()
        if any(_owner(session, i.system, i.value) != youth_id for i in body.identifiers):
            raise Conflict(LINKED_ELSEWHERE) from None
    return _youth_out(session, youth)


def _check_identifiers(identifiers: list[schemas.IdentifierIn], source_systems: Mapping[str, str]) -> None:
    """Known sources, each under its own identifier system, one identifier per source."""
    for ident in identifiers:
        if ident.source not in source_systems:
            raise BadRequest("unknown source in identifiers")
        if ident.system != source_systems[ident.source]:
            raise BadRequest("an identifier's system is not the identifier system of its source")
    pairs = [(i.system, i.value) for i in identifiers]
    if len(pairs) != len(set(pairs)):
        raise BadRequest("duplicate identifier")
    sources = [i.source for i in identifiers]
    if len(sources) != len(set(sources)):
        raise BadRequest("more than one identifier for the same source")


def _owner(session: Session, system: str, value: str) -> str | None:
    """The youth a source id is linked to."""
    return session.scalar(select(YouthIdentifier.youth_id).where(YouthIdentifier.system == system,
                                                                 YouthIdentifier.value == value))


@dataclass(frozen=True)
class Unlinked:
    """What an unlink removed: the source and its systems (never the value) and the youth as it is now."""

    youth: schemas.YouthOut
    source: str
    systems: tuple[str, ...]


def check_source_name(source: str) -> str:
    """A source name as the registry spells them."""
    if not _SOURCE.match(source):
        raise BadRequest("invalid source name")
    return source


def unlink_source(session: Session, *, principal: Principal, youth_id: str, source: str,
                  now: datetime) -> Unlinked:
    """Remove a mistaken link (registry admin only); the audit event keeps which source it was."""
    if principal.role != ADMIN_ROLE:
        raise Forbidden(ONLY_ADMIN_UNLINKS)
    youth = session.scalars(select(Youth).where(Youth.id == youth_id).with_for_update()).one_or_none()
    if youth is None:
        raise NotFound("no such youth")
    rows = session.scalars(select(YouthIdentifier).where(YouthIdentifier.youth_id == youth_id,
                                                         YouthIdentifier.source == source)).all()
    if not rows:
        raise NotFound("the youth has no identifier in that source")
    systems = tuple(sorted({r.system for r in rows}))
    for row in rows:
        session.delete(row)
    session.commit()
    return Unlinked(youth=_youth_out(session, youth), source=source, systems=systems)


def parse_identifier_query(params: list[tuple[str, str]], *, known_systems: frozenset[str]) -> tuple[str, str]:
    """``identifier=<system>|<value>`` (FHIR token syntax), alone; errors never echo what was sent."""
    names = [name for name, _ in params]
    if any(name != IDENTIFIER_PARAM for name in names):
        raise BadRequest("unknown parameter: only identifier is supported")
    if len(names) != 1:
        raise BadRequest("exactly one identifier parameter is required (identifier=<system>|<value>)")
    raw = params[0][1]
    if len(raw) > MAX_TOKEN:
        raise BadRequest("invalid parameter: identifier is too long")
    system, bar, value = raw.partition("|")
    if not bar or not _SYSTEM.match(system) or not _VALUE.match(value):
        raise BadRequest("invalid parameter: identifier (expected <system>|<value>)")
    if system not in known_systems:
        raise BadRequest("invalid parameter: identifier (unknown identifier system)")
    return system, value


@dataclass(frozen=True)
class Lookup:
    """A lookup's answer: ``youth_id`` is None unless the caller may know the youth."""

    youth_id: str | None
    mdts: tuple[str, ...] = ()
    answered_as: tuple[str, ...] = ()
    court_order_ids: tuple[str, ...] = ()


def lookup_youth(session: Session, *, principal: Principal, system: str, value: str, now: datetime) -> Lookup:
    """Find a youth by a source id, for their team's active members and requesters an order names.

    Being on a CSEC team is itself sensitive, so an unknown id and a youth the caller may not
    know run the same three queries (the youth id stands in as ``NO_YOUTH``) and end alike.
    """
    from broker.orders.service import active_orders_for

    linked = _owner(session, system, value)
    youth_id = linked if linked is not None else NO_YOUTH
    teams = session.execute(
        select(Mdt, MembershipRow)
        .outerjoin(MembershipRow, and_(MembershipRow.mdt_id == Mdt.id, MembershipRow.sub == principal.sub))
        .where(Mdt.youth_id == youth_id)
        .order_by(Mdt.opened_at, Mdt.id, MembershipRow.id)).all()
    orders = active_orders_for(session, youth_id=youth_id, principal=principal, now=now)
    open_teams = [mdt for mdt, _row in teams if mdt_open(mdt, now)]
    member_of = {mdt.id for mdt, row in teams if row is not None and mdt_open(mdt, now)
                 and _held_by(row, principal, now)}
    if linked is None or not (member_of or orders):
        return Lookup(youth_id=None)
    mdts = tuple(dict.fromkeys(mdt.id for mdt in open_teams if orders or mdt.id in member_of))
    answered_as = (("mdt-member",) if member_of else ()) + (("court-order",) if orders else ())
    return Lookup(youth_id=linked, mdts=mdts, answered_as=answered_as,
                  court_order_ids=tuple(o.id for o in orders))
