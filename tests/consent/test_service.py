"""Consent queries the grounds resolver relies on, against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from broker.consent.service import active_consents, consume_disclosure
from broker.store.db import make_engine, make_sessionmaker, upgrade
from broker.store.models import ConsentRow, Youth

NOW = datetime.now(timezone.utc)
RACERS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sessions(request, tmp_path):  # type: ignore[no-untyped-def]
    """A migrated database with one youth, once per backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'consents.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    upgrade(url)
    engine = make_engine(url)
    maker = make_sessionmaker(engine)
    with maker() as s:
        s.add(Youth(id="y-1", birth_date=None, created_at=NOW, created_by="test"))
        s.commit()
    yield maker
    engine.dispose()


def add(maker, consent_id: str, **overrides) -> None:
    values = dict(id=consent_id, youth_id="y-1", status="active", form="hiv", signer_capacity="youth",
                  signer_reference="RelatedPerson/1", categories=["hiv"], recipients=[{"kind": "role",
                  "value": "public-health-nurse"}], purposes=["TREAT"], period_start=NOW - timedelta(days=1),
                  period_end=None, expiry_event=None, disclosure_limit=1, disclosures_used=0,
                  signed_at=NOW - timedelta(days=1), resource={"resourceType": "Consent"}, created_at=NOW,
                  created_by="test", revoked_at=None, revoked_by=None)
    values.update(overrides)
    with maker() as s:
        s.add(ConsentRow(**values))
        s.commit()


def test_exactly_one_of_many_racing_requests_spends_a_single_disclosure(sessions):
    add(sessions, "c-limited")
    barrier = threading.Barrier(RACERS)
    results: list[bool] = []
    lock = threading.Lock()

    def race() -> None:
        with sessions() as s:
            barrier.wait()
            got = consume_disclosure(s, consent_id="c-limited")
        with lock:
            results.append(got)

    threads = [threading.Thread(target=race) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False] * (RACERS - 1) + [True]
    with sessions() as s:
        assert s.get(ConsentRow, "c-limited").disclosures_used == 1


def test_unlimited_consents_are_always_spendable_and_revoked_ones_never(sessions):
    add(sessions, "c-open", disclosure_limit=None)
    add(sessions, "c-revoked", status="revoked", revoked_at=NOW, revoked_by="staff-x")
    with sessions() as s:
        assert [consume_disclosure(s, consent_id="c-open") for _ in range(3)] == [True] * 3
        assert consume_disclosure(s, consent_id="c-revoked") is False
        assert consume_disclosure(s, consent_id="c-missing") is False


def test_active_consents_are_those_in_force_at_the_instant(sessions):
    add(sessions, "c-now", period_end=NOW + timedelta(days=1))
    add(sessions, "c-later", period_start=NOW + timedelta(hours=1))
    add(sessions, "c-ended", period_end=NOW)  # the end instant is excluded
    add(sessions, "c-revoked", status="revoked", revoked_at=NOW - timedelta(hours=1), revoked_by="staff-x")
    with sessions() as s:
        assert [c.id for c in active_consents(s, youth_id="y-1", now=NOW)] == ["c-now"]
        later = sorted(c.id for c in active_consents(s, youth_id="y-1", now=NOW + timedelta(hours=2)))
        assert later == ["c-later", "c-now"]
        assert active_consents(s, youth_id="y-other", now=NOW) == []
        assert len(s.scalars(select(ConsentRow)).all()) == 4
