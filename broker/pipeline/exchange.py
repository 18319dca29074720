"""The per-request record that the pipeline fills in stage by stage and audits at the end."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from broker.domain import DecisionSet, Principal
from broker.grounds import Grounds


@dataclass
class Exchange:
    """Mutable, private to one request; only ``audit_event`` leaves it, as plain JSON data."""

    action: str
    method: str
    route: str
    request_id: str
    started: datetime
    trace_id: str | None = None
    principal: Principal | None = None
    mdt_id: str | None = None
    youth_id: str | None = None
    purpose: str | None = None
    resource_type: str | None = None
    grounds: Grounds | None = None
    decisions: DecisionSet | None = None
    policy_version: str | None = None
    released_categories: set[str] = field(default_factory=set)
    withheld_categories: set[str] = field(default_factory=set)
    released_count: int = 0
    obligations: set[str] = field(default_factory=set)
    redactions: list[str] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    error: str | None = None
    detail: dict = field(default_factory=dict)
    consent_ids: list[str] = field(default_factory=list)
    evaluated: dict[str, list[str]] = field(default_factory=dict)
    court_order_ids: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, *, action: str, method: str, route: str, request_id: str | None = None) -> "Exchange":
        """Begin a request; the request id is ours, never the caller's."""
        return cls(action=action, method=method, route=route, request_id=request_id or uuid.uuid4().hex,
                   started=datetime.now(timezone.utc))

    def record_documents(self, grounds: Grounds) -> None:
        """Which consents and orders the decisions actually relied on."""
        consents: dict[str, None] = {}
        orders: dict[str, None] = {}
        for d in self.decisions.decisions if self.decisions else ():
            if not d.allowed or d.ground is None:
                continue
            if d.ground.startswith("consent-"):
                consents.update(dict.fromkeys(grounds.consent_ids.get(d.category, ())))
            elif d.ground == "court-order":
                orders.update(dict.fromkeys(grounds.court_order_ids.get(d.category, ())))
        self.consent_ids = list(consents)
        self.court_order_ids = list(orders)

    def audit_event(self, status: int) -> dict:
        """The audit event (fields of DESIGN.md 'Audit event'); identifiers, never record content."""
        p = self.principal
        decisions = self.decisions.decisions if self.decisions else ()
        grounds = self.grounds
        return {
            "time": datetime.now(timezone.utc),
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "action": self.action,
            "method": self.method,
            "route": self.route,
            "client_id": p.client_id if p else None,
            "actor": {"sub": p.sub, "agency": p.agency, "role": p.role} if p else None,
            "youth_id": self.youth_id,
            "mdt_id": self.mdt_id,
            "purpose": self.purpose,
            "resource_type": self.resource_type,
            "grounds": {
                "used": sorted(grounds.all_grounds) if grounds else [],
                "membership_id": grounds.membership_id if grounds else None,
                "consent_ids": self.consent_ids,
                "court_order_ids": self.court_order_ids,
                "break_glass_id": grounds.break_glass_id if grounds else None,
            },
            "break_glass": bool(grounds and grounds.break_glass_id),
            "categories": {
                "requested": sorted(d.category for d in decisions),
                "released": sorted(self.released_categories),
                "withheld": sorted(self.withheld_categories),
            },
            "decisions": [
                {"category": d.category, "effect": d.effect, "ground": d.ground,
                 "grounds_evaluated": self.evaluated.get(d.category, []),
                 "rule": list(d.rule) if d.rule else None, "citation": d.citation}
                for d in decisions
            ],
            "released_count": self.released_count,
            "policy_version": self.policy_version,
            "obligations": sorted(self.obligations),
            "redactions": sorted(set(self.redactions)),
            "sources": self.sources,
            "outcome": status,
            "error": self.error,
            "detail": self.detail,
        }
