"""Establish the legal grounds that hold for a requester on a youth at one instant."""

from __future__ import annotations

from typing import Protocol

from broker.domain import Grounds, RequestContext

MDT_MEMBER = "mdt-member"
OWN_STATUTE = "own-statute"


class GroundsResolver(Protocol):
    """Safe for concurrent use; raises only on programming errors (the pipeline then fails closed)."""

    def resolve(self, ctx: RequestContext) -> Grounds:
        """The grounds that hold now."""
        ...


class MembershipGrounds:
    """``mdt-member`` for an active member; ``own-statute`` when the roster records statutory access."""

    def resolve(self, ctx: RequestContext) -> Grounds:
        """Membership must be active at ``ctx.now``; otherwise no ground holds."""
        m = ctx.membership
        if m is None or not m.active_at(ctx.now):
            return Grounds(items=frozenset())
        items = {MDT_MEMBER}
        if m.statutory:
            items.add(OWN_STATUTE)
        return Grounds(items=frozenset(items), membership_id=m.id)
