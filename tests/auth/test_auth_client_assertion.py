"""Client assertions are single-use on SQLite and PostgreSQL, even under a race."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from broker.auth import client_assertion
from broker.auth.client_assertion import purge_used_assertions, replay_key, verify_client_assertion
from broker.auth.tokens import AuthError
from broker.store.models import UsedAssertion

from .conftest import SKEW, World


def _verify(w: World, assertion: str, now: datetime | None = None):
    with w.sessions() as s:
        return verify_client_assertion(s, assertion, settings=w.settings,
                                       now=now or datetime.now(timezone.utc))


def test_verified_client_is_returned_and_jti_recorded(any_world: World) -> None:
    jti = str(uuid.uuid4())
    client = _verify(any_world, any_world.assertion("mh-ehr", jti=jti))
    assert (client.client_id, client.agency_id) == ("mh-ehr", "mh")
    with any_world.sessions() as s:
        row = s.get(UsedAssertion, replay_key("mh-ehr", jti))
        assert row is not None and row.client_id == "mh-ehr"
    with pytest.raises(AuthError) as info:
        _verify(any_world, any_world.assertion("mh-ehr", jti=jti))
    assert info.value.error == "invalid_client"
    assert "already been used" in info.value.description


def test_concurrent_uses_of_one_assertion_admit_exactly_one(any_world: World) -> None:
    assertion = any_world.assertion("cw-cms")
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def use() -> None:
        barrier.wait()
        try:
            _verify(any_world, assertion)
            outcomes.append("ok")
        except AuthError as exc:
            outcomes.append(exc.error)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["invalid_client"] * 5 + ["ok"]


def test_one_clients_jti_does_not_block_another_client(world: World) -> None:
    jti = str(uuid.uuid4())
    _verify(world, world.assertion("cw-cms", jti=jti))
    assert _verify(world, world.assertion("mh-ehr", jti=jti)).client_id == "mh-ehr"


def test_expires_at_is_the_assertion_exp(world: World) -> None:
    t = int(time.time())
    jti = str(uuid.uuid4())
    _verify(world, world.assertion("cw-cms", now=t, exp=t + 200, jti=jti))
    with world.sessions() as s:
        row = s.get(UsedAssertion, replay_key("cw-cms", jti))
        stored = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=timezone.utc)
    assert stored == datetime.fromtimestamp(t + 200, timezone.utc)


def test_purge_removes_only_records_no_assertion_could_match(any_world: World) -> None:
    now = datetime.now(timezone.utc)
    stale, fresh, in_skew = (f"purge-{uuid.uuid4()}" for _ in range(3))
    with any_world.sessions() as s:
        s.add_all([
            UsedAssertion(jti=stale, client_id="cw-cms", expires_at=now - timedelta(seconds=SKEW + 60)),
            UsedAssertion(jti=in_skew, client_id="cw-cms", expires_at=now - timedelta(seconds=SKEW - 10)),
            UsedAssertion(jti=fresh, client_id="cw-cms", expires_at=now + timedelta(seconds=60)),
        ])
        s.commit()
    with any_world.sessions() as s:
        assert purge_used_assertions(s, settings=any_world.settings, now=now) >= 1
    with any_world.sessions() as s:
        assert s.get(UsedAssertion, stale) is None
        assert s.get(UsedAssertion, in_skew) is not None
        assert s.get(UsedAssertion, fresh) is not None


def test_verification_purges_opportunistically(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(timezone.utc)
    with world.sessions() as s:
        s.add(UsedAssertion(jti=f"old-{uuid.uuid4()}", client_id="cw-cms",
                            expires_at=now - timedelta(hours=1)))
        s.commit()
    monkeypatch.setattr(client_assertion, "_last_purge", float("-inf"))
    _verify(world, world.assertion("cw-cms"), now=now)
    with world.sessions() as s:
        left = s.scalar(select(func.count()).select_from(UsedAssertion)
                        .where(UsedAssertion.expires_at < now - timedelta(minutes=30)))
    assert left == 0


def test_a_replay_after_purge_is_still_refused(world: World) -> None:
    """Purging never forgets an assertion that could still pass the exp check."""
    assertion = world.assertion("cw-cms")
    _verify(world, assertion)
    with world.sessions() as s:
        purge_used_assertions(s, settings=world.settings, now=datetime.now(timezone.utc))
    with pytest.raises(AuthError):
        _verify(world, assertion)


def test_naive_now_is_a_programming_error(world: World) -> None:
    with pytest.raises(ValueError):
        _verify(world, world.assertion("cw-cms"), now=datetime.now())
