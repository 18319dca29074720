"""``POST /oauth/token`` and ``GET /.well-known/jwks.json``.

An agency system authenticates with an RFC 7523 client assertion and asks for a short-lived
access token for one of its own staff members, in one of that person's roles. Errors follow
RFC 6749 §5.2 (JSON body, ``Cache-Control: no-store``) and say nothing about whether a staff
member exists in another agency.

Collaborators come from ``request.app.state.runtime``: ``settings``, ``sessions`` (a
sessionmaker), ``issuer`` (TokenIssuer) and ``signing_key`` (BrokerKey).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from broker.auth.client_assertion import CLIENT_ASSERTION_TYPE, verify_client_assertion
from broker.auth.tokens import AuthError
from broker.store.models import Agency, Staff

__all__ = ["router"]

router = APIRouter(tags=["oauth"])

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# RFC 6749 appendix A.4 scope-token; purpose codes and ids are kept to a safe, short alphabet.
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,64}$")
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_MAX_SCOPES = 20
_MAX_ASSERTION_CHARS = 16_384
_SINGLE_VALUED = ("grant_type", "client_assertion_type", "client_assertion", "client_id", "staff_sub",
                  "staff_role", "purpose_of_use", "scope")

_STAFF_REFUSED = "The client may not obtain a token for this staff member in this role"


class _OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error)
        self.error, self.description = error, description


def _error_response(error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description},
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


@router.post(
    "/oauth/token",
    summary="Obtain a short-lived access token for one staff member (RFC 7523 client assertion)",
    responses={400: {"description": "RFC 6749 error"}, 401: {"description": "invalid_client"}},
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
) -> JSONResponse:
    """Fields are optional here so that a missing one is an RFC 6749 error, not a 422."""
    runtime = request.app.state.runtime
    try:
        await _check_request_shape(request)
        grant = _parse(grant_type, client_assertion_type, client_assertion, staff_sub, staff_role,
                       purpose_of_use, scope, client_id)
        vocabulary = getattr(runtime, "vocabulary", None)
        if grant.purpose is not None and vocabulary is not None and grant.purpose not in vocabulary.purposes:
            raise _OAuthError("invalid_request", "purpose_of_use is not a known purpose of use")
        body = await run_in_threadpool(_grant_token, runtime, grant)
    except _OAuthError as exc:
        return _error_response(exc.error, exc.description)
    return JSONResponse(body, headers=_NO_STORE)


async def _check_request_shape(request: Request) -> None:
    """RFC 6749 §3.2 and §2.3: form-encoded, each parameter once, one authentication method."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise _OAuthError("invalid_request", "The request must be application/x-www-form-urlencoded")
    if "authorization" in request.headers:
        raise _OAuthError("invalid_request", "Use exactly one client authentication method")
    form = await request.form()
    for name in _SINGLE_VALUED:
        if len(form.getlist(name)) > 1:
            raise _OAuthError("invalid_request", "A request parameter was repeated")
    if "client_secret" in form:
        raise _OAuthError("invalid_request", "Use exactly one client authentication method")


def _parse(grant_type: str | None, assertion_type: str | None, assertion: str | None,
           staff_sub: str | None, staff_role: str | None, purpose: str | None, scope: str | None,
           client_id: str | None) -> _Grant:
    if not grant_type:
        raise _OAuthError("invalid_request", "grant_type is required")
    if grant_type != "client_credentials":
        raise _OAuthError("unsupported_grant_type", "Only the client_credentials grant is supported")
    if assertion_type != CLIENT_ASSERTION_TYPE or not assertion:
        raise _OAuthError("invalid_request",
                          "client_assertion_type must be jwt-bearer and client_assertion is required")
    if len(assertion) > _MAX_ASSERTION_CHARS:
        raise _OAuthError("invalid_request", "client_assertion is too long")
    if not staff_sub or not staff_role:
        raise _OAuthError("invalid_request", "staff_sub and staff_role are required")
    if len(staff_sub) > 128 or not _CODE.match(staff_role):
        raise _OAuthError("invalid_request", "staff_sub or staff_role is malformed")
    if purpose is not None and purpose != "" and not _CODE.match(purpose):
        raise _OAuthError("invalid_request", "purpose_of_use is malformed")
    scopes = frozenset((scope or "").split())
    if len(scopes) > _MAX_SCOPES or not all(_SCOPE_TOKEN.match(s) for s in scopes):
        raise _OAuthError("invalid_scope", "The requested scope is malformed")
    return _Grant(assertion=assertion, client_id=client_id or None, staff_sub=staff_sub,
                  staff_role=staff_role, purpose=purpose or None, scopes=scopes)


def _grant_token(runtime: Any, grant: _Grant) -> dict[str, Any]:
    """All database work for one token request, run in a worker thread."""
    now = datetime.now(timezone.utc)
    with runtime.sessions() as session:
        try:
            client = verify_client_assertion(session, grant.assertion, settings=runtime.settings, now=now)
        except AuthError as exc:
            raise _OAuthError("invalid_client", exc.description) from None
        if grant.client_id is not None and grant.client_id != client.client_id:
            raise _OAuthError("invalid_client", "client_id does not match the client assertion")
        staff = session.get(Staff, grant.staff_sub)
        if staff is None or not staff.active or staff.agency_id != client.agency_id:
            raise _OAuthError("invalid_grant", _STAFF_REFUSED)
        if grant.staff_role not in (staff.roles or []):
            raise _OAuthError("invalid_grant", _STAFF_REFUSED)
        agency = session.get(Agency, client.agency_id)
        if agency is None or grant.staff_role not in (agency.roles or []):
            raise _OAuthError("unauthorized_client", "The client's agency may not act in this role")
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


@router.get("/.well-known/jwks.json", summary="The broker's public signing keys (RFC 7517 JWK Set)")
async def jwks(request: Request) -> JSONResponse:
    """Public and unauthenticated so resource servers and auditors can verify tokens."""
    keys = request.app.state.runtime.signing_key.public_jwks()
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})
