"""Keep a requester's resolved context and grounds while nothing they depend on can have changed.

Resolving who the requester is to the team and which grounds hold reads the MDT, the
requester's roster rows, the youth's source links, consents and court orders, and the
requester's break-glass grants: seven queries on every request. Their answer changes only
when one of those rows changes or when the clock passes one of the instants stored in them
(a membership's end, a consent's period, a grant's expiry, ...). So an answer is kept, per
(person, agency, role, MDT, purpose), together with

* the **registry generation** read *before* it was resolved: a counter that database triggers
  raise in the same transaction as any insert, update or delete on the registry tables
  (migration 0004), whoever writes (this process, another broker process, someone at a SQL
  prompt). A request reads the counter first and uses a kept answer only if it is unchanged;
* the **next boundary**: the earliest instant after resolution stored in any of those rows.
  A kept answer is used only before it, so an expiry takes effect at its instant, not later.

A request therefore costs one small query instead of seven while the registry is quiet, and
decides exactly as an uncached request would have at the moment it read the counter. Refusals
are kept the same way (a membership that starts tomorrow is a boundary). The cache is bounded
(oldest half dropped when full) and holds no record content: ids, roles and ground names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, union_all
from sqlalchemy.orm import Session

from broker.store.db import as_utc
from broker.store.models import (BreakGlassGrant, ConsentRow, CourtOrderRow, MembershipRow, Mdt,
                                 RegistryGeneration)

Key = tuple[str, str, str, str, str]
"""(sub, agency, role, mdt_id, purpose): everything resolution reads from the request."""


@dataclass(frozen=True, slots=True)
class Kept:
    generation: int
    until: datetime | None
    """Use only while ``now < until`` (None: no stored instant lies ahead)."""
    value: Any
    """What the pipeline resolved (None for a refusal)."""


_GENERATION = select(RegistryGeneration.value).where(RegistryGeneration.id == 1)
"""Built once: SQLAlchemy keeps a statement's cache key on the object, so reusing it skips regenerating it per request."""


def read_generation(conn: Connection | Session) -> int | None:
    """The registry generation, or None if its row is missing (then nothing is kept)."""
    return conn.execute(_GENERATION).scalar_one_or_none()


def next_boundary(session: Session, *, youth_id: str | None, mdt_id: str, sub: str, now: datetime) -> datetime | None:
    """The earliest instant after ``now`` stored in any row resolution reads; None if there is none."""
    parts = [select(Mdt.opened_at.label("t")).where(Mdt.id == mdt_id),
             select(Mdt.closed_at).where(Mdt.id == mdt_id),
             select(MembershipRow.valid_from).where(MembershipRow.mdt_id == mdt_id, MembershipRow.sub == sub),
             select(MembershipRow.valid_to).where(MembershipRow.mdt_id == mdt_id, MembershipRow.sub == sub),
             select(BreakGlassGrant.granted_at).where(BreakGlassGrant.mdt_id == mdt_id, BreakGlassGrant.sub == sub),
             select(BreakGlassGrant.expires_at).where(BreakGlassGrant.mdt_id == mdt_id, BreakGlassGrant.sub == sub)]
    if youth_id is not None:
        parts += [select(ConsentRow.period_start).where(ConsentRow.youth_id == youth_id),
                  select(ConsentRow.period_end).where(ConsentRow.youth_id == youth_id),
                  select(CourtOrderRow.period_start).where(CourtOrderRow.youth_id == youth_id),
                  select(CourtOrderRow.period_end).where(CourtOrderRow.youth_id == youth_id)]
    ahead = [t for t in (as_utc(v) for (v,) in session.execute(union_all(*parts))) if t is not None and t > now]
    return min(ahead, default=None)


class ContextCache:
    """Thread-safe; ``max_entries`` 0 keeps nothing."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._kept: dict[Key, Kept] = {}
        self._lock = threading.Lock()

    def get(self, key: Key, generation: int | None, now: datetime) -> Kept | None:
        if generation is None or not self.max_entries:
            return None
        kept = self._kept.get(key)
        if kept is None or kept.generation != generation or (kept.until is not None and now >= kept.until):
            return None
        return kept

    def put(self, key: Key, kept: Kept) -> None:
        if kept.generation is None or not self.max_entries:
            return
        with self._lock:
            if len(self._kept) >= self.max_entries:
                for old in list(self._kept)[: max(1, self.max_entries // 2)]:  # insertion order: oldest first
                    del self._kept[old]
            self._kept[key] = kept

    def __len__(self) -> int:
        return len(self._kept)
