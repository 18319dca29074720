"""``POST /oauth/token`` and ``GET /.well-known/jwks.json``.

An agency system authenticates with an RFC 7523 client assertion and asks for a short-lived
access token for one of its own staff members, in one of that person's roles. Errors follow
RFC 6749 §5.2 (JSON body, ``Cache-Control: no-store``) with one fixed description per error
code, so an answer never says which check failed nor whether a staff member exists in another
agency. The check that failed is recorded, as a fixed reason code, in the audit event.

Every answer, granted or refused, is audited through ``Pipeline.run`` (``authenticate=False``:
this handler authenticates the client itself) before it is returned; if the audit write fails
the answer is 503 and no token leaves. Quotas (``broker.ratelimit``): per remote address before
anything else, per client once it has authenticated.

Collaborators come from ``request.app.state``: ``pipeline`` and ``runtime`` (``settings``,
``sessions``, ``issuer``, ``signing_key``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.responses import Response

from broker.auth.client_assertion import CLIENT_ASSERTION_TYPE, verify_client_assertion
from broker.auth.tokens import AuthError
from broker.domain import Principal
from broker.errors import error_response
from broker.pipeline.exchange import Exchange
from broker.ratelimit import RateLimits, Throttled
from broker.store.models import Agency, Staff

__all__ = ["DESCRIPTIONS", "router"]

router = APIRouter(tags=["oauth"])
log = structlog.get_logger("broker.oauth")

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# RFC 6749 appendix A.4 scope-token; purpose codes and ids are kept to a safe, short alphabet.
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,64}$")
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_MAX_SCOPES = 20
_MAX_ASSERTION_CHARS = 16_384
UNKNOWN_ROLE = "(unknown-role)"
"""Stands for a requested role the broker does not know; no requestable role can spell it (see _CODE)."""
_SINGLE_VALUED = ("grant_type", "client_assertion_type", "client_assertion", "client_id", "staff_sub",
                  "staff_role", "purpose_of_use", "scope")

# One fixed description per RFC 6749 §5.2 error code: the answer names the code, never the check.
DESCRIPTIONS = {
    "invalid_request": "The request is missing a required parameter, repeats a parameter, "
                       "or is otherwise malformed",
    "invalid_client": "Client authentication failed",
    "invalid_grant": "The client may not obtain a token for this staff member in this role",
    "unauthorized_client": "The client's agency may not act in this role",
    "unsupported_grant_type": "Only the client_credentials grant is supported",
    "invalid_scope": "The requested scope is malformed",
}


class _OAuthError(Exception):
    """An RFC 6749 §5.2 error; ``reason`` is a fixed code for the audit record only."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(error)
        self.error, self.reason = error, reason


def _error_response(error: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": DESCRIPTIONS[error]},
                        status_code=AuthError.STATUS[error], headers=_NO_STORE)


@dataclass(frozen=True, slots=True)
class _Grant:
    """A checked token request: who speaks, for whom, in which role, for what."""

    assertion: str
    client_id: str | None
    staff_sub: str
    staff_role: str
    purpose: str | None
    scopes: frozenset[str]


_OAUTH_ERROR = {"application/json": {"schema": {
    "title": "OAuthError", "type": "object", "required": ["error", "error_description"],
    "properties": {"error": {"type": "string", "enum": sorted(DESCRIPTIONS)}, "error_description": {"type": "string"}},
}}}
_TOKEN = {"application/json": {"schema": {
    "title": "TokenResponse", "type": "object", "required": ["access_token", "token_type", "expires_in", "scope"],
    "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string", "enum": ["Bearer"]},
                   "expires_in": {"type": "integer"}, "scope": {"type": "string"}},
}}}


@router.post(
    "/oauth/token",
    summary="Obtain a short-lived access token for one staff member (RFC 7523 client assertion)",
    responses={200: {"description": "The access token (RFC 6749 §5.1)", "content": _TOKEN},
               400: {"description": "RFC 6749 §5.2 error, one fixed description per code", "content": _OAUTH_ERROR},
               401: {"description": "RFC 6749 §5.2 invalid_client", "content": _OAUTH_ERROR},
               429: {"description": "OperationOutcome: too many requests; Retry-After says when to retry"},
               503: {"description": "OperationOutcome: the request could not be audited; no token was issued"}},
)
async def token(
    request: Request,
    grant_type: Annotated[str | None, Form()] = None,
    client_assertion_type: Annotated[str | None, Form()] = None,
    client_assertion: Annotated[str | None, Form()] = None,
    staff_sub: Annotated[str | None, Form()] = None,
    staff_role: Annotated[str | None, Form()] = None,
    purpose_of_use: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
) -> Response:
    """Fields are optional here so that a missing one is an RFC 6749 error, not a 422."""
    runtime = request.app.state.runtime
    pipeline = request.app.state.pipeline
    limits: RateLimits = pipeline.limits
    address = request.client.host if request.client else "unknown"
    throttled: Throttled | None = None
    try:
        limits.admit_token_address(address)
    except Throttled as exc:
        if not limits.audit_address_refusal(address):  # the rest of a flood is not written to the chain
            log.warning("request", route="/oauth/token", method="POST", status=exc.status, audited=False)
            return error_response(exc)
        throttled = exc

    async def handler(ex: Exchange) -> Response:
        ex.detail["remote_address"] = address
        if throttled is not None:
            raise throttled
        try:
            await _check_request_shape(request)
            grant = _parse(grant_type, client_assertion_type, client_assertion, staff_sub, staff_role,
                           purpose_of_use, scope, client_id)
            vocabulary = getattr(runtime, "vocabulary", None)
            if grant.purpose is not None and vocabulary is not None and grant.purpose not in vocabulary.purposes:
                raise _OAuthError("invalid_request", "purpose_unknown")
            ex.purpose = grant.purpose
            body = await run_in_threadpool(_grant_token, runtime, grant, ex, limits)
        except _OAuthError as exc:
            ex.error = exc.error
            ex.detail["reason"] = exc.reason
            return _error_response(exc.error)
        return JSONResponse(body, headers=_NO_STORE)

    return await pipeline.run(request, action="oauth.token", route="/oauth/token", handler=handler,
                              authenticate=False)


