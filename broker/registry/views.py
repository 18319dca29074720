"""Registry routes: youth, identifiers, MDTs, memberships. Every call is authenticated and audited.

Most routes go through ``Pipeline.registry_call``. The identifier lookup and unlink run in
``Pipeline.run`` instead (like the audit routes) because their audit events need details that
``registry_call`` cannot record: the looked-up system and whether it was answered — also when
the answer is the 404 — and which source an unlink removed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import orjson
from anyio import to_thread
from fastapi import APIRouter, Path, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.errors import NotFound
from broker.observability import stage_span
from broker.pipeline.exchange import Exchange
from broker.registry import schemas, service
from broker.runtime import Runtime

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
WITH_404 = {**ERRORS, 404: {"description": "OperationOutcome"}}
T = TypeVar("T")


async def _in_session(runtime: Runtime, action: str, fn: Callable[[Session, datetime], T]) -> T:
    """Run a service function in a worker thread with its own session, at one instant."""
    now = datetime.now(timezone.utc)

    def work() -> T:
        with runtime.sessions() as session:
            return fn(session, now)

    with stage_span("registry", action=action):
        return await to_thread.run_sync(work)


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


@router.post("/youth", status_code=201, response_model=schemas.YouthOut, responses=ERRORS,
             openapi_extra=body_schema(schemas.YouthIn))
async def create_youth(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Register a youth and the identifier each source system uses for them."""
    sources = frozenset(runtime.connectors)
    return await pipeline.registry_call(request, action="youth.create", route="/youth", status_code=201,
                                        body_model=schemas.YouthIn,
                                        fn=lambda s, p, now, body: service.create_youth(
                                            s, principal=p, body=body, now=now, known_sources=sources))


@router.get("/youth", response_model=schemas.YouthLookupOut, responses=WITH_404, openapi_extra={"parameters": [
    {"name": service.IDENTIFIER_PARAM, "in": "query", "required": True, "schema": {"type": "string"},
     "description": "A source's id for the youth as a FHIR token, <system>|<value>"}]})
async def find_youth(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Find a youth by a source id; anyone but their team (or an order's recipient) gets the one 404."""
    systems = frozenset(c.identifier_system for c in runtime.connectors.values())

    async def handler(ex: Exchange) -> Response:
        assert ex.principal is not None
        principal = ex.principal
        system, value = service.parse_identifier_query(list(request.query_params.multi_items()),
                                                       known_systems=systems)
        ex.detail.update(identifier_system=system, matched=False)  # never the value: it is the source's id
        found = await _in_session(runtime, "youth.lookup", lambda s, now: service.lookup_youth(
            s, principal=principal, system=system, value=value, now=now))
        if found.youth_id is None:
            raise NotFound(service.NOT_FOUND_BY_IDENTIFIER)
        ex.youth_id = found.youth_id
        ex.detail.update(matched=True, mdts=list(found.mdts), answered_as=list(found.answered_as))
        ex.court_order_ids = list(found.court_order_ids)
        return _json(schemas.YouthLookupOut(youth_id=found.youth_id, mdts=list(found.mdts)).model_dump())

    return await pipeline.run(request, action="youth.lookup", route="/youth", handler=handler)


@router.post("/youth/{youth_id}/identifiers", response_model=schemas.YouthOut, responses=ERRORS,
             openapi_extra=body_schema(schemas.IdentifiersIn))
async def link_identifiers(request: Request, youth_id: Id, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Link source ids to a youth (registry admin, or staff of the lead agency of the youth's open team)."""
    systems = {name: c.identifier_system for name, c in runtime.connectors.items()}
    return await pipeline.registry_call(request, action="youth.identifiers.link", route="/youth/{id}/identifiers",
                                        youth_id=youth_id, body_model=schemas.IdentifiersIn,
                                        fn=lambda s, p, now, body: service.link_identifiers(
                                            s, principal=p, youth_id=youth_id, body=body, now=now,
                                            source_systems=systems))


@router.delete("/youth/{youth_id}/identifiers/{source}", response_model=schemas.YouthOut, responses=WITH_404)
async def unlink_identifier(request: Request, youth_id: Id, source: Id, pipeline: PipelineDep,
                            runtime: RuntimeDep) -> Response:
    """Remove a mistaken link to a source (registry admin only); the audit event names the source."""

    async def handler(ex: Exchange) -> Response:
        assert ex.principal is not None
        principal = ex.principal
        ex.youth_id = youth_id
        ex.detail["source"] = service.check_source_name(source)
        done = await _in_session(runtime, "youth.identifiers.unlink", lambda s, now: service.unlink_source(
            s, principal=principal, youth_id=youth_id, source=source, now=now))
        ex.detail["identifier_systems"] = list(done.systems)
        return _json(done.youth.model_dump(mode="json"))

    return await pipeline.run(request, action="youth.identifiers.unlink", route="/youth/{id}/identifiers/{source}",
                              handler=handler)


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


@router.delete("/mdts/{mdt_id}/members/{membership_id}", response_model=schemas.MembershipOut, responses=WITH_404)
async def end_member(request: Request, mdt_id: Id, membership_id: Id, pipeline: PipelineDep) -> Response:
    """End a membership now; access stops from this instant and the row is kept."""
    return await pipeline.registry_call(request, action="membership.end", route="/mdts/{id}/members/{mid}",
                                        mdt_id=mdt_id,
                                        fn=lambda s, p, now: service.end_member(
                                            s, principal=p, mdt_id=mdt_id, membership_id=membership_id, now=now))
