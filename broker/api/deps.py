"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.pipeline import Pipeline
from broker.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    """The process's runtime, set by the app factory."""
    return request.app.state.runtime


def get_pipeline(request: Request) -> Pipeline:
    """The pipeline every audited route calls."""
    return request.app.state.pipeline


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
