"""Liveness and readiness; they reveal no data and need no token."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse

from broker.api.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """The process is up."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "the database does not answer"}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """The database answers; 503 otherwise."""
    from anyio import to_thread

    from broker.app import readiness

    return await to_thread.run_sync(readiness, runtime)
