"""An exception in any stage is a 503 or a deny, never data; a failing source is only a warning."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from connectors.fhir import FhirConnector
from tests.support.ports import free_port

PATH = "/mdts/mdt-alpha/fhir/Observation"


def _boom(*_a, **_k):
    raise RuntimeError("injected failure with Testy Placeholder in the message")


class _NoConnections:
    def connect(self, *_a, **_k):
        raise RuntimeError("injected failure with Testy Placeholder in the message")

    raw_connection = connect


@pytest.mark.parametrize("stage", ["grounds", "decide", "classify", "label", "context", "context-read",
                                   "context-read-inline"])
async def test_a_failing_stage_releases_nothing(broker, monkeypatch, stage):
    """``context`` and ``grounds``: resolving a context the cache may not use (the registry
    changed) fails; ``context-read``: the generation read every request makes, kept context or
    not, cannot be made on the event loop and fails in the worker thread;
    ``context-read-inline``: the read on the event loop itself raises."""
    from broker.pipeline.context_cache import UNREAD, InlineGeneration

    rt = broker.runtime
    target = {"grounds": (rt.grounds, "resolve"), "decide": (rt.policy, "decide"),
              "classify": (rt.classifier, "classify"), "label": (rt.labeller, "label"),
              "context": (rt, "sessions"), "context-read": (rt, "engine"),
              "context-read-inline": (InlineGeneration, "read")}[stage]
    token = await broker.token("mh")
    assert (await broker.get(PATH, token=token, purpose="TREAT")).status_code == 200  # its context is now kept
    if stage in ("context", "grounds"):
        with rt.engine.begin() as conn:  # any registry write: the kept context may no longer be used
            conn.exec_driver_sql("UPDATE registry_generation SET value = value + 1")
    if stage == "context-read":
        monkeypatch.setattr(InlineGeneration, "read", lambda _self: UNREAD)
    monkeypatch.setattr(*target, _NoConnections() if stage == "context-read" else _boom)
    r = await broker.get(PATH, token=token, purpose="TREAT")
    assert r.status_code in (403, 503)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "alpha-obs" not in r.text and "Testy" not in r.text


async def test_policy_engine_error_is_a_deny(broker, monkeypatch):
    """The engine itself turns an exception into a deny, and the request releases nothing."""
    from broker.policy.engine import CasbinPolicyEngine

    rt = broker.runtime
    token = await broker.token("mh")
    engine = CasbinPolicyEngine.load(rt.settings.policy_dir, rt.vocabulary)  # fresh: nothing memoized
    monkeypatch.setattr(engine._enforcer, "enforce_ex", _boom)
    monkeypatch.setattr(rt, "policy", engine)
    decision = engine.decide(role="mental-health-clinician", category="general-health", purpose="TREAT",
                             grounds=frozenset({"mdt-member", "own-statute"}))
    assert decision.effect == "deny" and decision.rule is None
    r = await broker.get(PATH, token=token, purpose="TREAT")
    assert r.status_code == 200 and "entry" not in r.json()


@pytest.fixture
async def bad_upstream():
    """A loopback server that misbehaves in several ways (failure injection)."""
    async def slow(_request):
        await asyncio.sleep(5)
        return web.json_response({})

    async def html(_request):
        return web.Response(text="<html>oops</html>", content_type="text/html")

    async def error(_request):
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_get("/slow/{tail:.*}", slow)
    app.router.add_get("/html/{tail:.*}", html)
    app.router.add_get("/error/{tail:.*}", error)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize(("kind", "status"), [("slow", "timeout"), ("html", "unavailable"),
                                              ("error", "unavailable"), ("closed", "unavailable")])
async def test_a_failing_source_is_a_warning_not_a_500(broker, bad_upstream, monkeypatch, kind, status):
    rt = broker.runtime
    good = rt.connectors["county-ehr"]
    base = f"http://127.0.0.1:{free_port()}/fhir" if kind == "closed" else f"{bad_upstream}/{kind}"
    failing = FhirConnector(name="county-ehr", base_url=base, identifier_system=good.identifier_system,
                            default_categories=good.default_categories, resource_types=good.resource_types)
    monkeypatch.setitem(rt.connectors, "county-ehr", failing)
    monkeypatch.setitem(rt.source_timeouts, "county-ehr", 0.5)
    token = await broker.token("mh")
    loop = asyncio.get_running_loop()
    started = loop.time()
    r = await broker.get(PATH, token=token, purpose="TREAT")
    assert loop.time() - started < 3
    await failing.aclose()
    assert r.status_code == 200
    entries = r.json()["entry"]
    assert [e["search"]["mode"] for e in entries] == ["outcome"]
    assert entries[0]["resource"]["issue"][0]["severity"] == "warning"
    assert "oops" not in r.text and "boom" not in r.text
    expected = "did not answer in time" if status == "timeout" else "is unavailable"
    assert expected in entries[0]["resource"]["issue"][0]["diagnostics"]


async def test_a_source_is_not_asked_when_its_default_category_is_denied(broker, monkeypatch):
    """The caregiver may not see general health: the EHR is never asked, and no warning appears."""
    rt = broker.runtime
    calls = []
    connector = rt.connectors["county-ehr"]
    original = connector.search

    async def counting(query, *, timeout):
        calls.append(query.resource_type)
        return await original(query, timeout=timeout)

    monkeypatch.setattr(connector, "search", counting)
    r = await broker.get(PATH, alias="caregiver", purpose="COC")
    assert r.status_code == 200 and "entry" not in r.json() and calls == []
    r = await broker.get(PATH, alias="mh", purpose="TREAT")
    assert calls == ["Observation"]
