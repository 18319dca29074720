"""The FastAPI application factory."""

from __future__ import annotations

import base64
import hashlib
import re
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy import text
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import __version__
from broker.errors import install_handlers, outcome_response
from broker.pipeline import Pipeline
from broker.runtime import Runtime, build_runtime
from broker.settings import Settings

class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await outcome_response(413, "too-costly", "request body too large")(scope, receive, send)
                    return
        seen = 0
        too_large = False

        async def limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await outcome_response(413, "too-costly", "request body too large")(scope, receive, send)


class _TooLarge(Exception):
    pass


# Every response: no sniffing, no caching, no referrer, not framable, not readable cross-origin without CORS.
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"cross-origin-resource-policy", b"same-origin"))
API_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# The demo-only Swagger UI: its bundle and stylesheet from the CDN FastAPI uses, its inline
# scripts by hash (computed from the page actually served), nothing else.
DOCS_CSP = ("default-src 'none'; script-src https://cdn.jsdelivr.net {hashes}; "
            "style-src https://cdn.jsdelivr.net 'unsafe-inline'; img-src https://fastapi.tiangolo.com data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HSTS = b"max-age=31536000"
BANNERS = frozenset({b"server", b"x-powered-by"})
# Public documents a resource server may cache; everything else can carry data and is no-store.
CACHEABLE_PATHS = frozenset({"/.well-known/jwks.json"})
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


class SecurityHeaders:
    """Headers every response carries, 500s included (it wraps the whole stack); no server banner.

    A response that sets its own Content-Security-Policy keeps it (the printable accounting page);
    Cache-Control is forced to ``no-store`` except on ``CACHEABLE_PATHS``.
    """

    def __init__(self, app: ASGIApp, *, hsts: bool = False, docs_paths: frozenset[str] = frozenset()) -> None:
        self.app, self.hsts, self.docs_paths = app, hsts, docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in self.docs_paths:
            await self._docs(scope, receive, send, path)
            return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = self._headers(message.get("headers", []), path, API_CSP)
            await send(message)

        await self.app(scope, receive, wrapped)

    async def _docs(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Buffer the (small) docs page so its CSP can name the hashes of its inline scripts."""
        held: list[Message] = []

        async def buffered(message: Message) -> None:
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
                hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                                  for script in _INLINE_SCRIPT.findall(body))
                start = held[0]
                start["headers"] = self._headers(start.get("headers", []), path,
                                                 DOCS_CSP.format(hashes=hashes).encode())
                for m in held:
                    await send(m)
                held.clear()

        await self.app(scope, receive, buffered)

    def _headers(self, raw: Any, path: str, csp: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in raw if k.lower() not in BANNERS]
        if path not in CACHEABLE_PATHS:
            headers = [(k, v) for k, v in headers if k.lower() not in (b"cache-control", b"pragma")]
            headers += [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
        present = {k.lower() for k, _ in headers}
        headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
        if b"content-security-policy" not in present:
            headers.append((b"content-security-policy", csp))
        if self.hsts:
            headers.append((b"strict-transport-security", HSTS))
        return headers


class AllowListCors:
    """CORS for an explicit list of browser origins (``BROKER_CORS_ALLOW_ORIGINS``); off by default.

    Requests from a listed origin go through Starlette's CORSMiddleware; any other origin bypasses
    it and so gets no ``Access-Control-*`` header at all (a preflight is then a plain 405).
    """

    def __init__(self, app: ASGIApp, *, origins: list[str]) -> None:
        from starlette.middleware.cors import CORSMiddleware

        listed = sorted({o.lower() for o in origins})  # browsers send the serialized (lower-case) origin
        self.app, self.origins = app, frozenset(o.encode() for o in listed)
        self.cors = CORSMiddleware(app, allow_origins=listed, allow_methods=("GET", "POST", "DELETE"),
                                   allow_headers=("Authorization", "Content-Type", "X-Purpose-Of-Use"),
                                   expose_headers=("X-Request-Id", "Retry-After"), allow_credentials=False,
                                   max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = next((v for k, v in scope.get("headers", ()) if k == b"origin"), b"") \
            if scope["type"] == "http" else b""
        await (self.cors if origin in self.origins else self.app)(scope, receive, send)


def _outermost(app: FastAPI, middleware: Any, **options: Any) -> None:
    """Wrap ``middleware`` around the whole stack, outside Starlette's ServerErrorMiddleware.

    ``add_middleware`` places user middleware inside it, so the 500 it sends would otherwise
    miss the security headers.
    """
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: middleware(build(), **options)  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; with a runtime given (tests), use it as is."""
    from broker.api import fhir, health, oauth
    from broker.api import policy as policy_api
    from broker.api import audit_integrity, policy_admin
    from broker.api.limits import InputLimits
    from broker.audit import api as audit_api
    from broker.breakglass import views as breakglass_views
    from broker.consent import views as consent_views
    from broker.observability import configure_logging, configure_tracing
    from broker.orders import views as order_views
    from broker.registry import views as registry_views

    if runtime is None:
        assert settings is not None
        runtime = build_runtime(settings)
    settings = runtime.settings
    configure_logging(settings.log_level)
    configure_tracing(settings.otel_exporter, settings.otel_endpoint)

    from broker.policy.reload import PolicyReloader

    reloader = PolicyReloader(runtime, policy_dir=settings.policy_dir, override=settings.policy_override_file)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        stop = _start_policy_triggers(reloader, watch=settings.policy_watch)
        stop_checkpoints = _start_checkpoints(runtime)
        try:
            yield
        finally:
            await stop()
            await stop_checkpoints()  # the final checkpoint, before the engine is disposed
            _app.state.pipeline.close()
            await runtime.aclose()

    app = FastAPI(title="mdt-broker", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if settings.mode == "demo" else None, redoc_url=None,
                  description="Consent-aware information-sharing broker for CSEC multidisciplinary teams.")
    app.state.runtime = runtime
    app.state.pipeline = Pipeline(runtime)
    app.state.policy_reloader = reloader
    install_handlers(app)
    # The data routes first: Starlette tries routes in order, and the hot path should not be
    # matched against every registry route before its own (no other route shares their paths).
    app.include_router(fhir.router)
    app.include_router(health.router)
    app.include_router(oauth.router)
    app.include_router(registry_views.router)
    app.include_router(consent_views.router)
    app.include_router(order_views.router)
    app.include_router(breakglass_views.router)
    app.include_router(policy_api.router)
    app.include_router(policy_admin.router)
    app.include_router(audit_api.router)
    app.include_router(audit_integrity.router)
    app.add_middleware(InputLimits)  # inside BodyLimit, which bounds the bodies it reads
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_allow_origins:
        app.add_middleware(AllowListCors, origins=settings.cors_allow_origins)
    docs = {app.docs_url, app.swagger_ui_oauth2_redirect_url} - {None} if app.docs_url else set()
    _outermost(app, SecurityHeaders, hsts=settings.public_url.startswith("https://"), docs_paths=frozenset(docs))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _start_checkpoints(runtime: Runtime):  # type: ignore[no-untyped-def]
    """Sign the audit chain head periodically and once more on shutdown; returns an async stopper."""
    import asyncio
    import contextlib

    from broker.audit.checkpoint import CheckpointTask

    if runtime.audit_key is None:
        async def nothing() -> None:
            return None

        return nothing
    task = CheckpointTask(runtime.sessions, runtime.audit_key, runtime.settings.audit_checkpoint_interval_seconds)
    running = asyncio.get_running_loop().create_task(task.run())

    async def stop() -> None:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await task.final()

    return stop


def _start_policy_triggers(reloader: Any, *, watch: bool):  # type: ignore[no-untyped-def]
    """SIGHUP (main thread only) and, if configured, the file watcher; returns an async stopper."""
    import asyncio
    import contextlib

    from broker.policy.reload import install_sighup
    from broker.policy.reload import watch as watch_files

    loop = asyncio.get_running_loop()
    uninstall = None
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
        uninstall = install_sighup(reloader, loop)
    watcher = loop.create_task(watch_files(reloader)) if watch else None

    async def stop() -> None:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if uninstall is not None:
            uninstall()

    return stop


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, including bodies the pipeline parses itself."""
    if app.openapi_schema:
        return app.openapi_schema
    from broker.registry.views import DOCUMENTED_BODIES
    from broker.api.limits import EDGE_RESPONSES
    from broker.errors import document_errors

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, model in sorted(DOCUMENTED_BODIES.items()):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for def_name, definition in schema.pop("$defs", {}).items():
            components.setdefault(def_name, definition)
        components[name] = schema
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    doc["security"] = [{"bearer": []}]
    # Every audited route answers 429 over the client's quota (broker/ratelimit.py); listing it on the
    # few unaudited ones (health, keys) over-documents harmlessly.
    document_errors(doc, edge={**EDGE_RESPONSES, 429: "OperationOutcome: over the client's request quota; see Retry-After"})
    app.openapi_schema = doc
    return doc


def readiness(runtime: Runtime) -> JSONResponse:
    """Ready when the database answers."""
    try:
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ready", "policy_version": runtime.policy.version})