async def _check_request_shape(request: Request) -> None:
    """RFC 6749 §3.2 and §2.3: form-encoded, each parameter once, one authentication method."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _OAuthError("invalid_request", "content_type")
    if "authorization" in request.headers:
        raise _OAuthError("invalid_request", "two_auth_methods")
    form = await request.form()
    for name in _SINGLE_VALUED:
        if len(form.getlist(name)) > 1:
            raise _OAuthError("invalid_request", "repeated_parameter")
    if "client_secret" in form:
        raise _OAuthError("invalid_request", "two_auth_methods")


def _parse(grant_type: str | None, assertion_type: str | None, assertion: str | None,
           staff_sub: str | None, staff_role: str | None, purpose: str | None, scope: str | None,
           client_id: str | None) -> _Grant:
    if not grant_type:
        raise _OAuthError("invalid_request", "grant_type_missing")
    if grant_type != "client_credentials":
        raise _OAuthError("unsupported_grant_type", "grant_type")
    if assertion_type != CLIENT_ASSERTION_TYPE or not assertion:
        raise _OAuthError("invalid_request", "assertion_missing")
    if len(assertion) > _MAX_ASSERTION_CHARS:
        raise _OAuthError("invalid_request", "assertion_too_long")
    if not staff_sub or not staff_role:
        raise _OAuthError("invalid_request", "staff_missing")
    if len(staff_sub) > 128 or not _CODE.match(staff_role):
        raise _OAuthError("invalid_request", "staff_malformed")
    if purpose is not None and purpose != "" and not _CODE.match(purpose):
        raise _OAuthError("invalid_request", "purpose_malformed")
    scopes = frozenset((scope or "").split())
    if len(scopes) > _MAX_SCOPES or not all(_SCOPE_TOKEN.match(s) for s in scopes):
        raise _OAuthError("invalid_scope", "scope_malformed")
    return _Grant(assertion=assertion, client_id=client_id or None, staff_sub=staff_sub,
                  staff_role=staff_role, purpose=purpose or None, scopes=scopes)


def _grant_token(runtime: Any, grant: _Grant, ex: Exchange, limits: RateLimits) -> dict[str, Any]:
    """All database work for one token request, run in a worker thread; records who asked in ``ex``."""
    now = datetime.now(timezone.utc)
    with runtime.sessions() as session:
        try:
            client = verify_client_assertion(session, grant.assertion, settings=runtime.settings, now=now)
        except AuthError as exc:
            if exc.client_id:  # signed with this client's key, then refused (stale, replayed, wrong aud)
                ex.detail["assertion_client"] = exc.client_id
            raise _OAuthError("invalid_client", exc.reason or "assertion") from None
        if grant.client_id is not None and grant.client_id != client.client_id:
            ex.detail["assertion_client"] = client.client_id
            raise _OAuthError("invalid_client", "client_id_mismatch")
        # The client is authenticated: the event names it, and the staff member and role it asked for.
        # The principal's role is also written to the request log line, so a role the broker does not
        # know (caller-typed text; it may be anything, even a youth's identifier) is named as UNKNOWN_ROLE.
        agency = session.get(Agency, client.agency_id)
        role = grant.staff_role if grant.staff_role in _known_roles(runtime, agency) else UNKNOWN_ROLE
        ex.principal = Principal(sub=grant.staff_sub, agency=client.agency_id, role=role,
                                 client_id=client.client_id, scopes=grant.scopes, purpose=grant.purpose)
        limits.admit_token_client(client.client_id)
        staff = session.get(Staff, grant.staff_sub)
        if staff is None or not staff.active:
            raise _OAuthError("invalid_grant", "staff_unknown_or_inactive")
        if staff.agency_id != client.agency_id:
            raise _OAuthError("invalid_grant", "staff_of_another_agency")
        if grant.staff_role not in (staff.roles or []):
            raise _OAuthError("invalid_grant", "role_not_held")
        if agency is None or grant.staff_role not in (agency.roles or []):
            raise _OAuthError("unauthorized_client", "role_not_of_agency")
        client_id, agency_id = client.client_id, client.agency_id
        session.rollback()  # read-only from here; the assertion's jti is already committed
    access_token, expires_in = runtime.issuer.issue(
        sub=grant.staff_sub,
        agency=agency_id,
        role=grant.staff_role,
        client_id=client_id,
        scopes=grant.scopes,
        purpose=grant.purpose,
        now=now,
    )
    return {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": " ".join(sorted(grant.scopes)),
    }


def _known_roles(runtime: Any, agency: Agency | None) -> frozenset[str]:
    """Roles the broker has heard of: the vocabulary's and the client's agency's."""
    known = set(runtime.vocabulary.roles) | set(runtime.vocabulary.admin_roles)
    if agency is not None:
        known |= set(agency.roles or [])
    return frozenset(known)


@router.get("/.well-known/jwks.json", summary="The broker's public signing keys (RFC 7517 JWK Set)")
async def jwks(request: Request) -> JSONResponse:
    """Public and unauthenticated so resource servers and auditors can verify tokens."""
    keys = request.app.state.runtime.signing_key.public_jwks()
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})
