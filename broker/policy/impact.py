"""Impact before change: replay the audit log against a candidate policy and count what would flip.

Each audited decision records the requester's role, the purpose and ``grounds_evaluated`` —
the exact tier of grounds that decided that category. Re-deciding that tuple with the
candidate says whether the same request would now be allowed or denied. The decision space is
small, so re-decisions are memoized per tuple and a 100k-event log replays in seconds.

Limit: only the recorded tier is re-decided. A candidate that would allow a category on a tier
the pipeline did not reach (because an earlier tier was already allowed, or a later one was
never recorded) is not counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from broker.policy.engine import PolicyEngine
from broker.store.models import AuditEventRow

ALLOW_TO_DENY = "allow->deny"
DENY_TO_ALLOW = "deny->allow"
MAX_EXAMPLES = 5

FlipKey = tuple[str, str, str]
"""(role, category, direction)."""


@dataclass
class FlipGroup:
    """How often one role's decisions on one category flip one way, with a few event sequences."""

    count: int = 0
    examples: list[int] = field(default_factory=list)


@dataclass
class ImpactReport:
    """What the candidate would change over the replayed events."""

    candidate_version: str
    since: datetime | None
    events_scanned: int = 0
    events_replayed: int = 0
    decisions_replayed: int = 0
    decisions_skipped: int = 0
    flips: dict[FlipKey, FlipGroup] = field(default_factory=dict)

    @property
    def total_flips(self) -> int:
        """Decisions whose effect would change."""
        return sum(g.count for g in self.flips.values())

    def count(self, direction: str) -> int:
        """Flips in one direction (ALLOW_TO_DENY or DENY_TO_ALLOW)."""
        return sum(g.count for (_r, _c, d), g in self.flips.items() if d == direction)


def impact(sessions: sessionmaker[Session], candidate_engine: PolicyEngine, *, since: datetime | None = None,
           batch: int = 5000) -> ImpactReport:
    """Re-decide every audited decision (time >= since) with the candidate; count flips per role and category."""
    report = ImpactReport(candidate_version=candidate_engine.version, since=since)
    memo: dict[tuple[str, str, str, tuple[str, ...]], str] = {}
    flips = report.flips
    for seq, body in stream_bodies(sessions, since=since, batch=batch):
        report.events_scanned += 1
        event = orjson.loads(body)
        decisions = event.get("decisions")
        if not decisions:
            continue
        actor = event.get("actor") or {}
        role, purpose = actor.get("role"), event.get("purpose")
        if not isinstance(role, str) or not isinstance(purpose, str):
            report.decisions_skipped += len(decisions)
            continue
        report.events_replayed += 1
        for d in decisions:
            category, effect = d.get("category"), d.get("effect")
            grounds = d.get("grounds_evaluated")
            if not isinstance(category, str) or effect not in ("allow", "deny") or not isinstance(grounds, list):
                report.decisions_skipped += 1
                continue
            key = (role, category, purpose, tuple(grounds))
            now = memo.get(key)
            if now is None:
                now = candidate_engine.decide(role=role, category=category, purpose=purpose,
                                              grounds=frozenset(grounds)).effect
                memo[key] = now
            report.decisions_replayed += 1
            if now != effect:
                group = flips.get((role, category, f"{effect}->{now}"))
                if group is None:
                    group = flips[(role, category, f"{effect}->{now}")] = FlipGroup()
                group.count += 1
                if len(group.examples) < MAX_EXAMPLES:
                    group.examples.append(seq)
    return report


def stream_bodies(sessions: sessionmaker[Session], *, since: datetime | None = None,
                  batch: int = 5000) -> Iterator[tuple[int, str]]:
    """(seq, body) in sequence order, one short read per batch (keyset on seq), so memory stays flat."""
    cursor = 0
    bound = None if since is None else _utc(since)
    while True:
        query = select(AuditEventRow.seq, AuditEventRow.body).where(AuditEventRow.seq > cursor)
        if bound is not None:
            query = query.where(AuditEventRow.time >= bound)
        with sessions() as session:
            rows = session.execute(query.order_by(AuditEventRow.seq).limit(batch)).all()
        if not rows:
            return
        yield from rows
        cursor = rows[-1][0]


def format_impact(report: ImpactReport) -> str:
    """A plain-text table counsel can read: one line per (role, category, direction)."""
    since = report.since.date().isoformat() if report.since else "the start of the log"
    lines = [f"candidate {report.candidate_version}",
             f"replayed {report.decisions_replayed} decisions from {report.events_replayed} of "
             f"{report.events_scanned} events since {since}"
             + (f" ({report.decisions_skipped} not replayable)" if report.decisions_skipped else ""),
             f"flips: {report.total_flips} ({report.count(ALLOW_TO_DENY)} allow->deny, "
             f"{report.count(DENY_TO_ALLOW)} deny->allow)"]
    if report.flips:
        rows: list[tuple[Any, ...]] = sorted(((r, c, d, g.count, g.examples) for (r, c, d), g in report.flips.items()),
                                             key=lambda x: (-x[3], x[0], x[1], x[2]))
        width = (max(len(r[0]) for r in rows), max(len(r[1]) for r in rows))
        lines.append("")
        lines.append(f"{'role':<{width[0]}}  {'category':<{width[1]}}  {'direction':<11}  {'count':>7}  examples (seq)")
        for role, category, direction, count, examples in rows:
            lines.append(f"{role:<{width[0]}}  {category:<{width[1]}}  {direction:<11}  {count:>7}  "
                         + ", ".join(str(s) for s in examples))
    return "\n".join(lines)


def _utc(value: datetime) -> datetime:
    """A naive --since is UTC, like every stored time."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
