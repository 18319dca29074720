"""Consent routes: file, search, read and revoke. Every call is authenticated and audited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.consent import service
from broker.errors import FHIR_JSON

router = APIRouter(tags=["consents"])

Id = Annotated[str, Path(max_length=64)]
ERRORS = {400: {"description": "OperationOutcome"}, 401: {"description": "OperationOutcome"},
          403: {"description": "OperationOutcome"}, 422: {"description": "OperationOutcome, one issue per element"},
          503: {"description": "OperationOutcome"}}
CONSENT_SCHEMA = {"title": "Consent", "type": "object", "description": "A FHIR R4 Consent (see docs/consents.md)",
                  "properties": {"resourceType": {"type": "string", "enum": ["Consent"]}},
                  "required": ["resourceType"], "additionalProperties": True}
# The pipeline, not FastAPI, parses the body, so malformed bodies are audited too.
CONSENT_BODY = {"requestBody": {"required": True, "content": {FHIR_JSON: {"schema": CONSENT_SCHEMA}}}}
FHIR_RESPONSE = {"content": {FHIR_JSON: {"schema": {"type": "object"}}}}


def _fhir(response: Response) -> Response:
    """Successful answers are FHIR resources; errors already are OperationOutcomes in FHIR JSON."""
    if response.status_code < 300:
        response.headers["content-type"] = FHIR_JSON
    return response


@router.post("/consents", status_code=201, responses={201: FHIR_RESPONSE, **ERRORS}, openapi_extra=CONSENT_BODY)
async def file_consent(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """File a signed consent or authorization; 422 lists every element the legal form lacks."""
    vocabulary = runtime.vocabulary
    return _fhir(await pipeline.registry_call(
        request, action="consent.file", route="/consents", status_code=201, json_body=True,
        fn=lambda s, p, now, body: service.file_consent(s, principal=p, resource=body, now=now,
                                                        vocabulary=vocabulary)))


@router.get("/consents", responses={200: FHIR_RESPONSE, **ERRORS})
async def search_consents(request: Request, youth: Annotated[str, Query(max_length=64)], pipeline: PipelineDep,
                          runtime: RuntimeDep) -> Response:
    """The youth's consents as a searchset Bundle, for the youth's team."""
    base = runtime.settings.public_url
    return _fhir(await pipeline.registry_call(
        request, action="consent.search", route="/consents", youth_id=youth,
        fn=lambda s, p, now: service.list_consents(s, principal=p, youth_id=youth, now=now, base_url=base)))


@router.get("/consents/{consent_id}", responses={200: FHIR_RESPONSE, **ERRORS})
async def get_consent(request: Request, consent_id: Id, pipeline: PipelineDep) -> Response:
    """One consent, for the youth's team."""
    return _fhir(await pipeline.registry_call(
        request, action="consent.read", route="/consents/{id}",
        fn=lambda s, p, now: service.get_consent(s, principal=p, consent_id=consent_id, now=now)))


@router.post("/consents/{consent_id}/revoke", responses={200: FHIR_RESPONSE, **ERRORS})
async def revoke_consent(request: Request, consent_id: Id, pipeline: PipelineDep) -> Response:
    """Revoke a consent from now on; repeating the call is harmless."""
    return _fhir(await pipeline.registry_call(
        request, action="consent.revoke", route="/consents/{id}/revoke",
        fn=lambda s, p, now: service.revoke_consent(s, principal=p, consent_id=consent_id, now=now)))
