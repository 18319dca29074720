"""``POST /policy/reload``: a registry admin puts edited policy files into force, audited like any call."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from broker.errors import Forbidden
from broker.pipeline.exchange import Exchange
from broker.policy.reload import PolicyReloader

router = APIRouter(tags=["policy"])

ADMIN_ROLE = "registry-admin"
RELOAD_ROUTE = "/policy/reload"
ERRORS = {401: {"description": "OperationOutcome"}, 403: {"description": "OperationOutcome"},
          422: {"description": "the candidate was refused; the previous policy stays in force"},
          503: {"description": "OperationOutcome"}}


def reloader_for(request: Request) -> PolicyReloader:
    """The app's reloader (``app.state.policy_reloader``), created from settings on first use."""
    state = request.app.state
    reloader = getattr(state, "policy_reloader", None)
    if reloader is None:  # no await between the check and the set: one reloader per app
        runtime = state.runtime
        reloader = PolicyReloader(runtime, policy_dir=runtime.settings.policy_dir,
                                  override=runtime.settings.policy_override_file)
        state.policy_reloader = reloader
    return reloader


@router.post(RELOAD_ROUTE, responses=ERRORS)
async def reload_policy(request: Request) -> Response:
    """Reload the policy files; 200 when the new version is in force, 422 when it was refused."""

    async def handler(ex: Exchange) -> Response:
        if ex.principal is None or ex.principal.role != ADMIN_ROLE:
            raise Forbidden("only a registry admin may reload the policy")
        result = await reloader_for(request).areload("api")
        ex.detail["policy_reload"] = {"accepted": result.accepted, "version": result.version,
                                      "candidate_version": result.candidate_version}
        return Response(orjson.dumps(result.as_dict()), status_code=200 if result.accepted else 422,
                        media_type="application/json")

    return await request.app.state.pipeline.run(request, action="policy.reload", route=RELOAD_ROUTE,
                                                handler=handler)
