"""Audit routes for auditors, privacy officers and the youth's representatives; each call is itself audited.

Routes are thin: they check the caller's role inside ``Pipeline.run`` (so refusals and bad
parameters are audited too), run the read or write in a worker thread, and answer JSON (or,
for the printable accounting, HTML). Nothing returned contains record content.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from anyio import to_thread
from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from broker.api.deps import PipelineDep, RuntimeDep
from broker.audit import accounting as acct
from broker.audit import review, search
from broker.errors import BadRequest, Forbidden
from broker.pipeline import parse_body
from broker.pipeline.exchange import Exchange
from broker.registry.views import ERRORS, body_schema
from broker.runtime import Runtime

router = APIRouter(tags=["audit"])
AUDITORS = frozenset({"auditor", "privacy-officer"})
PRIVACY_OFFICER = "privacy-officer"
AUDITORS_ONLY = "only auditors and privacy officers may use this audit route"
NO_ACCOUNTING = "you may not see the accounting of disclosures for this youth"
_YOUTH = search._TEXT
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _require(ex: Exchange, roles: frozenset[str], text: str = AUDITORS_ONLY) -> None:
    assert ex.principal is not None
    if ex.principal.role not in roles:
        raise Forbidden(text)


def _query_doc(*names: str) -> dict:
    """Document query parameters that the handler (not FastAPI) validates, so bad ones are audited."""
    return {"parameters": [{"name": n, "in": "query", "required": n == "youth", "schema": {"type": "string"}}
                           for n in names]}


# ---- GET /audit/events ------------------------------------------------------------------

@router.get("/audit/events", responses=ERRORS, openapi_extra=_query_doc(*search.PARAMS))
async def search_events(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Audit events by filter, in sequence order, with a stable cursor (auditors and privacy officers)."""

    async def handler(ex: Exchange) -> Response:
        _require(ex, AUDITORS)
        items = list(request.query_params.multi_items())
        vocab = runtime.vocabulary
        flt, after, limit = search.parse_query(items, categories=vocab.categories, purposes=vocab.purposes,
                                               grounds=vocab.grounds)
        ex.youth_id = flt.youth
        ex.mdt_id = flt.mdt
        ex.detail["filters"] = flt.used()
        page = await to_thread.run_sync(lambda: search.search(runtime.sessions, flt, after=after, limit=limit))
        ex.detail["returned"] = len(page.events)
        return _json({"events": page.events, "next": _next_url(runtime, items, page.next_cursor)})

    return await pipeline.run(request, action="audit.search", route="/audit/events", handler=handler)


def _next_url(runtime: Runtime, items: list[tuple[str, str]], cursor: str | None) -> str | None:
    """The same search from the cursor on."""
    if cursor is None:
        return None
    params = [(k, v) for k, v in items if k != "cursor"] + [("cursor", cursor)]
    return f"{runtime.settings.public_url}/audit/events?{urlencode(params)}"


# ---- GET /audit/accounting ----------------------------------------------------------------

def _accounting_params(request: Request, *, allowed: tuple[str, ...]) -> tuple[str, str]:
    """The youth and the window; errors name the parameter."""
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise BadRequest(f"unknown parameter: {name[:40]}")
        if name in values:
            raise BadRequest(f"repeated parameter: {name}")
        values[name] = value
    youth = values.get("youth")
    if youth is None or not _YOUTH.match(youth) or len(youth) > 64:
        raise BadRequest("invalid parameter: youth")
    window = values.get("window", "hipaa")
    if window not in acct.WINDOWS:
        raise BadRequest("invalid parameter: window (hipaa or part2)")
    return youth, window


async def _accounting(request: Request, ex: Exchange, runtime: Runtime, *, allowed: tuple[str, ...]
                      ) -> tuple[str, str, datetime, list[acct.Disclosure]]:
    """Check who asks, then build the list; the same 403 for any youth the caller may not see."""
    assert ex.principal is not None
    principal = ex.principal
    now = datetime.now(UTC)
    if principal.role not in AUDITORS | acct.REPRESENTATIVE_ROLES:
        raise Forbidden(NO_ACCOUNTING)
    youth, window = _accounting_params(request, allowed=allowed)
    ex.youth_id = youth
    ex.detail["window"] = window
    years, part2_only = acct.WINDOWS[window]

    def work() -> list[acct.Disclosure] | None:
        with runtime.sessions() as session:
            if not acct.may_request(session, principal=principal, youth_id=youth, now=now):
                return None
        return acct.accounting(runtime.sessions, youth_id=youth, now=now, years=years, part2_only=part2_only)

    found = await to_thread.run_sync(work)
    if found is None:
        raise Forbidden(NO_ACCOUNTING)
    return youth, window, now, found


