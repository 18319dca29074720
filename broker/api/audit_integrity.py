"""Integrity routes for auditors: chain verification, exports, and the checkpoint public key.

`/audit/verify` and `/audit/export` run through the pipeline, so they are authenticated and
themselves audited (``audit.verify``, ``audit.export``); only auditors and privacy officers
may call them. `/audit/checkpoint-key` is public: a key that verifies signatures is no secret,
and an auditor must be able to fetch it to check an export offline.
"""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from broker.audit.export import export_csv, export_fhir, export_ndjson
from broker.audit.verify import format_report, verify_chain
from broker.errors import BadRequest, Forbidden, NotFound
from broker.pipeline.exchange import Exchange
from broker.registry.views import ERRORS

__all__ = ["AUDIT_ROLES", "router"]

router = APIRouter(tags=["audit"])
MAX_SEQ = 2**63 - 1  # a sequence is a BIGINT; a larger number would overflow the query, not just miss
AUDIT_ROLES = frozenset({"auditor", "privacy-officer"})
_FORMATS = {
    "ndjson": ("application/x-ndjson", "ndjson", export_ndjson),
    "csv": ("text/csv; charset=utf-8", "csv", export_csv),
    "fhir": ("application/fhir+ndjson", "ndjson", export_fhir),
}


def _require_auditor(ex: Exchange) -> None:
    """Audit metadata is for auditors and privacy officers only."""
    if ex.principal is None or ex.principal.role not in AUDIT_ROLES:
        raise Forbidden("only an auditor or a privacy officer may use the audit integrity API")


def _audit_key(request: Request):  # type: ignore[no-untyped-def]
    return getattr(request.app.state.runtime, "audit_key", None)


@router.get("/audit/verify", summary="Verify the audit chain and its signed checkpoints (auditor, privacy officer)",
            responses=ERRORS)
async def verify(request: Request, from_seq: Annotated[int, Query(alias="from", ge=1, le=MAX_SEQ)] = 1) -> Response:
    """The report names the first broken place and its kind; the walk runs in a worker thread."""
    runtime = request.app.state.runtime

    async def handler(ex: Exchange) -> Response:
        _require_auditor(ex)
        key = _audit_key(request)
        public = key.public_key if key is not None else None
        report = await to_thread.run_sync(lambda: verify_chain(runtime.sessions, from_seq=from_seq,
                                                               public_key=public))
        ex.detail["verify"] = {"ok": report.ok, "first_bad_seq": report.first_bad_seq, "kind": report.kind}
        body = report.to_dict() | {"summary": format_report(report), "signatures_checked": public is not None}
        return JSONResponse(body)

    return await request.app.state.pipeline.run(request, action="audit.verify", route="/audit/verify",
                                                handler=handler)


@router.get("/audit/export", summary="Stream the audit log as NDJSON, CSV or FHIR AuditEvent (auditors)",
            responses={200: {"description": "The events from since_seq on, one per line (CSV: one per row)",
                             "content": {media: {} for media, _suffix, _fn in _FORMATS.values()}}, **ERRORS})
async def export(request: Request, format: str = "ndjson",
                 since_seq: Annotated[int, Query(ge=1, le=MAX_SEQ)] = 1) -> Response:
    """A streaming download; the request is audited before the first byte is sent."""
    runtime = request.app.state.runtime

    async def handler(ex: Exchange) -> Response:
        _require_auditor(ex)
        if format not in _FORMATS:
            raise BadRequest("format must be one of ndjson, csv, fhir")
        media_type, suffix, exporter = _FORMATS[format]
        kwargs = {"key": _audit_key(request)} if format == "ndjson" else {}
        ex.detail["export"] = {"format": format, "since_seq": since_seq}
        lines = exporter(runtime.sessions, since_seq=since_seq, **kwargs)
        filename = f"mdt-broker-audit-{format}.{suffix}"
        return StreamingResponse(lines, media_type=media_type,
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    return await request.app.state.pipeline.run(request, action="audit.export", route="/audit/export",
                                                handler=handler)


@router.get("/audit/checkpoint-key", summary="The public key that verifies audit checkpoints (no token needed)",
            responses={404: {"description": "OperationOutcome: no audit key is configured"}})
async def checkpoint_key(request: Request) -> Response:
    """PEM for `broker audit verify --export FILE --public-key PEM`, and the same key as an OKP JWK."""
    key = _audit_key(request)
    if key is None:
        raise NotFound("this broker signs no audit checkpoints (no audit key configured)")
    return JSONResponse({"key_id": key.key_id, "alg": "EdDSA", "pem": key.public_pem(), "jwk": key.public_jwk()})
