"""Input limits at the edge: one ASGI middleware that refuses oversized or malformed requests early.

Every refusal is a FHIR OperationOutcome with a fixed diagnostic that never echoes what was
sent. The checks run before routing, authentication and the pipeline, so a refused request is
neither authenticated nor audited (like the 413 of ``BodyLimit``, which bounds the body that
the JSON checks here read).

| what                                   | limit                     | answer |
|----------------------------------------|---------------------------|--------|
| path (raw, percent-encoded)            | ``MAX_PATH_BYTES``        | 414    |
| query string (raw)                     | ``MAX_QUERY_BYTES``       | 414    |
| query parameters                       | ``MAX_QUERY_PARAMS``      | 414    |
| one query parameter name or value      | ``MAX_QUERY_VALUE_CHARS`` | 400    |
| path or query not UTF-8 once decoded   |                           | 400    |
| NUL in path, query, header or JSON     |                           | 400    |
| one header line (name + value)         | ``MAX_HEADER_BYTES``      | 431    |
| all headers together / their number    | ``MAX_HEADERS_BYTES`` / ``MAX_HEADERS`` | 431 |
| JSON body not UTF-8                    |                           | 400    |
| JSON body nested deeper than           | ``MAX_JSON_DEPTH``        | 400    |
| request body                           | ``Settings.max_body_bytes`` (``BodyLimit``) | 413 |

NUL is refused everywhere because PostgreSQL cannot store it in text and no FHIR string may
contain it. FHIR ``_count`` above ``Settings.max_count`` is not refused: the search facade lowers
it to the maximum, as FHIR allows a server to return fewer results than asked for
(``broker/pipeline/search_params.py``).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import outcome_response

MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 4096
MAX_QUERY_PARAMS = 50
MAX_QUERY_VALUE_CHARS = 1024
MAX_HEADER_BYTES = 8192
MAX_HEADERS_BYTES = 16384
MAX_HEADERS = 100
MAX_JSON_DEPTH = 64
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Statuses any route can answer because of the edge (this middleware and BodyLimit); the OpenAPI
# document lists them on every operation.
EDGE_RESPONSES = {
    400: "OperationOutcome: malformed request (not UTF-8, a NUL character, a JSON body nested too deeply, "
         "or a query parameter too long)",
    413: "OperationOutcome: request body too large",
    414: "OperationOutcome: request URI too long (path, query string or number of query parameters)",
    431: "OperationOutcome: request header fields too large",
}

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_PARENS = bytes.maketrans(b"[]{}", b"()()")


class Refusal(Exception):
    """A request the edge refuses: status, FHIR issue type and a fixed diagnostic."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics


class InputLimits:
    """Refuse requests beyond the limits above; pass everything else through unchanged.

    Safe for concurrent use (no state between requests). Bodies of POST, PUT, PATCH and DELETE are
    read whole before the app sees them (``BodyLimit``, outside this middleware, bounds their size)
    and then replayed.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_head(scope)
            if scope.get("method") in BODY_METHODS:
                # Read here, under BodyLimit, so that a streamed body over the limit is its 413 and not
                # an exception inside a route (where the pipeline would turn it into a 503).
                body, receive = await _read_body(receive)
                if _is_json(scope):
                    check_json_body(body)
        except Refusal as refusal:
            await outcome_response(refusal.status, refusal.code, refusal.diagnostics)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def check_head(scope: Scope) -> None:
    """Path, query string and headers; raise Refusal on the first limit crossed."""
    _check_path(scope)
    _check_query(scope.get("query_string", b""))
    _check_headers(scope.get("headers", ()))


def _check_path(scope: Scope) -> None:
    path = scope.get("path", "")
    raw = scope.get("raw_path")
    if raw is not None:
        raw = raw.split(b"?", 1)[0]  # some servers leave the query on it; a literal "?" cannot be in a path
        if len(raw) > MAX_PATH_BYTES:
            raise Refusal(414, "too-long", "the request path is too long")
        _decoded_text(unquote_to_bytes(raw), "the request path")
    elif len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise Refusal(414, "too-long", "the request path is too long")
    if "\x00" in path or not _encodable(path):  # what the router sees, however the server decoded it
        raise Refusal(400, "invalid", "the request path is not valid UTF-8 or contains a NUL character")


def _check_query(query: bytes) -> None:
    if not query:
        return
    if len(query) > MAX_QUERY_BYTES:
        raise Refusal(414, "too-long", "the query string is too long")
    pairs = [p for p in query.split(b"&") if p]
    if len(pairs) > MAX_QUERY_PARAMS:
        raise Refusal(414, "too-long", "too many query parameters")
    for pair in pairs:
        for part in pair.split(b"=", 1):
            text = _decoded_text(unquote_to_bytes(part.replace(b"+", b" ")), "the query string")
            if len(text) > MAX_QUERY_VALUE_CHARS:
                raise Refusal(400, "too-long", "a query parameter name or value is too long")


def _check_headers(headers) -> None:  # type: ignore[no-untyped-def]
    if len(headers) > MAX_HEADERS:
        raise Refusal(431, "too-long", "too many request header fields")
    total = 0
    for name, value in headers:
        size = len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            raise Refusal(431, "too-long", "a request header field is too large")
        total += size
        if b"\x00" in value or b"\x00" in name:
            raise Refusal(400, "invalid", "a request header contains a NUL character")
    if total > MAX_HEADERS_BYTES:
        raise Refusal(431, "too-long", "the request header fields are too large")


def check_json_body(body: bytes) -> None:
    """UTF-8, no NUL (raw or escaped), and nesting no deeper than MAX_JSON_DEPTH; not a full parse."""
    _decoded_text(body, "the JSON body")
    # Drop escaped backslashes, then escaped quotes: what is left of a backslash escapes one
    # character that is neither, so quotes now delimit strings exactly.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b"\\u0000" in unescaped:
        raise Refusal(400, "invalid", "the JSON body contains a NUL character")
    if json_depth_exceeds(unescaped, MAX_JSON_DEPTH):
        raise Refusal(400, "too-long", f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")


def json_depth_exceeds(unescaped: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` (strings already free of escaped quotes).

    In C-speed passes, not a Python loop over every bracket: outside the strings, brackets become
    "(" and ")", and each pass removes every adjacent "()" -- the innermost level. A balanced
    text of depth d is gone after d passes, so a pair left after ``limit`` passes is too deep.
    If no pair is left, only unmatched brackets remain (")" * a + "(" * b): too deep when more
    than ``limit`` are left open; otherwise the JSON is malformed and its parser refuses it.
    """
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(_PARENS, _NOT_BRACKETS)
    if brackets.count(b"(") <= limit:
        return False
    for _ in range(limit):
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    return b"()" in brackets or brackets.count(b"(") > limit


def _decoded_text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "invalid", f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise Refusal(400, "invalid", f"{what} contains a NUL character")
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\ufffd" not in text


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media in (b"application/json", b"application/fhir+json") or media.endswith(b"+json")
    return False


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole body, and a receive that replays it to the app and then passes on what follows."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: let the app see that
            return b"", _replay([message], receive)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
