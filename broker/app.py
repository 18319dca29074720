"""The FastAPI application factory."""

from __future__ import annotations

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


SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"))


class SecurityHeaders:
    """Headers every response carries; no server banner."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, wrapped)


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; with a runtime given (tests), use it as is."""
    from broker.api import fhir, health, oauth
    from broker.api import policy as policy_api
    from broker.api import audit_integrity, policy_admin
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
            await runtime.aclose()

    app = FastAPI(title="mdt-broker", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if settings.mode == "demo" else None, redoc_url=None,
                  description="Consent-aware information-sharing broker for CSEC multidisciplinary teams.")
    app.state.runtime = runtime
    app.state.pipeline = Pipeline(runtime)
    app.state.policy_reloader = reloader
    install_handlers(app)
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
    app.include_router(fhir.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
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

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, model in sorted(DOCUMENTED_BODIES.items()):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for def_name, definition in schema.pop("$defs", {}).items():
            components.setdefault(def_name, definition)
        components[name] = schema
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    doc["security"] = [{"bearer": []}]
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
