"""Establish the legal grounds that hold for a requester on a youth at one instant.

Grounds come in tiers so that the broker relies on the least intrusive one that suffices:
the requester's own standing (``mdt-member``, ``own-statute``) first, then documents naming
them for a category (a consent, a court order), and only then an emergency (``break-glass``).
A consent or order counts only for the categories it covers, the purposes it names and the
recipient it names, and only while it is in force at this instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from broker.domain import Principal, RequestContext

MDT_MEMBER = "mdt-member"
OWN_STATUTE = "own-statute"
COURT_ORDER = "court-order"
BREAK_GLASS = "break-glass"


@dataclass(frozen=True)
class Grounds:
    """Grounds for every category (``items``) plus those that hold only for some categories."""

    items: frozenset[str]
    membership_id: str | None = None
    by_category: Mapping[str, frozenset[str]] = field(default_factory=dict)
    consent_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    limited_consents: frozenset[str] = frozenset()
    court_order_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    break_glass_id: str | None = None

    def __contains__(self, ground: str) -> bool:
        return ground in self.items

    @property
    def all_grounds(self) -> frozenset[str]:
        """Every ground that holds for at least one category (for the audit event)."""
        out = set(self.items)
        for extra in self.by_category.values():
            out |= extra
        if self.break_glass_id:
            out.add(BREAK_GLASS)
        return frozenset(out)

    def tiers(self, category: str) -> list[frozenset[str]]:
        """Cumulative ground sets to try in order: standing, then documents, then emergency."""
        first = self.items
        tiers = [first]
        second = first | self.by_category.get(category, frozenset())
        if second != first:
            tiers.append(second)
        if self.break_glass_id:
            tiers.append(second | {BREAK_GLASS})
        return tiers


class GroundsResolver(Protocol):
    """Safe for concurrent use; database errors propagate (the pipeline then fails closed)."""

    def resolve(self, session: Session, ctx: RequestContext) -> Grounds:
        """The grounds that hold at ``ctx.now``."""
        ...


def recipient_matches(recipients: list[dict[str, Any]], principal: Principal) -> bool:
    """A named person, a team role or an agency: any one naming the requester suffices."""
    for r in recipients or ():
        kind, value = r.get("kind"), r.get("value")
        if (kind == "person" and value == principal.sub) or (kind == "role" and value == principal.role) \
                or (kind == "agency" and value == principal.agency):
            return True
    return False


class StoreGrounds:
    """Reads the roster, consents, court orders and break-glass grants in the request's session."""

    def __init__(self, consent_grounds: Mapping[str, str]) -> None:
        self._consent_grounds = dict(consent_grounds)

    def resolve(self, session: Session, ctx: RequestContext) -> Grounds:
        """Every ground in force for this requester, youth, purpose and instant."""
        from broker.breakglass.service import active_break_glass
        from broker.consent.service import active_consents
        from broker.orders.service import active_orders_for

        items: set[str] = set()
        m = ctx.membership
        if m is not None and m.active_at(ctx.now):
            items.add(MDT_MEMBER)
            if m.statutory:
                items.add(OWN_STATUTE)
        by_category: dict[str, set[str]] = {}
        consent_ids: dict[str, list[str]] = {}
        limited: set[str] = set()
        for consent in active_consents(session, youth_id=ctx.youth_id, now=ctx.now):
            if ctx.purpose not in (consent.purposes or ()) or not recipient_matches(consent.recipients,
                                                                                     ctx.principal):
                continue
            if consent.disclosure_limit is not None:
                if consent.disclosures_used >= consent.disclosure_limit:
                    continue
                limited.add(consent.id)
            for category in consent.categories or ():
                ground = self._consent_grounds.get(category)
                if ground is None:  # e.g. psychotherapy notes: no consent ever covers them
                    continue
                by_category.setdefault(category, set()).add(ground)
                consent_ids.setdefault(category, []).append(consent.id)
        order_ids: dict[str, list[str]] = {}
        for order in active_orders_for(session, youth_id=ctx.youth_id, principal=ctx.principal, now=ctx.now):
            if ctx.purpose not in (order.purposes or ()):
                continue
            for category in order.categories or ():
                by_category.setdefault(category, set()).add(COURT_ORDER)
                order_ids.setdefault(category, []).append(order.id)
        grant_id = None
        if m is not None and m.active_at(ctx.now):
            grant = active_break_glass(session, mdt_id=ctx.mdt_id, principal=ctx.principal, now=ctx.now)
            grant_id = grant.id if grant is not None else None
        return Grounds(
            items=frozenset(items),
            membership_id=m.id if m is not None else None,
            by_category={c: frozenset(g) for c, g in by_category.items()},
            consent_ids={c: tuple(ids) for c, ids in consent_ids.items()},
            limited_consents=frozenset(limited),
            court_order_ids={c: tuple(ids) for c, ids in order_ids.items()},
            break_glass_id=grant_id,
        )


def has_court_order(session: Session, *, youth_id: str, principal: Principal, now: datetime) -> bool:
    """Whether an order in force names this requester for this youth (lets a non-member in)."""
    from broker.orders.service import active_orders_for

    return bool(active_orders_for(session, youth_id=youth_id, principal=principal, now=now))
