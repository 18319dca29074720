"""Logs and traces that cannot carry PHI: every field and span attribute passes an allow-list.

Log lines are JSON on stderr. Only keys in ``LOG_KEYS`` survive, and only with plain scalar
values (or lists of names for the category fields), so a youth's name, an identifier, record
content or a token passed by mistake is dropped, not written. Exceptions are reduced to their
class name because their messages may quote data. Standard-library loggers (uvicorn,
SQLAlchemy, ...) go through the same filter, keeping only their message template.

Tracing is off unless configured ("none" gives no-op spans). ``stage_span`` is the only way
the broker sets span attributes, and it applies ``SPAN_KEYS`` the same way.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, Literal

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Status, StatusCode

TRACER_NAME = "mdt-broker"

LIST_KEYS = frozenset({"categories_requested", "categories_allowed", "categories_released",
                       "categories_withheld"})
"""Keys whose value is a collection of category names (never resource content)."""

SPAN_KEYS = frozenset({
    "request_id", "action", "client_id", "agency", "role", "purpose", "method", "route", "status",
    "duration_ms", "decision", "source", "source_status", "audit_seq", "policy_version",
    "error_type", *LIST_KEYS,
})
"""Span attributes that may be recorded; everything else is dropped silently."""

LOG_KEYS = SPAN_KEYS | {"event", "level", "timestamp", "logger", "trace_id", "span_id", "policy_location"}
"""Log fields that may be written; everything else is dropped silently."""

_SCALARS = (str, int, float, bool)
_HANDLER_MARK = "_mdt_broker_handler"
_provider: TracerProvider | None = None


def configure_logging(level: str = "INFO", *, stream: IO[str] | None = None) -> None:
    """JSON lines to ``stream`` (default stderr) through the allow-list, for structlog and stdlib."""
    numeric = structlog.processors.NAME_TO_LEVEL.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    out = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            add_trace_context,
            reduce_exception,
            keep_allowed_fields,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=_without_format_args(structlog.make_filtering_bound_logger(numeric)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(numeric, out)


@functools.cache
def _without_format_args(base: type) -> type:
    """Logger class that ignores %-style arguments: interpolating them would write their values."""
    namespace = {name: _keep_leading(method, 2 if name in ("log", "alog") else 1)
                 for name, method in vars(base).items()
                 if callable(method) and not name.startswith("_")
                 and name not in ("is_enabled_for", "get_effective_level")}
    return type(f"AllowListed{base.__name__}", (base,), namespace)


def _keep_leading(method: Any, keep: int) -> Any:
    """Wrap a log method so only its first ``keep`` positional arguments reach it."""
    if inspect.iscoroutinefunction(method):
        async def amethod(self: Any, *args: Any, **kw: Any) -> Any:
            return await method(self, *args[:keep], **kw)
        return amethod

    def smethod(self: Any, *args: Any, **kw: Any) -> Any:
        return method(self, *args[:keep], **kw)
    return smethod


def get_logger(name: str) -> Any:
    """A structlog logger that names its module in the ``logger`` field."""
    return structlog.get_logger().bind(logger=name)


def add_trace_context(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Put the active span's ids on the line so logs and traces join up."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def reduce_exception(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace exception info with the class name; messages and tracebacks may quote PHI."""
    exc_info = event_dict.pop("exc_info", None)
    exc = event_dict.pop("exception", None)
    event_dict.pop("stack_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        event_dict.setdefault("error_type", exc_info[0].__name__)
    elif isinstance(exc_info, BaseException):
        event_dict.setdefault("error_type", type(exc_info).__name__)
    elif isinstance(exc, BaseException):
        event_dict.setdefault("error_type", type(exc).__name__)
    if "event" in event_dict and not isinstance(event_dict["event"], str):
        event_dict["event"] = type(event_dict["event"]).__name__
    return event_dict


def keep_allowed_fields(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop every key not in LOG_KEYS and every value that is not a plain scalar."""
    return filter_fields(event_dict, LOG_KEYS)


def filter_fields(fields: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """The allow-listed subset of ``fields``; category lists become sorted lists of names."""
    kept: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in allowed:
            continue
        if key in LIST_KEYS:
            if isinstance(value, list | tuple | set | frozenset) and all(isinstance(v, str) for v in value):
                kept[key] = sorted(value)
        elif value is None or isinstance(value, _SCALARS):
            kept[key] = value
    return kept


def _stdlib_template(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Foreign records keep their logger name; the event is already the unformatted template."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger"] = record.name
    return event_dict


def _route_stdlib_logging(level: int, out: IO[str]) -> None:
    """Send standard-library records through the same allow-list (replacing only our handler)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            _stdlib_template,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            add_trace_context,
            reduce_exception,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            keep_allowed_fields,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        use_get_message=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def configure_tracing(exporter: Literal["none", "console", "otlp"] = "none", endpoint: str | None = None,
                      service_name: str = TRACER_NAME) -> TracerProvider | None:
    """Install the broker's tracer provider; "none" (the default) leaves spans as no-ops.

    The provider is kept in this module rather than set as the OpenTelemetry global, which
    can be set only once per process; reconfiguring shuts the previous provider down.
    """
    span_exporter: SpanExporter | None
    if exporter == "none":
        span_exporter = None
    elif exporter == "console":
        # stdout looked up now: the exporter's default is bound when OpenTelemetry is imported
        span_exporter = ConsoleSpanExporter(service_name=service_name, out=sys.stdout)
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=endpoint)
    else:
        raise ValueError(f"unknown trace exporter {exporter!r}")
    if span_exporter is None:
        install_tracer_provider(None)
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    install_tracer_provider(provider)
    return provider


def install_tracer_provider(provider: TracerProvider | None) -> None:
    """Make ``provider`` the broker's (tests, custom samplers); the previous one is shut down."""
    global _provider
    previous, _provider = _provider, provider
    if previous is not None and previous is not provider:
        previous.shutdown()


def tracer() -> trace.Tracer:
    """The broker's tracer: real when tracing is configured, a no-op otherwise."""
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer(TRACER_NAME)


class StageSpan:
    """A span handle that can only take allow-listed attributes."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set(self, **attrs: Any) -> None:
        """Record the allow-listed subset of ``attrs``."""
        kept = filter_fields(attrs, SPAN_KEYS)
        self._span.set_attributes({k: v for k, v in kept.items() if v is not None})


class _NoStage:
    """What ``stage_span`` gives while tracing is off: no tracer call, no generator, nothing recorded."""

    __slots__ = ()
    handle = StageSpan(trace.INVALID_SPAN)

    def __enter__(self) -> StageSpan:
        return self.handle

    def __exit__(self, *_exc: object) -> None:
        return None


_NO_STAGE = _NoStage()


def stage_span(name: str, **attrs: Any) -> Any:
    """A span for one pipeline stage (a context manager giving a ``StageSpan``).

    On error the span records only the exception's class name: OpenTelemetry's own exception
    recording would copy the message (which may quote PHI) into a span event and the status
    description, so it is switched off here. With tracing off (the default) it costs nothing:
    a stage runs several times per request, and a no-op span still cost ~0.5 ms of them.
    """
    if _provider is None:
        return _NO_STAGE
    return _stage_span(name, **attrs)


@contextmanager
def _stage_span(name: str, **attrs: Any) -> Iterator[StageSpan]:
    with tracer().start_as_current_span(name, record_exception=False,
                                        set_status_on_exception=False) as span:
        handle = StageSpan(span)
        handle.set(**attrs)
        try:
            yield handle
        except BaseException as exc:
            span.set_attribute("error_type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
            raise