@router.get("/audit/accounting", responses=ERRORS, openapi_extra=_query_doc("youth", "window"))
async def get_accounting(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """The youth's disclosures (HIPAA 6 years, or the Part 2 general-designation list for 3 years)."""

    async def handler(ex: Exchange) -> Response:
        youth, window, now, found = await _accounting(request, ex, runtime, allowed=("youth", "window"))
        years, _ = acct.WINDOWS[window]
        return _json({"youth_id": youth, "window": window,
                      "from": acct.window_start(now, years).isoformat().replace("+00:00", "Z"),
                      "to": now.isoformat().replace("+00:00", "Z"),
                      "disclosures": [d.as_json() for d in found]})

    return await pipeline.run(request, action="audit.accounting", route="/audit/accounting", handler=handler)


@router.get("/audit/accounting/print", responses={200: {"content": {"text/html": {}}}, **ERRORS},
            openapi_extra=_query_doc("youth", "window"))
async def print_accounting(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """The same accounting as a plain printable page to hand to the youth's attorney."""

    async def handler(ex: Exchange) -> Response:
        youth, window, now, found = await _accounting(request, ex, runtime, allowed=("youth", "window"))
        ex.detail["format"] = "html"
        vocab = runtime.vocabulary
        page = acct.render_html(found, youth_id=youth, window=window, now=now,
                                category_names=dict(vocab.categories),
                                purpose_names={k: v.display for k, v in vocab.purposes.items()})
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": HTML_CSP})

    return await pipeline.run(request, action="audit.accounting", route="/audit/accounting/print",
                              handler=handler)


# ---- break-glass review ---------------------------------------------------------------------

GrantId = Annotated[str, Path(max_length=64)]


@router.get("/audit/break-glass", response_model=review.GrantList, responses=ERRORS,
            openapi_extra=_query_doc("status"))
async def list_break_glass(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """The review queue; the requester's reason is shown to privacy officers only."""

    async def handler(ex: Exchange) -> Response:
        _require(ex, AUDITORS)
        params = dict(request.query_params)
        unknown = set(params) - {"status"}
        if unknown:
            raise BadRequest(f"unknown parameter: {sorted(unknown)[0][:40]}")
        status = params.get("status", "pending")
        if status not in review.STATUSES:
            raise BadRequest("invalid parameter: status (pending, reviewed or all)")
        with_reason = ex.principal is not None and ex.principal.role == PRIVACY_OFFICER

        def work() -> list[review.GrantOut]:
            with runtime.sessions() as session:
                return review.list_grants(session, status=status, with_reason=with_reason)

        grants = await to_thread.run_sync(work)
        ex.detail.update(status=status, listed=len(grants))
        return _json({"status": status, "grants": [g.model_dump(mode="json") for g in grants]})

    return await pipeline.run(request, action="audit.break-glass.list", route="/audit/break-glass",
                              handler=handler)


@router.get("/audit/break-glass/overdue", response_model=review.OverdueList, responses=ERRORS)
async def overdue_break_glass(request: Request, pipeline: PipelineDep, runtime: RuntimeDep) -> Response:
    """Grants still unreviewed after settings.break_glass_review_max_age_hours."""

    async def handler(ex: Exchange) -> Response:
        _require(ex, AUDITORS)
        if request.query_params:
            raise BadRequest(f"unknown parameter: {next(iter(request.query_params))[:40]}")
        hours = runtime.settings.break_glass_review_max_age_hours
        now = datetime.now(UTC)
        with_reason = ex.principal is not None and ex.principal.role == PRIVACY_OFFICER
        grants = await to_thread.run_sync(lambda: review.overdue(runtime.sessions, now=now,
                                                                 max_age=timedelta(hours=hours),
                                                                 with_reason=with_reason))
        ex.detail.update(listed=len(grants))
        return _json({"max_age_hours": hours, "as_of": now.isoformat().replace("+00:00", "Z"),
                      "grants": [g.model_dump(mode="json") for g in grants]})

    return await pipeline.run(request, action="audit.break-glass.overdue", route="/audit/break-glass/overdue",
                              handler=handler)


@router.post("/audit/break-glass/{grant_id}/review", response_model=review.GrantOut, responses={
    404: {"description": "OperationOutcome"}, **ERRORS}, openapi_extra=body_schema(review.ReviewIn))
async def review_break_glass(request: Request, grant_id: GrantId, pipeline: PipelineDep,
                             runtime: RuntimeDep) -> Response:
    """Record the privacy officer's finding; a grant is reviewed once (then 409)."""

    async def handler(ex: Exchange) -> Response:
        _require(ex, frozenset({PRIVACY_OFFICER}), "only a privacy officer may review break-glass grants")
        assert ex.principal is not None
        reviewer = ex.principal.sub
        ex.detail["break_glass_id"] = grant_id
        body = await parse_body(request, review.ReviewIn)
        assert isinstance(body, review.ReviewIn)
        now = datetime.now(UTC)

        def work() -> review.GrantOut:
            with runtime.sessions() as session:
                return review.record_review(session, grant_id=grant_id, body=body, reviewer=reviewer, now=now)

        out = await to_thread.run_sync(work)
        ex.youth_id, ex.mdt_id = out.youth_id, out.mdt_id
        ex.detail["finding"] = out.review_status
        return _json(out.model_dump(mode="json"))

    return await pipeline.run(request, action="audit.review", route="/audit/break-glass/{id}/review",
                              handler=handler)
