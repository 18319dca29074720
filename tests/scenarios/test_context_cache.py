"""A kept context is used only while the registry generation and the clock say nothing changed.

Every test runs on SQLite and PostgreSQL (the generation triggers differ by dialect), over
real HTTP requests through the ASGI app, with changes made the ways they happen in the
field: through the API, by another process (a second engine) or at a SQL prompt, and by
the clock passing an instant stored in the registry.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, text, update

from broker.store.db import make_engine
from broker.store.models import CourtOrderRow, MembershipRow, Staff
from tests.scenarios.harness import Broker

WATCHED = {"agencies", "staff", "youth", "youth_identifiers", "mdts", "memberships", "consents", "court_orders",
           "break_glass_grants"}


SEARCH = "/mdts/mdt-alpha/fhir/Observation"
ROSTER_TABLES = ("mdts", "memberships", "youth_identifiers", "consents", "court_orders", "break_glass_grants")


async def _token(b: Broker, sub: str) -> str:
    r = await b.request_token(agency="cws", sub=sub, role="child-welfare-worker")
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def _add_member(b: Broker, sub: str, *, start: datetime, end: datetime | None) -> None:
    with b.runtime.sessions() as s:
        s.add(Staff(sub=sub, agency_id="cws", roles=["child-welfare-worker"], active=True))
        s.add(MembershipRow(id=f"m-{sub}", mdt_id="mdt-alpha", agency_id="cws", sub=sub,
                            team_role="child-welfare-worker", statutory=True, valid_from=start, valid_to=end,
                            added_by="seed"))
        s.commit()


class Statements:
    """The SQL the broker's own engine runs, to see whether the roster was read again."""

    def __init__(self, b: Broker) -> None:
        self.seen: list[str] = []
        self.engine = b.runtime.engine
        event.listen(self.engine, "before_cursor_execute", self._on)

    def _on(self, _conn, _cursor, statement, *_rest) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(statement.lower())

    def roster_reads(self) -> int:
        return sum(1 for s in self.seen if s.lstrip().startswith("select")
                   and any(f"from {t}" in s for t in ROSTER_TABLES))

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)


async def test_a_quiet_registry_is_read_once_then_one_counter_per_request(fresh_broker: Broker,
                                                                          monkeypatch) -> None:
    from broker.pipeline import context_cache

    b = fresh_broker
    token = await b.token("cw")
    assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 200
    counted: list[str] = []  # the counter is read on the driver (and for SQLite on the event loop), not through events
    inline_read, pooled_read = context_cache.InlineGeneration.read, context_cache.read_generation

    def inline(self):  # type: ignore[no-untyped-def]
        value = inline_read(self)
        if value is not context_cache.UNREAD:
            counted.append("inline")
        return value

    def pooled(engine):  # type: ignore[no-untyped-def]
        counted.append("pooled")
        return pooled_read(engine)

    monkeypatch.setattr(context_cache.InlineGeneration, "read", inline)
    monkeypatch.setattr(context_cache, "read_generation", pooled)
    watch = Statements(b)
    try:
        for _ in range(3):
            assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 200
        assert watch.roster_reads() == 0
        sqlite = b.runtime.engine.dialect.name == "sqlite"
        assert counted == ["inline" if sqlite else "pooled"] * 3
        # another purpose is another answer: resolved afresh
        assert (await b.get(SEARCH, token=token, purpose="TREAT")).status_code in (200, 403)
        assert watch.roster_reads() > 0
    finally:
        watch.close()


