"""Registry routes: youth, MDTs, memberships. Every call is authenticated and audited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.registry import schemas, service

router = APIRouter(tags=["registry"])


DOCUMENTED_BODIES: dict[str, type] = {}
"""Body models referenced by routes; the app adds their schemas to the OpenAPI components."""


def body_schema(model: type) -> dict:
    """Document a JSON body that the pipeline (not FastAPI) parses, so bad bodies are audited too."""
    DOCUMENTED_BODIES[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
Id = Annotated[str, Path(max_length=64)]
ERRORS = {400: {"description": "OperationOutcome"}, 401: {"description": "OperationOutcome"},
          403: {"description": "OperationOutcome"}, 409: {"description": "OperationOutcome"},
          503: {"description": "OperationOutcome"}}


@router.post("/youth", status_code=201, response_model=schemas.YouthOut, responses=ERRORS,
             openapi_extra=body_schema(schemas.YouthIn))
async def create_youth(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Register a youth and the identifier each source system uses for them."""
    sources = frozenset(runtime.connectors)
    return await pipeline.registry_call(request, action="youth.create", route="/youth", status_code=201,
                                        body_model=schemas.YouthIn,
                                        fn=lambda s, p, now, body: service.create_youth(
                                            s, principal=p, body=body, now=now, known_sources=sources))


@router.get("/youth/{youth_id}", response_model=schemas.YouthOut, responses=ERRORS)
async def get_youth(request: Request, youth_id: Id, pipeline: PipelineDep) -> Response:
    """A youth and their source identifiers, for members of the youth's team."""
    return await pipeline.registry_call(request, action="youth.get", route="/youth/{id}", youth_id=youth_id,
                                        fn=lambda s, p, now: service.get_youth(s, principal=p, youth_id=youth_id,
                                                                               now=now))


@router.post("/mdts", status_code=201, response_model=schemas.MdtOut, responses=ERRORS,
             openapi_extra=body_schema(schemas.MdtIn))
async def create_mdt(request: Request, pipeline: PipelineDep) -> Response:
    """Open a team for a youth; the requester's agency must be the lead agency (or an admin)."""
    return await pipeline.registry_call(request, action="mdt.create", route="/mdts", status_code=201,
                                        body_model=schemas.MdtIn,
                                        fn=lambda s, p, now, body: service.create_mdt(s, principal=p, body=body,
                                                                                      now=now))


@router.get("/mdts/{mdt_id}", response_model=schemas.MdtOut, responses=ERRORS)
async def get_mdt(request: Request, mdt_id: Id, pipeline: PipelineDep) -> Response:
    """A team and its roster, for its active members."""
    return await pipeline.registry_call(request, action="mdt.get", route="/mdts/{id}", mdt_id=mdt_id,
                                        fn=lambda s, p, now: service.get_mdt(s, principal=p, mdt_id=mdt_id, now=now))


@router.post("/mdts/{mdt_id}/members", status_code=201, response_model=schemas.MembershipOut, responses=ERRORS,
             openapi_extra=body_schema(schemas.MembershipIn))
async def add_member(request: Request, mdt_id: Id, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Add a member to a team (lead agency staff or registry admin only)."""
    roles = frozenset(runtime.vocabulary.roles)
    return await pipeline.registry_call(request, action="membership.add", route="/mdts/{id}/members",
                                        mdt_id=mdt_id, status_code=201, body_model=schemas.MembershipIn,
                                        fn=lambda s, p, now, body: service.add_member(
                                            s, principal=p, mdt_id=mdt_id, body=body, now=now, team_roles=roles))


@router.delete("/mdts/{mdt_id}/members/{membership_id}", response_model=schemas.MembershipOut, responses=ERRORS)
async def end_member(request: Request, mdt_id: Id, membership_id: Id, pipeline: PipelineDep) -> Response:
    """End a membership now; access stops from this instant and the row is kept."""
    return await pipeline.registry_call(request, action="membership.end", route="/mdts/{id}/members/{mid}",
                                        mdt_id=mdt_id,
                                        fn=lambda s, p, now: service.end_member(
                                            s, principal=p, mdt_id=mdt_id, membership_id=membership_id, now=now))
