"""Input limits: every oversized or malformed request gets a 4xx OperationOutcome, never a 5xx.

Requests go to the ASGI app as raw scopes (the bytes a server hands over, invalid UTF-8 and NUL
included, which an HTTP client library would refuse to send). The limits are those of
``broker/api/limits.py`` (and ``BodyLimit`` for the body); each refusal must come before
authentication, so the same answers hold without a token.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest

from broker.api import limits
from broker.app import create_app
from broker.errors import FHIR_JSON
from tests.audit.auditors import start_audit_broker, token
from tests.scenarios.harness import PUBLIC_URL

MAX_COUNT = 2  # small, so that the clamp shows on the synthetic records
NUL_HEADER = [(b"x-trace-note", b"a\x00b")]


@dataclass(frozen=True)
class Call:
    """One request as raw ASGI: raw path and query bytes, extra headers, a body."""

    method: str
    path: bytes
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    content_type: bytes | None = None
    chunked: bool = False  # body sent in 64 KiB pieces without a Content-Length
    caller: str | None = "cw"


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class Raw:
    """Sends ``Call``s straight to the app, with a real token for the caller."""

    def __init__(self, broker, tokens: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
        self.app = create_app(runtime=broker.runtime)
        self.tokens = tokens

    async def __call__(self, call: Call) -> Answer:
        headers = [(b"host", b"127.0.0.1:8000"), (b"x-purpose-of-use", b"TREAT")]
        if call.caller is not None:
            headers.append((b"authorization", f"Bearer {self.tokens[call.caller]}".encode()))
        if call.content_type is not None:
            headers.append((b"content-type", call.content_type))
        if call.body and not call.chunked:
            headers.append((b"content-length", str(len(call.body)).encode()))
        headers += call.headers
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": call.method,
                 "scheme": "http", "path": unquote(call.path.decode("latin-1")), "raw_path": call.path,
                 "root_path": "", "query_string": call.query, "headers": headers,
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
        step = 65536 if call.chunked else max(len(call.body), 1)
        pieces = [call.body[i:i + step] for i in range(0, len(call.body), step)] or [b""]
        sent: list[dict] = []

        async def receive() -> dict:
            if pieces:
                piece = pieces.pop(0)
                return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return Answer(start["status"], dict(start.get("headers", [])), body)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def raw(request, tmp_path_factory, fhir_server) -> Raw:  # type: ignore[no-untyped-def]
    """The harness broker with the audit office, once per backend, with a small maximum page size.

    PostgreSQL matters here: it cannot store NUL in text, so a NUL id that got past the edge would
    fail the registry query and the audit write (a 503) where SQLite only answers "no such team".
    """
    tmp = tmp_path_factory.mktemp(f"limits-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'broker.sqlite'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    b = await start_audit_broker(tmp, url, fhir_server.base_url, max_count=MAX_COUNT)
    yield Raw(b, {alias: await token(b, alias) for alias in ("cw", "mh", "privacy")})
    await b.aclose()


def _params(n: int) -> bytes:
    return b"&".join(b"p%d=1" % i for i in range(n))


def _nested(depth: int, opener: bytes = b"[") -> bytes:
    closer = {b"[": b"]", b"{": b"}"}[opener]
    inner = b'{"a":' * depth + b"1" + b"}" * depth if opener == b"{" else opener * depth + closer * depth
    return inner


def _consent(extension: bytes) -> bytes:
    return b'{"resourceType":"Consent","status":"active","extension":' + extension + b"}"


def _cursor(number: str) -> bytes:
    return base64.urlsafe_b64encode(number.encode()).rstrip(b"=")


JSON, FHIR = b"application/json", b"application/fhir+json"
OBS = b"/mdts/mdt-alpha/fhir/Observation"
MDT = b"/mdts/mdt-alpha"  # a route that reads no query parameter: only the edge limits apply to its query
REVIEW_BODY = json.dumps({"reason": "x"}).encode()

# id: (call, expected status, a fragment of the diagnostics)
CASES = {
    # request body (BodyLimit)
    "body-declared-too-large": (Call("POST", b"/youth", body=b"{" + b" " * 1_100_000 + b"}", content_type=JSON),
                                413, "too large"),
    "body-streamed-too-large": (Call("POST", b"/youth", body=b"[" + b"1," * 600_000 + b"1]", content_type=JSON,
                                     chunked=True), 413, "too large"),
    # query parameters: number, total length, one name or value
    "51-query-parameters": (Call("GET", MDT, _params(51)), 414, "too many query parameters"),
    "51-query-parameters-no-token": (Call("GET", MDT, _params(51), caller=None), 414, "too many query parameters"),
    "query-string-4097-bytes": (Call("GET", MDT, b"&".join([b"a=" + b"x" * 1000] * 4) + b"&b=" + b"y" * 83),
                                414, "query string is too long"),
    "query-value-1025-chars": (Call("GET", MDT, b"a=" + b"x" * 1025), 400, "too long"),
    "query-name-1025-chars": (Call("GET", MDT, b"x" * 1025 + b"=1"), 400, "too long"),
    "query-value-1025-two-byte-chars": (Call("GET", MDT, b"a=" + "é".encode() * 1025), 400, "too long"),
    "path-2049-bytes": (Call("GET", b"/mdts/" + b"a" * 2043), 414, "path is too long"),
    # _count and other numbers
    "count-zero": (Call("GET", OBS, b"_count=0"), 400, "_count must be at least 1"),
    "count-8-digits": (Call("GET", OBS, b"_count=12345678"), 400, "_count must be"),
    "count-superscript-two": (Call("GET", OBS, b"_count=%C2%B2"), 400, "_count must be"),
    "offset-arabic-indic-digit": (Call("GET", OBS, b"_offset=%D9%A3"), 400, "_offset must be"),
    "audit-limit-superscript-two": (Call("GET", b"/audit/events", b"limit=%C2%B2", caller="privacy"), 400, "limit"),
    "audit-outcome-superscript-two": (Call("GET", b"/audit/events", b"outcome=%C2%B2%C2%B9%C2%B9", caller="privacy"),
                                      400, "outcome"),
    "audit-cursor-beyond-bigint": (Call("GET", b"/audit/events", b"cursor=" + _cursor("9" * 19), caller="privacy"),
                                   400, "cursor"),
    "audit-verify-from-beyond-bigint": (Call("GET", b"/audit/verify", b"from=" + b"9" * 30, caller="privacy"),
                                        400, "from"),
    "audit-export-since-beyond-bigint": (Call("GET", b"/audit/export", b"since_seq=" + b"9" * 20, caller="privacy"),
                                         400, "since_seq"),
    # deeply nested JSON
    "consent-10000-brackets": (Call("POST", b"/consents", body=b"[" * 10_000, content_type=FHIR), 400, "nested"),
    "youth-10000-brackets": (Call("POST", b"/youth", body=b"[" * 10_000, content_type=JSON), 400, "nested"),
    "youth-10000-objects": (Call("POST", b"/youth", body=b'{"a":' * 10_000, content_type=JSON), 400, "nested"),
    "consent-extension-65-deep": (Call("POST", b"/consents", body=_consent(_nested(64)), content_type=FHIR),
                                  400, "nested"),
    "mdt-1000-deep": (Call("POST", b"/mdts", body=b'{"youth_id":' + _nested(1000) + b"}", content_type=JSON),
                      400, "nested"),
    "decide-1000-deep-objects": (Call("POST", b"/policy/decide", body=_nested(1000, b"{"), content_type=JSON),
                                 400, "nested"),
    "review-10000-brackets": (Call("POST", b"/audit/break-glass/g1/review", body=b"[" * 10_000, content_type=JSON,
                                   caller="privacy"), 400, "nested"),
    "break-glass-10000-brackets-no-token": (Call("POST", b"/mdts/mdt-alpha/break-glass", body=b"[" * 10_000,
                                                 content_type=JSON, caller=None), 400, "nested"),
    # invalid UTF-8
    "query-percent-ff": (Call("GET", OBS, b"code=%FF%FE"), 400, "query string is not valid UTF-8"),
    "query-raw-ff": (Call("GET", OBS, b"code=\xff"), 400, "query string is not valid UTF-8"),
    "query-overlong-slash": (Call("GET", MDT, b"a=%C0%AF"), 400, "query string is not valid UTF-8"),
    "query-lone-surrogate": (Call("GET", MDT, b"a=%ED%A0%80"), 400, "query string is not valid UTF-8"),
    "path-percent-ff": (Call("GET", b"/mdts/%FF%FE/record"), 400, "path is not valid UTF-8"),
    "path-raw-ff": (Call("GET", b"/youth/\xff"), 400, "path is not valid UTF-8"),
    "youth-body-ff": (Call("POST", b"/youth", body=b'{"identifiers":[],"x":"\xff"}', content_type=JSON),
                      400, "JSON body is not valid UTF-8"),
    "consent-body-ff": (Call("POST", b"/consents", body=b'{"resourceType":"Consent","x":"\xff"}', content_type=FHIR),
                        400, "JSON body is not valid UTF-8"),
    "consent-body-latin1": (Call("POST", b"/consents", body='{"resourceType":"Consent","x":"é"}'.encode("latin-1"),
                                 content_type=FHIR + b"; charset=utf-8"), 400, "JSON body is not valid UTF-8"),
    # NUL
    "query-nul": (Call("GET", OBS, b"code=a%00b"), 400, "NUL"),
    "query-name-nul": (Call("GET", MDT, b"a%00=1"), 400, "NUL"),
    "path-nul": (Call("GET", b"/youth/a%00b"), 400, "NUL"),
    "path-nul-no-token": (Call("GET", b"/mdts/a%00b/record", caller=None), 400, "NUL"),
    "json-escaped-nul": (Call("POST", b"/youth", body=b'{"identifiers":[{"source":"county-ehr","value":"a\\u0000"}]}',
                              content_type=JSON), 400, "NUL"),
    "consent-escaped-nul": (Call("POST", b"/consents", body=b'{"resourceType":"Consent","id":"\\u0000"}',
                                 content_type=FHIR), 400, "NUL"),
    "header-nul": (Call("GET", MDT, headers=NUL_HEADER), 400, "NUL"),
    # headers
    "header-8193-bytes": (Call("GET", MDT, headers=[(b"x-junk", b"a" * 8187)]), 431, "header field is too large"),
    "authorization-9000-bytes": (Call("GET", OBS, headers=[(b"authorization", b"Bearer " + b"a" * 9000)],
                                      caller=None), 431, "header field is too large"),
    "headers-over-16-KiB": (Call("GET", MDT, headers=[(b"x-junk-%d" % i, b"a" * 6000) for i in range(3)]),
                            431, "header fields are too large"),
    "101-headers": (Call("GET", MDT, headers=[(b"x-h%d" % i, b"1") for i in range(101)]), 431,
                    "too many request header fields"),
}

# Just inside every limit: the same routes answer as usual.
ACCEPTED = {
    "50-query-parameters": (Call("GET", MDT, _params(50)), 200),
    "query-string-4096-bytes": (Call("GET", MDT, b"&".join([b"a=" + b"x" * 1000] * 4) + b"&b=" + b"y" * 82), 200),
    "query-value-1024-chars": (Call("GET", MDT, b"a=" + "é".encode() * 1024), 200),  # chars, not bytes
    "path-2048-bytes": (Call("GET", b"/" + b"a" * 2047), 404),  # no such route
    "header-8192-bytes": (Call("GET", MDT, headers=[(b"x-junk", b"a" * 8186)]), 200),
    "100-headers": (Call("GET", MDT, headers=[(b"x-h%d" % i, b"1") for i in range(100 - 5)]), 200),
    "consent-extension-64-deep": (Call("POST", b"/consents", body=_consent(_nested(63)), content_type=FHIR), 422),
    "brackets-inside-strings": (Call("POST", b"/mdts/mdt-alpha/break-glass", content_type=JSON, body=json.dumps(
        {"purpose": "ETREAT", "reason": 'quote " backslash \\ ' + "[" * 500 + "{" * 500}).encode()), 201),
    "escaped-u0000-text": (Call("POST", b"/mdts/mdt-alpha/break-glass", content_type=JSON, body=json.dumps(
        {"purpose": "ETREAT", "reason": "the text \\u0000 is not a NUL"}).encode()), 201),
    "utf8-everywhere": (Call("GET", "/youth/ÿ-é".encode(), "a=é&b=%E2%82%AC".encode(),
                             content_type=None), 403),
}


def _check_outcome(answer: Answer, call: Call) -> dict:
    assert answer.headers.get(b"content-type", b"").startswith(FHIR_JSON.encode()), answer.headers
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"], body
    assert b"Traceback" not in answer.body and b"x" * 100 not in answer.body and b"a" * 100 not in answer.body
    assert call.query[:40] not in answer.body or not call.query
    return body


@pytest.mark.parametrize("case", list(CASES))
async def test_limit_is_refused_with_an_outcome(raw, case):
    call, status, fragment = CASES[case]
    answer = await raw(call)
    assert answer.status == status, (answer.status, answer.body[:300])
    body = _check_outcome(answer, call)
    assert fragment in body["issue"][0]["diagnostics"], body


@pytest.mark.parametrize("case", list(ACCEPTED))
async def test_just_inside_the_limits_is_answered_as_usual(raw, case):
    call, status = ACCEPTED[case]
    answer = await raw(call)
    assert answer.status == status, (answer.status, answer.body[:300])


async def test_count_above_the_maximum_is_lowered_to_it(raw):
    """Clamped, not refused: FHIR lets a server return fewer than asked; the next link says the real page size."""
    answer = await raw(Call("GET", OBS, b"_count=100000", caller="mh"))
    assert answer.status == 200, answer.body[:300]
    bundle = answer.json()
    assert len(bundle["entry"]) == MAX_COUNT and "total" not in bundle
    nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    assert f"_count={MAX_COUNT}&_offset={MAX_COUNT}" in nxt and nxt.startswith(PUBLIC_URL)


@pytest.mark.parametrize(("text", "exceeds"), [
    (b"[" * 65 + b"]" * 65, True), (b"[" * 64 + b"]" * 64, False), (b'{"a":' * 65 + b"1" + b"}" * 65, True),
    (b'["' + b"[" * 100 + b'"]', False),  # brackets in a string
    (b'["\\"' + b"[" * 100 + b'"]', False),  # after an escaped quote, still in the string
    (b'["\\\\"' + b",[" * 100 + b"]" * 100 + b"]", True),  # an escaped backslash ends before the quote
    (b'["\\\\\\"' + b"[" * 100 + b'"]', False),  # escaped backslash, then an escaped quote
    (b"]" * 100 + b"[" * 64, False),  # unbalanced nonsense is the parser's to refuse
    (b"[" * 10_000, True), (b"[1," * 65 + b"2" + b"]" * 65, True), (b"[" + b"[[],[[]]]," * 5000 + b"1]", False),
    (b"[" * 10 + b"[" * 60 + b"]" * 60, False),  # unclosed: malformed, and only 70 deep: the parser refuses it
], ids=lambda v: f"{v[:12].decode()}...{len(v)}" if isinstance(v, bytes) else str(v))
def test_json_depth_scan(text, exceeds):
    """The scan by itself, on the tricky inputs: strings, escapes, width, unbalanced text."""
    unescaped = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    assert limits.json_depth_exceeds(unescaped, 64) is exceeds
