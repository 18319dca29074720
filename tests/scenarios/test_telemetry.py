"""Logs and spans carry decisions and timings from an allow-list, never PHI, ids or secrets."""

from __future__ import annotations

import io

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.pipeline.context_cache import ContextCache
from broker.observability import configure_logging, install_tracer_provider

STAGES = {"request", "authenticate", "context", "grounds", "decide", "fetch", "filter", "label", "audit"}
# Seeded PHI and identifiers from the synthetic records, plus identifiers of the youth and team.
FORBIDDEN = ["Testy", "Placeholder", "Fakename", "Notarealperson", "pt-alpha", "pt-charlie", "alpha-obs",
             "alpha-cond", "y-alpha", "mdt-alpha", "mdt-charlie", "CE-0001", "2011-04-12"]


@pytest.fixture
def telemetry():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracer_provider(provider)
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    yield exporter, stream
    install_tracer_provider(None)
    configure_logging("WARNING")


async def test_no_phi_ids_or_secrets_in_logs_or_spans(broker, telemetry, monkeypatch):
    exporter, stream = telemetry
    token = await broker.token("mh")
    for rtype in ("Observation", "Condition", "DocumentReference", "Patient"):
        r = await broker.get(f"/mdts/mdt-alpha/fhir/{rtype}", token=token, purpose="TREAT")
        assert r.status_code == 200
    await broker.get("/mdts/mdt-charlie/fhir/Observation", token=token, purpose="TREAT")
    await broker.get("/mdts/mdt-alpha/fhir/Observation", token="garbage.token.here", purpose="TREAT")

    def boom(*_a, **_k):
        raise RuntimeError("Testy Placeholder pt-alpha")

    monkeypatch.setattr(broker.runtime.grounds, "resolve", boom)
    monkeypatch.setattr(ContextCache, "get", lambda *_a: None)  # resolve afresh, so the fault is reached
    assert (await broker.get("/mdts/mdt-alpha/fhir/Observation", token=token, purpose="TREAT")).status_code == 503

    logs = stream.getvalue()
    spans = exporter.get_finished_spans()
    assert "request" in logs and "stage_failed" in logs
    assert STAGES <= {s.name for s in spans}
    attributes = " ".join(f"{k}={v}" for s in spans for k, v in (s.attributes or {}).items())
    events = " ".join(str(e.attributes) for s in spans for e in s.events)
    secrets = [token, broker.runtime.settings.signing_key_file.read_text().splitlines()[1]]
    for needle in FORBIDDEN + secrets:
        assert needle not in logs, needle
        assert needle not in attributes, needle
        assert needle not in events, needle
    assert "mental-health" in logs  # decision summaries are there (category names only)
