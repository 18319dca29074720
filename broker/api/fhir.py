"""The FHIR search facade per MDT: point any FHIR client at ``/mdts/{id}/fhir``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from broker.api.deps import RuntimeDep, get_pipeline
from broker.errors import FHIR_JSON
from broker.pipeline.search_params import DATE_VALUE, RESOURCE_ID, SORT_VALUES, TOKEN_VALUE

router = APIRouter(tags=["fhir"])

PURPOSE_DOC = ("HL7 PurposeOfUse code (v3-ActReason, e.g. TREAT, COC) or CHILDPROT; required here or as the "
               "token's purpose_of_use claim")
# The pipeline reads the header itself; it is documented here rather than declared as a parameter,
# which FastAPI would resolve (and find nothing to validate) on every request of the hot path.
PURPOSE_PARAMETER = {"name": "x-purpose-of-use", "in": "header", "required": False, "description": PURPOSE_DOC,
                     "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": PURPOSE_DOC,
                                "title": "X-Purpose-Of-Use"}}
MdtId = Annotated[str, Path(max_length=64)]
ResourceType = Annotated[str, Path(max_length=64)]
_ONE = "; a comma-separated list (up to 20 values) or the parameter repeated means any of them"
# What parse_search accepts (broker/pipeline/search_params.py); anything else is refused with 400.
SEARCH_PARAMETERS = [{"name": name, "in": "query", "required": False, "schema": schema, "description": text}
                     for name, schema, text in (
    ("_count", {"type": "integer", "minimum": 1, "maximum": 9_999_999},
     "Page size; a value above the broker's maximum (BROKER_MAX_COUNT, default 200) is lowered to it"),
    ("_offset", {"type": "integer", "minimum": 0, "maximum": 9_999_999}, "Entries to skip (paging)"),
    ("_lastUpdated", {"type": "string", "pattern": DATE_VALUE.pattern}, "FHIR date search" + _ONE),
    ("date", {"type": "string", "pattern": DATE_VALUE.pattern}, "FHIR date search" + _ONE),
    ("code", {"type": "string", "pattern": TOKEN_VALUE.pattern}, "FHIR token [system|]code" + _ONE),
    ("status", {"type": "string", "pattern": TOKEN_VALUE.pattern}, "FHIR token" + _ONE),
    ("category", {"type": "string", "pattern": TOKEN_VALUE.pattern}, "FHIR token" + _ONE),
    ("_id", {"type": "string", "pattern": RESOURCE_ID.pattern}, "Resource id" + _ONE),
    ("_sort", {"type": "string", "enum": sorted(SORT_VALUES)}, "Sort order"),
    ("_format", {"type": "string", "enum": ["json", "application/fhir+json", "application/json"]}, "JSON only"))]
FHIR_RESPONSES = {200: {"content": {FHIR_JSON: {}}, "description": "FHIR R4 JSON"},
                  400: {"description": "OperationOutcome"}, 401: {"description": "OperationOutcome"},
                  403: {"description": "OperationOutcome"}, 503: {"description": "OperationOutcome"}}


def _ok(description: str, resource_type: str | None, **schema: object) -> dict:
    """FHIR_RESPONSES with a 200 whose body schema says what kind of resource comes back."""
    body = {"type": "object", "required": ["resourceType", "id"],
            "properties": {"resourceType": {"type": "string", **({"enum": [resource_type]} if resource_type else {})},
                           "id": {"type": "string"}}, **schema}
    return {**FHIR_RESPONSES, 200: {"description": description, "content": {FHIR_JSON: {"schema": body}}}}


def _bundle(kind: str) -> dict:
    """A Bundle of this type that never carries a total (counts would tell what was withheld)."""
    return {"required": ["resourceType", "id", "type"], "not": {"required": ["total"]},
            "properties": {"resourceType": {"enum": ["Bundle"]}, "id": {"type": "string"}, "type": {"enum": [kind]},
                           "entry": {"type": "array", "items": {"type": "object"}}}}


@router.get("/mdts/{mdt_id}/fhir/metadata", responses=_ok("The facade's CapabilityStatement", "CapabilityStatement",
                                                          required=["resourceType"]))
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


@router.get("/mdts/{mdt_id}/fhir/{resource_type}", responses=_ok("A searchset Bundle", None, **_bundle("searchset")),
            openapi_extra={"parameters": [PURPOSE_PARAMETER, *SEARCH_PARAMETERS]})
async def fhir_search(request: Request, mdt_id: MdtId, resource_type: ResourceType) -> Response:
    """Search one resource type across the youth's sources; only what policy releases, labelled."""
    return await get_pipeline(request).fhir_search(request, mdt_id=mdt_id, resource_type=resource_type)


@router.get("/mdts/{mdt_id}/fhir/{resource_type}/{resource_id}",
            responses={**_ok("The resource", None), 404: {"description": "OperationOutcome: no such resource, or withheld"}},
            openapi_extra={"parameters": [PURPOSE_PARAMETER]})
async def fhir_read(request: Request, mdt_id: MdtId, resource_type: ResourceType,
                    resource_id: Annotated[str, Path(max_length=64)]) -> Response:
    """Read one resource; a withheld resource and a missing one get the same 404."""
    return await get_pipeline(request).fhir_read(request, mdt_id=mdt_id, resource_type=resource_type,
                                                 resource_id=resource_id)


@router.get("/mdts/{mdt_id}/record", responses=_ok("A collection Bundle", None, **_bundle("collection")),
            tags=["record"], openapi_extra={"parameters": [PURPOSE_PARAMETER]})
async def record(request: Request, mdt_id: MdtId) -> Response:
    """Everything the requester may see about the youth, from every source, in one collection Bundle.

    Entries are grouped by category (``record-category`` extension on each entry); the last entry
    is an OperationOutcome with one issue per configured source (ok / unavailable / timeout).
    Sources are asked in parallel, each under its own timeout and circuit breaker.
    """
    return await get_pipeline(request).record(request, mdt_id=mdt_id)
