"""Break-glass routes. Every call is authenticated and audited; the reason never leaves the database."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.breakglass import schemas, service
from broker.registry.views import ERRORS, body_schema

router = APIRouter(tags=["break-glass"])
Id = Annotated[str, Path(max_length=64)]


@router.post("/mdts/{mdt_id}/break-glass", status_code=201, response_model=schemas.BreakGlassOut,
             responses=ERRORS, openapi_extra=body_schema(schemas.BreakGlassIn))
async def create_grant(request: Request, mdt_id: Id, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Emergency access for an active member, for the configured minutes, queued for review."""
    minutes = runtime.settings.break_glass_minutes
    return await pipeline.registry_call(request, action="break-glass.create", route="/mdts/{id}/break-glass",
                                        mdt_id=mdt_id, status_code=201, body_model=schemas.BreakGlassIn,
                                        fn=lambda s, p, now, body: service.create_grant(
                                            s, principal=p, mdt_id=mdt_id, body=body, now=now, minutes=minutes))


@router.get("/mdts/{mdt_id}/break-glass", response_model=schemas.BreakGlassList, responses=ERRORS)
async def list_grants(request: Request, mdt_id: Id, pipeline: PipelineDep) -> Response:
    """The caller's own grants on a team they are an active member of."""
    return await pipeline.registry_call(request, action="break-glass.list", route="/mdts/{id}/break-glass",
                                        mdt_id=mdt_id,
                                        fn=lambda s, p, now: service.list_own_grants(s, principal=p, mdt_id=mdt_id,
                                                                                     now=now))
