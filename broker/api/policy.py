"""``POST /policy/decide`` (dry run with explanation) and ``GET /policy/version``: authenticated and audited.

Neither route reads a record or names a youth: they answer questions about the policy in
force, so any authenticated caller may ask, and the audit log shows who asked what.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import orjson
from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from broker.errors import BadRequest
from broker.pipeline import parse_body
from broker.pipeline.exchange import Exchange
from broker.policy.explain import explain, unknown_terms
from broker.registry.schemas import Strict
from broker.registry.views import body_schema

router = APIRouter(tags=["policy"])

DECIDE_ROUTE = "/policy/decide"
VERSION_ROUTE = "/policy/version"
ERRORS = {400: {"description": "OperationOutcome"}, 401: {"description": "OperationOutcome"},
          503: {"description": "OperationOutcome"}}
Term = Annotated[str, Field(min_length=1, max_length=64)]


class DecideIn(Strict):
    """A what-if question: may this role see this category, for this purpose, on these grounds?"""

    role: Term = Field(description="A team role from vocabulary.yaml, e.g. probation-officer")
    category: Term = Field(description="A data category from vocabulary.yaml, e.g. sud-part2")
    purpose: Term = Field(description="A purpose-of-use code from vocabulary.yaml, e.g. COC")
    grounds: list[Term] = Field(default_factory=list, max_length=32,
                                description="Grounds the requester would hold, e.g. [mdt-member, consent-part2]")


def _policy(request: Request):  # type: ignore[no-untyped-def]
    """The engine in force now (a reload may have swapped it since the app started)."""
    return request.app.state.runtime.policy


@router.post(DECIDE_ROUTE, responses={200: {"description": "Explanation: effect, deciding rule with file, line "
                                            "and citation, grounds tried, and for a deny what would allow it"},
                                      **ERRORS},
             openapi_extra=body_schema(DecideIn))
async def decide(request: Request) -> Response:
    """Dry-run a decision and explain it; no record is read, but the question is audited."""

    async def handler(ex: Exchange) -> Response:
        body = await parse_body(request, DecideIn)
        assert isinstance(body, DecideIn)
        policy = _policy(request)
        vocabulary = getattr(policy, "vocabulary", None) or request.app.state.runtime.vocabulary
        bad = unknown_terms(vocabulary, role=body.role, category=body.category, purpose=body.purpose,
                            grounds=body.grounds)
        if bad:  # field names only: the values may be anything the caller typed
            raise BadRequest("unknown term in: " + ", ".join(bad))
        grounds = frozenset(body.grounds)
        ex.purpose = body.purpose
        ex.policy_version = policy.version
        ex.detail = {"role": body.role, "category": body.category, "grounds": sorted(grounds)}
        result = await to_thread.run_sync(lambda: explain(policy, role=body.role, category=body.category,
                                                          purpose=body.purpose, grounds=grounds,
                                                          vocabulary=vocabulary))
        return Response(orjson.dumps(result.to_dict()), media_type="application/json")

    return await request.app.state.pipeline.run(request, action="policy.decide", route=DECIDE_ROUTE, handler=handler)


@router.get(VERSION_ROUTE, responses={200: {"description": "version, files (path -> sha256), loaded_at"},
                                      **ERRORS})
async def version(request: Request) -> Response:
    """Which policy is in force, file by file, so a county can prove what decided a request."""

    async def handler(ex: Exchange) -> Response:
        policy = _policy(request)
        ex.policy_version = policy.version
        loaded_at = getattr(policy, "loaded_at", None) or await to_thread.run_sync(
            lambda: _first_loaded(request, policy.version))
        body = {"version": policy.version, "files": policy.files(),
                "loaded_at": _iso(loaded_at) if loaded_at else None}
        return Response(orjson.dumps(body), media_type="application/json")

    return await request.app.state.pipeline.run(request, action="policy.version", route=VERSION_ROUTE,
                                                handler=handler)


def _first_loaded(request: Request, version: str) -> datetime | None:
    """When this version was first put into force (the policy_versions row the runtime records)."""
    from broker.store.models import PolicyVersion

    with request.app.state.runtime.sessions() as session:
        row = session.get(PolicyVersion, version)
        return row.loaded_at if row is not None else None


def _iso(value: datetime) -> str:
    """UTC ISO 8601 with a Z (SQLite hands datetimes back naive; they were stored as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
