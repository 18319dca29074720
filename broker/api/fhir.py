"""The FHIR search facade per MDT: point any FHIR client at ``/mdts/{id}/fhir``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.errors import FHIR_JSON

router = APIRouter(tags=["fhir"])

PURPOSE_DOC = ("HL7 PurposeOfUse code (v3-ActReason, e.g. TREAT, COC) or CHILDPROT; required here or as the "
               "token's purpose_of_use claim")
MdtId = Annotated[str, Path(max_length=64)]
ResourceType = Annotated[str, Path(max_length=64)]
FHIR_RESPONSES = {200: {"content": {FHIR_JSON: {}}, "description": "FHIR R4 JSON"},
                  400: {"description": "OperationOutcome"}, 401: {"description": "OperationOutcome"},
                  403: {"description": "OperationOutcome"}, 503: {"description": "OperationOutcome"}}


@router.get("/mdts/{mdt_id}/fhir/metadata", responses=FHIR_RESPONSES)
async def capability_statement(runtime: RuntimeDep) -> Response:
    """A minimal CapabilityStatement so FHIR clients can discover the facade (reveals nothing per youth)."""
    import orjson

    body = {
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
        "format": ["json"], "date": "2026-11-28",
        "rest": [{"mode": "server", "resource": [
            {"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}],
             "searchParam": [{"name": n, "type": ty} for n, ty in (
                 ("_count", "number"), ("_offset", "number"), ("_lastUpdated", "date"), ("date", "date"),
                 ("code", "token"), ("_id", "token"), ("status", "token"), ("category", "token"))]}
            for t in sorted(runtime.resource_types)]}],
    }
    return Response(orjson.dumps(body), media_type=FHIR_JSON)


@router.get("/mdts/{mdt_id}/fhir/{resource_type}", responses=FHIR_RESPONSES)
async def fhir_search(request: Request, mdt_id: MdtId, resource_type: ResourceType, pipeline: PipelineDep,
                      x_purpose_of_use: Annotated[str | None, Header(description=PURPOSE_DOC)] = None) -> Response:
    """Search one resource type across the youth's sources; only what policy releases, labelled."""
    return await pipeline.fhir_search(request, mdt_id=mdt_id, resource_type=resource_type)


@router.get("/mdts/{mdt_id}/fhir/{resource_type}/{resource_id}", responses=FHIR_RESPONSES)
async def fhir_read(request: Request, mdt_id: MdtId, resource_type: ResourceType,
                    resource_id: Annotated[str, Path(max_length=64)], pipeline: PipelineDep,
                    x_purpose_of_use: Annotated[str | None, Header(description=PURPOSE_DOC)] = None) -> Response:
    """Read one resource; a withheld resource and a missing one get the same 404."""
    return await pipeline.fhir_read(request, mdt_id=mdt_id, resource_type=resource_type, resource_id=resource_id)


@router.get("/mdts/{mdt_id}/record", responses=FHIR_RESPONSES, tags=["record"])
async def record(request: Request, mdt_id: MdtId, pipeline: PipelineDep,
                 x_purpose_of_use: Annotated[str | None, Header(description=PURPOSE_DOC)] = None) -> Response:
    """Everything the requester may see about the youth, from every source, in one collection Bundle.

    Entries are grouped by category (``record-category`` extension on each entry); the last entry
    is an OperationOutcome with one issue per configured source (ok / unavailable / timeout).
    Sources are asked in parallel, each under its own timeout and circuit breaker.
    """
    return await pipeline.record(request, mdt_id=mdt_id)
