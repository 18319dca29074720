"""No PHI in logs or traces: seed recognisable PHI and prove none of it is written."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from broker import observability
from broker.observability import (
    LOG_KEYS,
    configure_logging,
    configure_tracing,
    get_logger,
    install_tracer_provider,
    stage_span,
    tracer,
)

NAME = "Testy Placeholder"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzdGFmZi00MiJ9.c2ln"
PHI = (NAME, TOKEN, "eyJ", "1990-04-01", "Traceback")


@pytest.fixture(autouse=True)
def _restore_logging_and_tracing():
    """Leave structlog, the root logger and the tracer as other tests expect them."""
    root = logging.getLogger()
    level = root.level
    yield
    configure_tracing("none")
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if getattr(h, observability._HANDLER_MARK, False)]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def log_lines():
    """Configure logging into a buffer; returns a function giving the parsed lines so far."""
    buffer = io.StringIO()
    configure_logging("debug", stream=buffer)

    def lines() -> list[dict]:
        text = buffer.getvalue()
        for secret in PHI:
            assert secret not in text
        return [json.loads(line) for line in text.splitlines()]

    return lines


@pytest.fixture
def spans():
    """Tracing on, into an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracer_provider(provider)
    return exporter


def test_log_keeps_allowed_fields_and_drops_everything_else(log_lines):
    log = get_logger("broker.pipeline")
    log.info("request.done", youth_name=NAME, token=TOKEN, birth_date="1990-04-01", request_id="req-1",
             client_id="probation-cms", route="/mdts/{mdt_id}/record", method="GET", status=200,
             duration_ms=12.5, audit_seq=7, categories_allowed=["general-health"],
             categories_withheld={"substance-use", "mental-health"}, resource={"name": NAME})

    [line] = log_lines()
    assert line.pop("timestamp").endswith("Z")
    assert line == {
        "event": "request.done", "level": "info", "logger": "broker.pipeline", "request_id": "req-1",
        "client_id": "probation-cms", "route": "/mdts/{mdt_id}/record", "method": "GET", "status": 200,
        "duration_ms": 12.5, "audit_seq": 7, "categories_allowed": ["general-health"],
        "categories_withheld": ["mental-health", "substance-use"],
    }


async def test_format_arguments_are_never_interpolated(log_lines):
    log = get_logger("t")
    log.info("lookup %s", NAME)
    log.log(logging.WARNING, "lookup %(name)s", {"name": NAME})
    await log.ainfo("async lookup %s", NAME)
    log.debug("below %s", NAME)
    mine = [l["event"] for l in log_lines() if l["logger"] == "t"]
    assert mine == ["lookup %s", "lookup %(name)s", "async lookup %s", "below %s"]


def test_allowed_keys_with_non_scalar_values_are_dropped(log_lines):
    get_logger("t").warning("odd", request_id={"name": NAME}, source=[NAME], status=200,
                            categories_withheld=[{"display": NAME}], purpose=("treatment", NAME))
    [line] = log_lines()
    assert set(line) == {"event", "level", "logger", "timestamp", "status"}


def test_exceptions_are_reduced_to_their_class_name(log_lines):
    log = get_logger("broker.connectors")
    try:
        raise LookupError(f"no record for {NAME} born 1990-04-01")
    except LookupError as exc:
        log.exception("source.failed", source="county-ehr", token=TOKEN)
        log.error("source.failed.again", exc_info=exc)
        log.error(exc)
    lines = log_lines()
    assert [(l["event"], l.get("error_type"), l["level"]) for l in lines] == [
        ("source.failed", "LookupError", "error"),
        ("source.failed.again", "LookupError", "error"),
        ("LookupError", None, "error"),
    ]
    assert lines[0]["source"] == "county-ehr"
    assert all(set(l) <= LOG_KEYS for l in lines)


def test_stdlib_loggers_pass_through_the_same_allow_list(log_lines):
    library = logging.getLogger("sqlalchemy.engine.Engine")
    library.warning("[cached] %s", {"name": NAME})
    try:
        raise ValueError(NAME)
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application %s", NAME)

    lines = log_lines()
    assert [(l["logger"], l["event"], l["level"], l.get("error_type")) for l in lines] == [
        ("sqlalchemy.engine.Engine", "[cached] %s", "warning", None),
        ("uvicorn.error", "Exception in ASGI application %s", "error", "ValueError"),
    ]
    assert all(set(l) <= LOG_KEYS for l in lines)


def test_level_filters_and_unknown_levels_are_refused():
    buffer = io.StringIO()
    configure_logging("warning", stream=buffer)
    get_logger("t").info("quiet")
    logging.getLogger("lib").info("quiet too")
    get_logger("t").warning("loud")
    assert [json.loads(l)["event"] for l in buffer.getvalue().splitlines()] == ["loud"]
    with pytest.raises(ValueError):
        configure_logging("chatty")


def test_span_keeps_only_allowed_attributes(capsys):
    provider = configure_tracing("console")  # here, not in a fixture: capsys swaps stdout per phase
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))

    with stage_span("policy.decide", route="/mdts/{mdt_id}/record", youth_name=NAME, token=TOKEN,
                    categories_allowed={"general-health"}, purpose="treatment") as span:
        span.set(status=200, audit_seq=3, record={"name": NAME}, source=NAME.split(), policy_version=None)

    [finished] = spans.get_finished_spans()
    assert finished.name == "policy.decide"
    assert dict(finished.attributes) == {"route": "/mdts/{mdt_id}/record", "purpose": "treatment",
                                         "categories_allowed": ("general-health",), "status": 200,
                                         "audit_seq": 3}
    configure_tracing("none")  # shuts the provider down, flushing the console exporter
    printed = capsys.readouterr().out
    assert "policy.decide" in printed and "/mdts/{mdt_id}/record" in printed
    for secret in PHI:
        assert secret not in printed


def test_span_records_only_the_exception_class(spans):
    with pytest.raises(ValueError):
        with stage_span("fetch", source="county-ehr"):
            raise ValueError(f"{NAME} not found")

    [finished] = spans.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.status.description is None
    assert finished.events == ()
    assert dict(finished.attributes) == {"source": "county-ehr", "error_type": "ValueError"}
    assert NAME not in finished.to_json()


def test_log_lines_carry_the_active_span_ids(spans, log_lines):
    with stage_span("audit"):
        get_logger("broker.audit").info("audit.appended", audit_seq=1)
    get_logger("broker.audit").info("outside")

    [finished] = spans.get_finished_spans()
    inside, outside = log_lines()
    assert inside["trace_id"] == format(finished.context.trace_id, "032x")
    assert inside["span_id"] == format(finished.context.span_id, "016x")
    assert "trace_id" not in outside and "span_id" not in outside


def test_tracing_is_off_by_default_and_when_none(spans, log_lines):
    assert configure_tracing("none") is None
    assert isinstance(tracer(), trace.NoOpTracer)
    with stage_span("decide", route="/x") as span:
        span.set(status=200)
        get_logger("t").info("no span")
    assert spans.get_finished_spans() == ()
    assert "trace_id" not in log_lines()[0]


def test_otlp_exporter_builds_a_batching_provider():
    provider = configure_tracing("otlp", "http://127.0.0.1:9/v1/traces", service_name="mdt-broker-test")
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "mdt-broker-test"
    processors = provider._active_span_processor._span_processors
    assert [type(p) for p in processors] == [BatchSpanProcessor]
    assert type(processors[0].span_exporter).__name__ == "OTLPSpanExporter"


def test_unknown_exporter_is_refused():
    with pytest.raises(ValueError):
        configure_tracing("jaeger")  # type: ignore[arg-type]
