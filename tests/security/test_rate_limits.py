"""Quotas per client and per remote address: 429, Retry-After, an OperationOutcome, audited.

One broker (scenario harness, real tokens) built with small quotas from its settings; tests that
need a fresh count or a one-second window swap in their own ``RateLimits`` on the pipeline.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import func, select

from broker.app import create_app
from broker.auth.keys import BrokerKey
from broker.ratelimit import RateLimits, Throttled
from broker.runtime import build_runtime
from broker.store.models import AuditEventRow
from tests.scenarios.harness import AGENCIES, PERSONAS, PUBLIC_URL, Broker, make_settings, seed, write_key

PATH = "/mdts/mdt-alpha/fhir/Observation"
MH, CW = PERSONAS["mh"], PERSONAS["cw"]


@pytest.fixture(scope="module")
async def world(tmp_path_factory, fhir_server):  # type: ignore[no-untyped-def]
    """A broker whose quotas come from its settings, and the app (to swap quotas in)."""
    tmp = tmp_path_factory.mktemp("rate-limits")
    url = f"sqlite:///{tmp / 'broker.sqlite'}"
    keys = {a: BrokerKey.from_pem(write_key(tmp / f"{a}.pem").read_bytes()) for a in AGENCIES}
    seed(url, keys)
    settings = make_settings(tmp, url, fhir_server.base_url, rate_limit_per_minute=3,
                             token_rate_limit_per_minute=4, token_rate_limit_per_address_per_minute=50)
    runtime = build_runtime(settings)
    app = create_app(runtime=runtime)
    b = Broker(runtime=runtime, client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                         base_url=PUBLIC_URL), keys=keys)
    yield b, app
    await b.aclose()


def quotas(app, **sizes: int) -> RateLimits:  # type: ignore[no-untyped-def]
    """Fresh counters on the running app; generous defaults for whatever a test does not exercise."""
    limits = RateLimits(**{"per_client": 1000, "token_per_client": 1000, "token_per_address": 1000, **sizes})
    app.state.pipeline.limits = limits
    return limits


def audit_row(b: Broker, request_id: str) -> AuditEventRow:
    with b.runtime.sessions() as s:
        return s.scalars(select(AuditEventRow).where(AuditEventRow.request_id == request_id)).one()


def throttled_token_events(b: Broker) -> int:
    with b.runtime.sessions() as s:
        return s.scalar(select(func.count()).select_from(AuditEventRow)
                        .where(AuditEventRow.action == "oauth.token", AuditEventRow.outcome == 429))


def assert_throttled(r: httpx.Response, window: int = 60) -> None:
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= window
    assert r.headers["content-type"] == "application/fhir+json"
    assert r.json()["issue"][0]["code"] == "throttled"
    assert r.headers["cache-control"] == "no-store"


def test_quota_counts_per_key_and_per_quota() -> None:
    limits = RateLimits(per_client=2, token_per_client=1, token_per_address=1, window_seconds=7)
    limits.admit_client("a")
    limits.admit_client("a")
    with pytest.raises(Throttled) as info:
        limits.admit_client("a")
    assert info.value.status == 429 and 1 <= info.value.retry_after <= 7
    assert info.value.headers == {"Retry-After": str(info.value.retry_after)}
    limits.admit_client("b")  # another client has its own count
    limits.admit_token_client("a")  # and each quota its own
    limits.admit_token_address("a")
    with pytest.raises(Throttled):
        limits.admit_token_address("a")


def test_counting_starts_no_threads_and_forgotten_keys_are_swept(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time as time_module

    from broker.ratelimit import SweptMemoryStorage

    limits = RateLimits(per_client=5, token_per_client=1, token_per_address=1, window_seconds=1)
    started: list[object] = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self), real_start(self))[1])
    for i in range(50):
        limits.admit_client(f"client-{i}")
        if i % 10 == 0:
            time_module.sleep(0.02)  # long enough for the library's 10 ms timer to have finished
    assert started == []  # the library would start a Timer thread for the first hit and after each sweep
    storage = limits._limiter.storage
    assert isinstance(storage, SweptMemoryStorage) and len(storage.storage) == 50
    # after the window and the sweep interval, the next hit sweeps every forgotten key on this thread
    later = time_module.time() + 2
    monkeypatch.setattr("limits.storage.memory.time.time", lambda: later)
    storage._next_sweep = 0.0
    limits.admit_client("client-new")
    assert set(storage.storage) == {k for k in storage.storage if "client-new" in k} and len(storage.storage) == 1
    with pytest.raises(Throttled):  # and counting still works after a sweep
        for _ in range(6):
            limits.admit_client("client-new")


async def test_data_route_quota_from_settings_is_429_audited_and_per_client(world) -> None:  # type: ignore[no-untyped-def]
    b, _app = world
    mh, cw = await b.token("mh"), await b.token("cw")
    for _ in range(3):  # BROKER_RATE_LIMIT_PER_MINUTE=3
        assert (await b.get(PATH, token=mh)).status_code == 200
    r = await b.get(PATH, token=mh)
    assert_throttled(r)
    assert "entry" not in r.text
    row = audit_row(b, r.headers["x-request-id"])
    assert (row.action, row.outcome, row.client_id, row.actor_sub) == ("fhir.search", 429, "bh-system", MH.sub)
    assert (await b.get(PATH, token=cw)).status_code == 200  # another client is unaffected


async def test_data_route_quota_resets_when_its_window_ends(world) -> None:  # type: ignore[no-untyped-def]
    b, app = world
    token = await b.token("mh")
    quotas(app, per_client=2, window_seconds=1)
    assert [(await b.get(PATH, token=token)).status_code for _ in range(3)] == [200, 200, 429]
    await asyncio.sleep(1.05)
    assert (await b.get(PATH, token=token)).status_code == 200


async def test_token_quota_per_client_counts_only_authenticated_requests(world) -> None:  # type: ignore[no-untyped-def]
    b, app = world
    quotas(app, token_per_client=2)
    forged = b.assertion("bh", exp=0)  # refused before the client is authenticated: not counted
    r = await b.client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:"
        "jwt-bearer", "client_assertion": forged, "staff_sub": MH.sub, "staff_role": MH.role})
    assert r.status_code == 401
    assert [(await b.request_token(agency="bh", sub=MH.sub, role=MH.role)).status_code for _ in range(3)] == [
        200, 200, 429]
    r = await b.request_token(agency="bh", sub=MH.sub, role=MH.role)
    assert_throttled(r)
    row = audit_row(b, r.headers["x-request-id"])
    assert (row.action, row.outcome, row.client_id, row.actor_sub) == ("oauth.token", 429, "bh-system", MH.sub)
    assert (await b.request_token(agency="cws", sub=CW.sub, role=CW.role)).status_code == 200


async def test_token_quota_per_address_stops_a_flood_before_any_work(world) -> None:  # type: ignore[no-untyped-def]
    b, app = world
    quotas(app, token_per_address=3)
    junk = {"grant_type": "client_credentials", "client_assertion": "not-a-jwt"}
    for _ in range(3):
        assert (await b.client.post("/oauth/token", data=junk)).status_code == 400
    before = throttled_token_events(b)
    first = await b.client.post("/oauth/token", data=junk)
    assert_throttled(first)
    row = audit_row(b, first.headers["x-request-id"])  # the first refusal in the window is audited ...
    assert (row.client_id, row.actor_sub) == (None, None)
    assert '"remote_address":"127.0.0.1"' in row.body
    for _ in range(5):  # ... the rest of the flood only counted in the log, not written to the chain
        assert_throttled(await b.client.post("/oauth/token", data=junk))
    assert throttled_token_events(b) == before + 1
    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.2.3", 4711)), base_url=PUBLIC_URL)
    async with other:
        form = {"grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": b.assertion("bh"), "staff_sub": MH.sub, "staff_role": MH.role}
        assert (await other.post("/oauth/token", data=form)).status_code == 200  # another address is unaffected


def test_quota_settings_are_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    for name in ("rate_limit_per_minute", "token_rate_limit_per_minute", "token_rate_limit_per_address_per_minute"):
        with pytest.raises(ValidationError):
            make_settings(tmp_path, "sqlite://", "http://127.0.0.1:9", **{name: 0})
    s = make_settings(tmp_path, "sqlite://", "http://127.0.0.1:9")
    assert (s.rate_limit_per_minute, s.token_rate_limit_per_minute, s.token_rate_limit_per_address_per_minute) == (
        6000, 3000, 3000)