async def test_ending_a_membership_through_the_api_takes_effect_on_the_next_request(fresh_broker: Broker) -> None:
    b = fresh_broker
    now = datetime.now(timezone.utc)
    _add_member(b, "staff-cache-api", start=now - timedelta(days=1), end=None)
    token = await _token(b, "staff-cache-api")
    assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 200
    admin = await b.token("admin")
    r = await b.client.delete("/mdts/mdt-alpha/members/m-staff-cache-api",
                              headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code in (200, 204), r.text
    assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 403


@pytest.mark.parametrize("statement", [
    "UPDATE memberships SET valid_to = :now WHERE id = 'm-staff-cache-sql'",
    "DELETE FROM memberships WHERE id = 'm-staff-cache-sql'",
    "UPDATE mdts SET closed_at = :now WHERE id = 'mdt-alpha'",
])
async def test_a_change_made_outside_this_process_takes_effect_on_the_next_request(fresh_broker: Broker,
                                                                                   statement: str) -> None:
    b = fresh_broker
    now = datetime.now(timezone.utc)
    _add_member(b, "staff-cache-sql", start=now - timedelta(days=1), end=None)
    token = await _token(b, "staff-cache-sql")
    assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 200
    assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 200  # from the cache
    other = make_engine(b.runtime.settings.database_url)  # another process, or someone at a SQL prompt
    try:
        with other.begin() as conn:
            conn.execute(text(statement), {"now": datetime.now(timezone.utc) - timedelta(seconds=1)})
    finally:
        other.dispose()
    assert (await b.get(SEARCH, token=token, purpose="COC")).status_code == 403


async def test_an_instant_stored_in_the_registry_ends_a_kept_answer_without_any_write(fresh_broker: Broker) -> None:
    b = fresh_broker
    now = datetime.now(timezone.utc)
    _add_member(b, "staff-cache-ends", start=now - timedelta(days=1), end=now + timedelta(seconds=2))
    _add_member(b, "staff-cache-starts", start=now + timedelta(seconds=2), end=None)
    with b.runtime.sessions() as s:  # a non-member named by a court order that starts later
        s.add(CourtOrderRow(id="co-cache-starts", youth_id="y-alpha", case_number="JV-0000-CACHE",
                            court="Superior Court of Nowhere County (synthetic)", categories=["general-health"],
                            purposes=["HLEGAL"], recipients=[{"kind": "role", "value": "district-attorney"}],
                            period_start=now + timedelta(seconds=2), period_end=None, created_at=now,
                            created_by="seed"))
        s.commit()
    ending, starting = await _token(b, "staff-cache-ends"), await _token(b, "staff-cache-starts")
    da = await b.token("da")
    assert (await b.get(SEARCH, token=ending, purpose="COC")).status_code == 200
    assert (await b.get(SEARCH, token=starting, purpose="COC")).status_code == 403  # a refusal is kept too
    assert (await b.get(SEARCH, token=da, purpose="HLEGAL")).status_code == 403
    with b.runtime.sessions() as s:
        generation = s.execute(text("SELECT value FROM registry_generation")).scalar_one()
    await asyncio.sleep(max(0.0, (now + timedelta(seconds=2.1) - datetime.now(timezone.utc)).total_seconds()))
    assert (await b.get(SEARCH, token=ending, purpose="COC")).status_code == 403
    assert (await b.get(SEARCH, token=starting, purpose="COC")).status_code == 200
    assert (await b.get(SEARCH, token=da, purpose="HLEGAL")).status_code == 200
    with b.runtime.sessions() as s:  # nothing was written: the clock alone ended both answers
        assert s.execute(text("SELECT value FROM registry_generation")).scalar_one() == generation


async def test_every_registry_table_raises_the_generation(fresh_broker: Broker) -> None:
    b = fresh_broker
    tables = {"agencies": "id", "staff": "sub", "youth": "id", "youth_identifiers": "id", "mdts": "id",
              "memberships": "id"}
    with b.runtime.engine.begin() as conn:
        for table, key in tables.items():
            before = conn.execute(text("SELECT value FROM registry_generation")).scalar_one()
            conn.execute(text(f"UPDATE {table} SET {key} = {key}"))
            assert conn.execute(text("SELECT value FROM registry_generation")).scalar_one() > before, table
        before = conn.execute(text("SELECT value FROM registry_generation")).scalar_one()
        conn.execute(update(MembershipRow).where(MembershipRow.id == "no-such-row").values(added_by="x"))
        after = conn.execute(text("SELECT value FROM registry_generation")).scalar_one()
        assert after >= before  # PostgreSQL's statement trigger counts even an empty update; never less
        if conn.dialect.name == "postgresql":
            found = conn.execute(text("SELECT DISTINCT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                      "WHERE t.tgname LIKE 'registry_generation_%'")).scalars()
        else:
            found = conn.execute(text("SELECT DISTINCT tbl_name FROM sqlite_master WHERE type = 'trigger' "
                                      "AND name LIKE 'registry_generation_%'")).scalars()
        assert set(found) == set(WATCHED)  # the consent, order and grant tables too (their API tests pass here)
