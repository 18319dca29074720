"""Logs and spans carry decisions and timings from an allow-list, never PHI, ids or secrets."""

from __future__ import annotations

import io
import re

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


def _content_strings(value: object, key: str = "") -> set[str]:
    """Free text and identifiers inside released resources: names, addresses, notes, displays, ids."""
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _content_strings(v, k)
    elif isinstance(value, list):
        for v in value:
            out |= _content_strings(v, key)
    elif isinstance(value, str) and key in CONTENT_KEYS and len(value) >= 6 and not value.startswith("http"):
        out.add(value)
    return out


CONTENT_KEYS = {"family", "given", "text", "line", "city", "postalCode", "valueString", "display", "description",
                "birthDate", "id", "value", "reference"}


async def test_the_whole_surface_logs_and_traces_no_record_content_or_secret(tmp_path, fhir_server, telemetry,
                                                                            monkeypatch):
    """Every released string of a five-source record, and every secret the broker holds, stays out."""
    from datetime import datetime, timezone

    from broker.settings import SourceConfig
    from broker.store.models import YouthIdentifier
    from connectors import synthetic
    from tests.scenarios.harness import EHR_SYSTEM, EHR_TYPES, start_broker

    _exporter, stream = telemetry
    urls = synthetic.build_sqlite(tmp_path / "sources")
    sources = [SourceConfig(name="county-ehr", kind="fhir", base_url=fhir_server.base_url,
                            identifier_system=EHR_SYSTEM, default_categories=["general-health"],
                            resource_types=EHR_TYPES, timeout=5), *synthetic.source_configs(urls, timeout=5)]
    b = await start_broker(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite'}", fhir_server.base_url,
                           sources=sources, log_level="DEBUG")
    # building the runtime set its own log level and stream, and switched tracing off: capture anew
    configure_logging("DEBUG", stream=stream)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracer_provider(provider)
    try:
        with b.runtime.sessions() as s:
            for source, value in synthetic.TEST_YOUTH["y-alpha"].items():
                s.add(YouthIdentifier(youth_id="y-alpha", source=source, system=synthetic.identifier_system(source),
                                      value=value))
            s.commit()
        reason = "Canary reason Zyxwquv overdose suspected at Qwertyville shelter"
        released: set[str] = set()
        for alias, purpose in (("cw", "COC"), ("mh", "TREAT"), ("po", "COC")):
            token = await b.token(alias)
            r = await b.get("/mdts/mdt-alpha/record", token=token, purpose=purpose)
            assert r.status_code == 200, r.text
            released |= _content_strings(r.json())
            for rtype in ("Patient", "Observation", "DocumentReference", "EpisodeOfCare"):
                r = await b.get(f"/mdts/mdt-alpha/fhir/{rtype}", token=token, purpose=purpose)
                assert r.status_code in (200, 404), r.text
                released |= _content_strings(r.json())
        token = await b.token("mh")
        r = await b.client.post("/mdts/mdt-alpha/break-glass", json={"purpose": "ETREAT", "reason": reason},
                                headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
        cws_id = synthetic.TEST_YOUTH["y-alpha"]["cws-cms"]
        system = synthetic.identifier_system("cws-cms")
        r = await b.get("/youth", alias="cw", identifier=f"{system}|{cws_id}")
        assert r.status_code == 200, r.text
        r = await b.get("/youth", alias="da", identifier=f"{system}|{cws_id}")  # not on the team: 404
        assert r.status_code == 404
        r = await b.get("/mdts/mdt-alpha/record", alias="da", purpose="HLEGAL")  # refused, audited
        assert r.status_code == 403
        r = await b.client.post("/oauth/token", data={"grant_type": "client_credentials",
                                                       "client_assertion_type":
                                                       "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                                                       "client_assertion": b.assertion("cws", exp=0),
                                                       "staff_sub": "staff-cw", "staff_role": "child-welfare-worker"})
        assert r.status_code in (400, 401)
        # a source failing mid-request: its error path logs too
        monkeypatch.setattr(b.runtime.connectors["cws-cms"], "search",
                            lambda *_a, **_k: (_ for _ in ()).throw(RuntimeError(f"boom {cws_id} {reason}")))
        r = await b.get("/mdts/mdt-alpha/record", alias="cw", purpose="COC")
        assert r.status_code == 200
    finally:
        await b.aclose()

    logs = stream.getvalue()
    spans = exporter.get_finished_spans()
    telemetry_text = "\n".join([
        logs,
        *(f"{k}={v}" for s in spans for k, v in (s.attributes or {}).items()),
        *(f"{k}={v}" for s in spans for e in s.events for k, v in (e.attributes or {}).items()),
        *(f"{k}={v}" for s in spans for k, v in (s.resource.attributes or {}).items()),
        *(s.name for s in spans),
        *(str(s.status.description) for s in spans if s.status.description),
    ])
    # positive control: the telemetry is there, with the decision summaries and the failing source's status
    assert "/mdts/{id}/record" in logs and "source_failed" in logs and "stage_failed" not in logs
    assert {"request", "fetch", "audit"} <= {s.name for s in spans}
    assert any((s.attributes or {}).get("source_status") == "unavailable" for s in spans)
    # the record content: hundreds of distinct strings, none of which may appear
    released -= {"Patient", "Observation", "final", "active", "completed"}
    released = {x for x in released if not re.fullmatch(r"[0-9a-f]{32}", x)}  # Bundle ids are request ids
    released -= {src.name for src in sources}  # the per-source status names configured sources, as logs may
    assert len(released) > 50, sorted(released)[:20]
    leaked = sorted(x for x in released if x in telemetry_text)
    assert leaked == []
    # free text the requester typed, and the identifiers of the youth in every system
    for needle in (reason, "Zyxwquv", "Qwertyville", *synthetic.TEST_YOUTH["y-alpha"].values(), "y-alpha",
                   "mdt-alpha"):
        assert needle not in telemetry_text, needle
    # every secret the broker holds: its token-signing key, the agencies' client keys, issued tokens
    secrets = [line for line in b.runtime.settings.signing_key_file.read_text().splitlines()
               if line and not line.startswith("-----")]
    for key in b.keys.values():
        jwk = key.jwk.as_dict(private=True) if hasattr(key.jwk, "as_dict") else dict(key.jwk)
        secrets.append(jwk["d"])
    secrets.append(token)
    for needle in secrets:
        assert needle not in telemetry_text
