"""Frozen value types that pass between pipeline stages.

Every stage takes and returns these; none of them carries record content except
``FetchedItem``, which never leaves the pipeline except through the response.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Effect = Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The staff member an agency system speaks for, as proven by the access token."""

    sub: str
    agency: str
    role: str
    client_id: str
    scopes: frozenset[str] = frozenset()
    token_id: str = ""
    purpose: str | None = None  # purpose bound into the token, if any


@dataclass(frozen=True, slots=True)
class Membership:
    """One person's place on one MDT for a period (valid_to None = open-ended)."""

    id: str
    mdt_id: str
    agency: str
    sub: str
    team_role: str
    statutory: bool
    valid_from: datetime
    valid_to: datetime | None

    def active_at(self, instant: datetime) -> bool:
        """Active from valid_from inclusive until valid_to exclusive."""
        if instant < self.valid_from:
            return False
        return self.valid_to is None or instant < self.valid_to


@dataclass(frozen=True, slots=True)
class SourceLink:
    """How one source system knows the youth."""

    source: str
    system: str
    value: str


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asks, about which youth, through which MDT, for what purpose, at what instant."""

    request_id: str
    principal: Principal
    mdt_id: str
    youth_id: str
    purpose: str
    now: datetime
    membership: Membership | None
    links: tuple[SourceLink, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """One category's verdict with the rule that decided it (None when no rule matched)."""

    category: str
    effect: Effect
    ground: str | None
    rule: tuple[str, ...] | None
    citation: str | None
    policy_version: str

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


@dataclass(frozen=True, slots=True)
class DecisionSet:
    """All category decisions for one request."""

    decisions: tuple[Decision, ...]
    policy_version: str

    def allowed_categories(self) -> frozenset[str]:
        return frozenset(d.category for d in self.decisions if d.allowed)

    def for_category(self, category: str) -> Decision | None:
        for d in self.decisions:
            if d.category == category:
                return d
        return None


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """Per-source outcome; never says that policy skipped a source."""

    source: str
    status: Literal["ok", "unavailable", "timeout"]


@dataclass(frozen=True, slots=True)
class AuditOutcome:
    """What the audit sink committed."""

    sequence: int
    hash: str


@dataclass(frozen=True)
class FilterResult:
    """Released resources (deep copies, labelled) plus what was withheld, by category only."""

    released: tuple[dict, ...]
    released_categories: frozenset[str]
    withheld_categories: frozenset[str]
    obligations: frozenset[str] = field(default_factory=frozenset)
