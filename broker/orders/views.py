"""Court order routes. Every call is authenticated and audited by the pipeline; the service decides."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.orders import schemas, service
from broker.registry.views import ERRORS, body_schema

router = APIRouter(tags=["court-orders"])
Id = Annotated[str, Path(max_length=64)]
YouthParam = Annotated[str, Query(alias="youth", max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9\-._:]{0,63}$",
                                   description="The youth's broker id")]


@router.post("/court-orders", status_code=201, response_model=schemas.CourtOrderOut, responses=ERRORS,
             openapi_extra=body_schema(schemas.CourtOrderIn))
async def create_order(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Record a court order as a ground (registry admin, or a child welfare worker on the youth's team)."""
    vocabulary = runtime.vocabulary
    return await pipeline.registry_call(request, action="court-order.create", route="/court-orders",
                                        status_code=201, body_model=schemas.CourtOrderIn,
                                        fn=lambda s, p, now, body: service.create_order(
                                            s, principal=p, body=body, now=now, vocabulary=vocabulary))


@router.get("/court-orders", response_model=schemas.CourtOrderList, responses=ERRORS)
async def list_orders(request: Request, youth: YouthParam, pipeline: PipelineDep) -> Response:
    """A youth's orders: all of them for those who may record, otherwise only those naming the caller."""
    return await pipeline.registry_call(request, action="court-order.list", route="/court-orders",
                                        youth_id=youth,
                                        fn=lambda s, p, now: service.list_orders(s, principal=p, youth_id=youth,
                                                                                 now=now))


@router.get("/court-orders/{order_id}", response_model=schemas.CourtOrderOut, responses=ERRORS)
async def get_order(request: Request, order_id: Id, pipeline: PipelineDep) -> Response:
    """One order, for those who may record orders for the youth or a requester it names."""
    return await pipeline.registry_call(request, action="court-order.get", route="/court-orders/{id}",
                                        fn=lambda s, p, now: service.get_order(s, principal=p, order_id=order_id,
                                                                               now=now))


@router.post("/court-orders/{order_id}/revoke", response_model=schemas.CourtOrderOut, responses=ERRORS)
async def revoke_order(request: Request, order_id: Id, pipeline: PipelineDep) -> Response:
    """Record that an order was vacated; it stops counting as a ground from this instant."""
    return await pipeline.registry_call(request, action="court-order.revoke", route="/court-orders/{id}/revoke",
                                        fn=lambda s, p, now: service.revoke_order(s, principal=p,
                                                                                  order_id=order_id, now=now))
