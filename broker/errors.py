"""Errors the API returns, always as a FHIR OperationOutcome and never with a stack trace.

Diagnostics are fixed, human-readable strings chosen by the code that raises: they
never echo request values, record content or identifiers.
"""

from __future__ import annotations

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

FHIR_JSON = "application/fhir+json"


class BrokerError(Exception):
    """An error with an HTTP status and a FHIR issue type, safe to show to the caller."""

    status = 500
    code = "exception"

    def __init__(self, diagnostics: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.headers = headers or {}


class BadRequest(BrokerError):
    status, code = 400, "invalid"


class NotSupported(BrokerError):
    status, code = 400, "not-supported"


class Unauthorized(BrokerError):
    status, code = 401, "login"

    def __init__(self, diagnostics: str = "a valid access token is required", *, error: str = "invalid_token"):
        super().__init__(diagnostics, headers={"WWW-Authenticate": f'Bearer error="{error}"'})


class Forbidden(BrokerError):
    status, code = 403, "forbidden"


class NotFound(BrokerError):
    status, code = 404, "not-found"


class Conflict(BrokerError):
    status, code = 409, "conflict"


class PayloadTooLarge(BrokerError):
    status, code = 413, "too-costly"


class Unprocessable(BrokerError):
    """A well-formed request whose content is refused; ``issues`` name each element at fault."""

    status, code = 422, "invalid"

    def __init__(self, diagnostics: str, *, issues: list[tuple[str, str]] | None = None) -> None:
        super().__init__(diagnostics)
        self.issues = issues or []


class Unavailable(BrokerError):
    status, code = 503, "transient"


# One 403 text for every "not a member / no such MDT / no such youth" so nothing can be probed.
NO_ACCESS = "you do not have access to this team"


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict:
    """A minimal FHIR R4 OperationOutcome."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


OPERATION_OUTCOME_SCHEMA = {
    "title": "OperationOutcome", "type": "object", "description": "FHIR R4 OperationOutcome: every error body",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["severity", "code"],
            "properties": {"severity": {"type": "string", "enum": ["fatal", "error", "warning", "information"]},
                           "code": {"type": "string"}, "diagnostics": {"type": "string"},
                           "expression": {"type": "array", "items": {"type": "string"}}}}},
    },
}


def document_errors(doc: dict, *, edge: dict[int, str]) -> None:
    """Make the OpenAPI document say what errors really look like.

    Responses described as "OperationOutcome..." get that schema in FHIR JSON; FastAPI's automatic
    422 goes, because ``_validation_handler`` answers request validation errors with 400; every
    operation lists the statuses the edge middlewares can answer (``edge``).
    """
    doc.setdefault("components", {}).setdefault("schemas", {})["OperationOutcome"] = OPERATION_OUTCOME_SCHEMA
    for methods in doc.get("paths", {}).values():
        for operation in methods.values():
            responses = operation.setdefault("responses", {})
            if responses.get("422", {}).get("description") == "Validation Error":
                del responses["422"]
                responses.setdefault("400", {"description": "OperationOutcome: invalid request"})
            for status, text in edge.items():
                responses.setdefault(str(status), {"description": text})
            for status, response in responses.items():
                if (int(status) >= 400 and "content" not in response
                        and response.get("description", "").startswith("OperationOutcome")):
                    response["content"] = {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}
    if "HTTPValidationError" not in str(doc["paths"]):
        for unused in ("HTTPValidationError", "ValidationError"):
            doc["components"]["schemas"].pop(unused, None)


def outcome_response(status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> Response:
    """Serialize an OperationOutcome response."""
    return Response(orjson.dumps(operation_outcome(code, diagnostics)), status_code=status,
                    media_type=FHIR_JSON, headers=headers)


def error_response(err: BrokerError) -> Response:
    """The response for a BrokerError; an Unprocessable lists one issue per element at fault."""
    issues = getattr(err, "issues", None)
    if issues:
        body = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": err.code, "diagnostics": text, "expression": [expression]}
            for expression, text in issues]}
        return Response(orjson.dumps(body), status_code=err.status, media_type=FHIR_JSON, headers=err.headers)
    return outcome_response(err.status, err.code, err.diagnostics, err.headers)


async def _broker_error_handler(_request: Request, exc: BrokerError) -> Response:
    return error_response(exc)


async def _validation_handler(_request: Request, exc: RequestValidationError) -> Response:
    # Name the fields but never echo the submitted values.
    fields = sorted({".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body" for e in exc.errors()})
    return outcome_response(400, "invalid", "invalid request: " + ", ".join(fields)[:300])


async def _http_handler(_request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(exc.status_code, "processing")
    text = {404: "no such route", 405: "method not allowed", 413: "request body too large"}.get(
        exc.status_code, "request failed")
    return outcome_response(exc.status_code, code, text, getattr(exc, "headers", None))


async def _unhandled(_request: Request, exc: Exception) -> Response:
    import structlog

    structlog.get_logger("broker.errors").error("unhandled_error", error_type=type(exc).__name__)
    return outcome_response(500, "exception", "internal error")


def install_handlers(app) -> None:  # type: ignore[no-untyped-def]
    """Register the handlers that turn every failure into an OperationOutcome."""
    app.add_exception_handler(BrokerError, _broker_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled)
