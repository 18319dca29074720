"""FhirConnector against misbehaving upstreams: tiny local aiohttp servers inject the failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiohttp import web

from connectors.base import SourceQuery, SourceTimeout, SourceUnavailable
from connectors.fhir import DEFAULT_RESOURCE_TYPES, FhirConnector
from tests.connectors.conftest import DEFAULTS, EHR_SYSTEM

PATIENT = "pt-alpha"
SECRET = "SECRET-RECORD-CONTENT"


class FakeUpstream:
    """One loopback HTTP server whose only route answers with ``handler`` and counts hits."""

    def __init__(self, handler: Callable[[web.Request, "FakeUpstream"], object]) -> None:
        self.handler = handler
        self.hits = 0
        self.release = asyncio.Event()  # slow handlers wait on this; set at stop()
        self.base_url = ""
        self.origin = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> "FakeUpstream":
        async def route(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            return await self.handler(request, self)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", route)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.origin = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.origin}/fhir/R4"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


def fhir(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/fhir+json")


def bundle(entries: list[dict], next_url: str | None = None) -> dict:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


def obs(rid: str, patient: str = PATIENT) -> dict:
    return {"resource": {"resourceType": "Observation", "id": rid, "subject": {"reference": f"Patient/{patient}"},
                         "note": [{"text": SECRET}]}}


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., object]]:
    """Start fake upstreams on demand; all are stopped after the test."""
    started: list[FakeUpstream] = []

    async def start(handler) -> FakeUpstream:  # type: ignore[no-untyped-def]
        server = await FakeUpstream(handler).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def connector_for() -> AsyncIterator[Callable[[FakeUpstream], FhirConnector]]:
    made: list[FhirConnector] = []

    def make(server: FakeUpstream, **kw: object) -> FhirConnector:
        conn = FhirConnector("county-ehr", server.base_url, EHR_SYSTEM, DEFAULTS, DEFAULT_RESOURCE_TYPES, **kw)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        await conn.aclose()


def assert_no_phi(exc: BaseException) -> None:
    text = str(exc)
    assert PATIENT not in text and SECRET not in text and "<html" not in text
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


async def test_slow_upstream_times_out(upstream, connector_for):
    async def slow(request, server):
        await server.release.wait()
        return fhir(bundle([]))

    conn = connector_for(await upstream(slow))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(3):  # a broken connector timeout fails here instead of hanging
        with pytest.raises(SourceTimeout) as info:
            await conn.search(SourceQuery("Observation", PATIENT), timeout=0.3)
        assert loop.time() - started < 2
        assert_no_phi(info.value)
        with pytest.raises(SourceTimeout):
            await conn.read("Observation", "o1", timeout=0.3)


async def test_timeout_covers_all_pages_not_each_page(upstream, connector_for):
    async def paging(request, server):
        await asyncio.sleep(0.15)
        n = int(request.query.get("_offset", "0"))
        return fhir(bundle([obs(f"o{n}")], f"{server.base_url}/Observation?_offset={n + 1}"))

    server = await upstream(paging)
    conn = connector_for(server, max_pages=1000)
    async with asyncio.timeout(5):
        with pytest.raises(SourceTimeout):
            await conn.search(SourceQuery("Observation", PATIENT), timeout=0.8)
    assert 3 <= server.hits <= 7  # every page was fast enough on its own


async def test_html_200_is_unavailable(upstream, connector_for):
    async def html(request, server):
        return web.Response(text=f"<html><body>{SECRET}</body></html>", content_type="text/html")

    conn = connector_for(await upstream(html))
    with pytest.raises(SourceUnavailable, match="not JSON") as info:
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert_no_phi(info.value)


async def test_html_labelled_as_json_is_unavailable(upstream, connector_for):
    async def liar(request, server):
        return web.Response(text=f"<html>{SECRET}</html>", content_type="application/fhir+json")

    conn = connector_for(await upstream(liar))
    with pytest.raises(SourceUnavailable, match="not valid JSON") as info:
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert_no_phi(info.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 500, 503])
async def test_http_error_is_unavailable_without_content(upstream, connector_for, status):
    async def error(request, server):
        return fhir({"resourceType": "OperationOutcome", "issue": [{"diagnostics": f"{SECRET} {PATIENT}"}]}, status)

    conn = connector_for(await upstream(error))
    with pytest.raises(SourceUnavailable, match=f"HTTP {status}") as info:
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert_no_phi(info.value)


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "OperationOutcome", "issue": []},
        {"resourceType": "Bundle", "type": "collection", "entry": []},
        [1, 2, 3],
        "just a string",
    ],
)
async def test_json_that_is_not_a_searchset_is_unavailable(upstream, connector_for, body):
    async def wrong(request, server):
        return fhir(body)

    conn = connector_for(await upstream(wrong))
    with pytest.raises(SourceUnavailable):
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)


async def test_cross_origin_next_link_is_refused_and_never_fetched(upstream, connector_for):
    async def other(request, server):
        return fhir(bundle([obs("stolen")]))

    elsewhere = await upstream(other)

    async def first(request, server):
        return fhir(bundle([obs("o1")], f"{elsewhere.base_url}/Observation?_offset=1"))

    conn = connector_for(await upstream(first))
    with pytest.raises(SourceUnavailable, match="outside the source") as info:
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert elsewhere.hits == 0
    assert_no_phi(info.value)


@pytest.mark.parametrize(
    "make_next",
    [
        lambda s: s.base_url.replace("http://", "https://") + "/Observation?_offset=1",  # scheme
        lambda s: s.base_url.replace("127.0.0.1", "localhost") + "/Observation?_offset=1",  # host
        lambda s: "/fhir/R4/Observation?_offset=1",  # relative
        lambda s: "file:///etc/passwd",
    ],
)
async def test_next_link_must_share_scheme_host_and_port(upstream, connector_for, make_next):
    async def first(request, server):
        if request.query.get("_offset"):
            return fhir(bundle([obs("o2")]))
        return fhir(bundle([obs("o1")], make_next(server)))

    server = await upstream(first)
    conn = connector_for(server)
    with pytest.raises(SourceUnavailable):
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert server.hits == 1


async def test_same_origin_next_link_is_followed(upstream, connector_for):
    async def pages(request, server):
        n = int(request.query.get("_offset", "0"))
        nxt = f"{server.base_url}/Observation?_offset={n + 1}" if n < 2 else None
        return fhir(bundle([obs(f"o{n}"), {"resource": {"resourceType": "OperationOutcome"},
                                            "search": {"mode": "outcome"}}], nxt))

    server = await upstream(pages)
    conn = connector_for(server)
    found = await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert [r["id"] for r in found] == ["o0", "o1", "o2"]
    assert server.hits == 3


async def test_next_link_loop_is_unavailable(upstream, connector_for):
    async def loop(request, server):
        return fhir(bundle([obs("o1")], f"{server.base_url}/Observation?_offset=1"))

    server = await upstream(loop)
    with pytest.raises(SourceUnavailable, match="loop"):
        await connector_for(server).search(SourceQuery("Observation", PATIENT), timeout=5)
    assert server.hits == 2


async def test_another_patients_record_fails_the_search(upstream, connector_for):
    async def leaky(request, server):
        return fhir(bundle([obs("o1"), obs("o2", patient="pt-charlie")]))

    conn = connector_for(await upstream(leaky))
    with pytest.raises(SourceUnavailable, match="another patient") as info:
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert "pt-charlie" not in str(info.value)
    assert_no_phi(info.value)


async def test_another_resource_type_fails_the_search(upstream, connector_for):
    async def mixed(request, server):
        return fhir(bundle([{"resource": {"resourceType": "Condition", "id": "c1",
                                          "subject": {"reference": f"Patient/{PATIENT}"}}}]))

    conn = connector_for(await upstream(mixed))
    with pytest.raises(SourceUnavailable, match="another resource type"):
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)


async def test_includes_are_not_returned_as_matches(upstream, connector_for):
    async def with_include(request, server):
        return fhir(bundle([obs("o1"), {"resource": {"resourceType": "Patient", "id": "pt-charlie"},
                                        "search": {"mode": "include"}}]))

    conn = connector_for(await upstream(with_include))
    found = await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert [r["id"] for r in found] == ["o1"]


async def test_search_sends_patient_filter_and_accept_header(upstream, connector_for):
    seen: list[tuple[str, list[tuple[str, str]], str]] = []

    async def record(request, server):
        seen.append((request.path, list(request.query.items()), request.headers.get("Accept", "")))
        return fhir(bundle([]))

    conn = connector_for(await upstream(record))
    await conn.search(SourceQuery("Observation", PATIENT, (("code", "http://loinc.org|2106-3"),)), timeout=5)
    await conn.search(SourceQuery("Patient", PATIENT), timeout=5)
    assert seen[0] == ("/fhir/R4/Observation",
                       [("code", "http://loinc.org|2106-3"), ("patient", f"Patient/{PATIENT}")],
                       "application/fhir+json")
    assert seen[1][:2] == ("/fhir/R4/Patient", [("_id", PATIENT)])


async def test_redirect_is_not_followed(upstream, connector_for):
    async def elsewhere(request, server):
        return fhir(bundle([obs("stolen")]))

    other = await upstream(elsewhere)

    async def redirect(request, server):
        raise web.HTTPFound(f"{other.base_url}/Observation")

    conn = connector_for(await upstream(redirect))
    with pytest.raises(SourceUnavailable, match="HTTP 302"):
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert other.hits == 0


@pytest.mark.parametrize("status", [404, 410])
async def test_read_gone_or_missing_is_none(upstream, connector_for, status):
    async def gone(request, server):
        return fhir({"resourceType": "OperationOutcome", "issue": []}, status)

    conn = connector_for(await upstream(gone))
    assert await conn.read("Observation", "o1", timeout=5) is None


async def test_read_of_a_different_resource_is_unavailable(upstream, connector_for):
    async def wrong(request, server):
        return fhir({"resourceType": "Observation", "id": "other"})

    conn = connector_for(await upstream(wrong))
    with pytest.raises(SourceUnavailable, match="different resource"):
        await conn.read("Observation", "o1", timeout=5)


async def test_read_server_error_is_unavailable(upstream, connector_for):
    async def broken(request, server):
        return web.Response(status=500, text=SECRET)

    conn = connector_for(await upstream(broken))
    with pytest.raises(SourceUnavailable, match="HTTP 500") as info:
        await conn.read("Observation", "o1", timeout=5)
    assert_no_phi(info.value)


async def test_connection_dropped_mid_response_is_unavailable(upstream, connector_for):
    async def drop(request, server):
        resp = web.StreamResponse(headers={"Content-Type": "application/fhir+json", "Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"resourceType": "Bundle", ')
        request.transport.close()
        return resp

    conn = connector_for(await upstream(drop))
    with pytest.raises(SourceUnavailable, match="request failed") as info:
        await conn.search(SourceQuery("Observation", PATIENT), timeout=5)
    assert_no_phi(info.value)
