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

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select, union_all
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


_GENERATION_SQL = f"SELECT value FROM {RegistryGeneration.__tablename__} WHERE id = 1"


def read_generation(engine: Engine) -> int | None:
    """The registry generation, or None if its row is missing (then nothing is kept).

    One statement on a pooled driver connection: a single statement reads one consistent
    snapshot, and SQLAlchemy's connection, transaction and result machinery cost ~25 times the
    read itself (~260 us against ~10 us on SQLite).
    """
    conn = engine.raw_connection()
    try:
        cursor = conn.cursor()
        try:
            cursor.execute(_GENERATION_SQL)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        conn.close()  # back to the pool, which rolls back what the read began (PostgreSQL)
    return None if row is None else int(row[0])


UNREAD = object()
"""What ``InlineGeneration.read`` returns when it could not read: read with ``read_generation`` instead."""
INLINE_BUSY_MS = 50
"""How long an inline read may wait for a lock before it gives up (and the read goes to a worker thread)."""


class InlineGeneration:
    """The registry generation read on the event loop's own thread, for a SQLite database file.

    Handing a ~10 us read to a worker thread cost ~270 us here (the hand-over and back), more
    than everything else the read involves. In WAL mode a reader takes no lock a writer holds,
    so this read does not wait for the audit writer's commit; it uses its own connection, opened
    on first use and ``query_only``, and each read is its own statement, so it sees every commit
    made before it. A read that meets a lock anyway (WAL readers do only in rare moments, such as
    recovery) gives up after INLINE_BUSY_MS, and any error or missing row gives ``UNREAD``: the
    caller then reads with ``read_generation`` in a worker thread, whose failure is the request's.
    For any other database ``for_engine`` gives None (a network round trip does not belong on
    the event loop).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: Any = None

    @classmethod
    def for_engine(cls, engine: Engine) -> InlineGeneration | None:
        url = engine.url
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" \
                or url.database.startswith("file:"):
            return None
        return cls(url.database)

    def read(self) -> Any:
        """The generation (an int, or None if its row is missing), or ``UNREAD``."""
        try:
            if self._conn is None:
                conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                       timeout=INLINE_BUSY_MS / 1000)
                conn.execute("PRAGMA query_only = ON")
                self._conn = conn
            row = self._conn.execute(_GENERATION_SQL).fetchone()
        except sqlite3.Error:
            self.close()  # the next read opens afresh
            return UNREAD
        return UNREAD if row is None else int(row[0])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


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
