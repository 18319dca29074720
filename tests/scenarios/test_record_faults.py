"""GET /mdts/{id}/record when sources misbehave: the rest arrives within the timeout, the audit says which failed.

The failing sources are real HTTP servers on loopback (failure injection), read by the real
FHIR connector; the good source is the Node FHIR test server.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from sqlalchemy import select

from broker.pipeline.record_view import GROUP_URL, SOURCE_STATUS_SYSTEM
from broker.settings import SourceConfig
from broker.store.models import AuditEventRow, YouthIdentifier
from tests.scenarios.harness import EHR_SYSTEM, EHR_TYPES, Broker, start_broker
from tests.support.ports import free_port

RECORD = "/mdts/mdt-alpha/record"
TIMEOUT = 1.0
MARGIN = 1.0  # the broker's grace (0.25 s) plus scheduling on a loaded 2-core machine
FAULTS = {"faulty-hang": "timeout", "faulty-500": "unavailable", "faulty-junk": "unavailable",
          "faulty-html": "unavailable", "faulty-notfhir": "unavailable"}


class FaultServer:
    """One loopback server; the first path segment chooses the misbehaviour. Counts requests."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.base = ""
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            mode = request.match_info["mode"]
            self.hits[mode] = self.hits.get(mode, 0) + 1
            if mode == "hang":  # until the test ends
                await self.stopping.wait()
            if mode == "500":
                return web.Response(status=500, text="internal error mentioning Testy Placeholder")
            if mode == "junk":
                return web.Response(text='{"resourceType": "Bundle", "entry": [', content_type="application/fhir+json")
            if mode == "html":
                return web.Response(text="<html><body>Testy Placeholder</body></html>", content_type="text/html")
            return web.json_response({"hello": "not a FHIR Bundle"})

        app = web.Application()
        app.router.add_get("/{mode}/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()


def _sources(fhir_base: str, fault_base: str) -> list[SourceConfig]:
    sources = [SourceConfig(name="county-ehr", kind="fhir", base_url=fhir_base, identifier_system=EHR_SYSTEM,
                            default_categories=["general-health"], resource_types=EHR_TYPES, timeout=TIMEOUT)]
    for name in FAULTS:
        sources.append(SourceConfig(name=name, kind="fhir", base_url=f"{fault_base}/{name.split('-', 1)[1]}",
                                    identifier_system=f"urn:test:{name}", default_categories=["general-health"],
                                    resource_types=["Observation", "Condition"], timeout=TIMEOUT))
    return sources


async def _broker_with_faults(tmp, fhir_server, faults: FaultServer, **settings) -> Broker:
    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_server.base_url,
                           sources=_sources(fhir_server.base_url, faults.base), **settings)
    with b.runtime.sessions() as s:
        for name in FAULTS:
            s.add(YouthIdentifier(youth_id="y-alpha", source=name, system=f"urn:test:{name}", value="pt-alpha"))
        s.commit()
    return b


@pytest.fixture(scope="module")
async def faults():
    server = FaultServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def faulty_broker(tmp_path_factory, fhir_server, faults) -> Broker:
    b = await _broker_with_faults(tmp_path_factory.mktemp("faulty"), fhir_server, faults,
                                  source_breaker_threshold=1000)
    yield b
    await b.aclose()


def _statuses(bundle: dict) -> dict[str, str]:
    outcome = bundle["entry"][-1]["resource"]
    assert outcome["resourceType"] == "OperationOutcome"
    return {i["details"]["text"]: i["details"]["coding"][0]["code"] for i in outcome["issue"]
            if i["details"]["coding"][0]["system"] == SOURCE_STATUS_SYSTEM}


def _audit(broker: Broker, request_id: str) -> dict:
    with broker.runtime.sessions() as s:
        row = s.scalars(select(AuditEventRow).where(AuditEventRow.request_id == request_id)).one()
    return json.loads(row.body)


async def test_failing_sources_cost_only_their_timeout_and_the_rest_is_returned(faulty_broker):
    token = await faulty_broker.token("mh")
    started = time.monotonic()
    r = await faulty_broker.get(RECORD, token=token, purpose="TREAT")
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert elapsed < TIMEOUT + MARGIN, elapsed
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection" and "total" not in bundle
    assert _statuses(bundle) == {"county-ehr": "ok", **FAULTS}
    data = bundle["entry"][:-1]
    assert data and all(e["resource"]["resourceType"] in EHR_TYPES for e in data)
    assert all(e["extension"][0]["url"] == GROUP_URL for e in data)
    assert "internal error" not in r.text and "<html>" not in r.text and "not a FHIR Bundle" not in r.text

    event = _audit(faulty_broker, r.headers["x-request-id"])
    by_source = {s["source"]: s["status"] for s in event["sources"]}
    assert by_source == {"county-ehr": "ok", **FAULTS}
    assert event["action"] == "record.read" and event["outcome"] == 200


async def test_the_fhir_search_route_also_survives_the_faults(faulty_broker):
    r = await faulty_broker.get("/mdts/mdt-alpha/fhir/Observation", alias="mh", purpose="TREAT")
    assert r.status_code == 200
    outcomes = [e for e in r.json()["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcomes) == len(FAULTS)


async def test_an_open_breaker_answers_at_once_without_asking_the_source(tmp_path, fhir_server, faults):
    b = await _broker_with_faults(tmp_path, fhir_server, faults, source_breaker_threshold=2,
                                  source_breaker_reset_seconds=60)
    try:
        token = await b.token("mh")
        for _ in range(2):
            r = await b.get(RECORD, token=token, purpose="TREAT")
            assert _statuses(r.json())["faulty-hang"] == "timeout"
        hits = dict(faults.hits)
        started = time.monotonic()
        r = await b.get(RECORD, token=token, purpose="TREAT")
        assert time.monotonic() - started < TIMEOUT  # nobody waited for the hanging source
        statuses = _statuses(r.json())
        assert {k: statuses[k] for k in FAULTS} == {k: "unavailable" for k in FAULTS}
        assert statuses["county-ehr"] == "ok"
        assert faults.hits == hits  # the open breakers asked no one
    finally:
        await b.aclose()


async def test_status_list_is_the_same_whatever_policy_skips(faulty_broker):
    """The caregiver may not see general health: nothing is asked, every source still reads ok."""
    r = await faulty_broker.get(RECORD, alias="caregiver", purpose="COC")
    assert r.status_code == 200
    bundle = r.json()
    assert _statuses(bundle) == {name: "ok" for name in ["county-ehr", *FAULTS]}
    assert len(bundle["entry"]) == 1  # only the status outcome
    event = _audit(faulty_broker, r.headers["x-request-id"])
    assert {s["status"] for s in event["sources"]} == {"not-asked"}


async def test_non_member_and_unknown_team_get_the_same_403(faulty_broker):
    a = await faulty_broker.get(RECORD, alias="cw-other", purpose="TREAT")
    b = await faulty_broker.get("/mdts/mdt-nonexistent/record", alias="cw-other", purpose="TREAT")
    assert a.status_code == b.status_code == 403 and a.json() == b.json()


async def test_query_parameters_are_refused(faulty_broker):
    r = await faulty_broker.get(RECORD, alias="mh", purpose="TREAT", _count="5")
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
