"""Baseline for bench/gateway.py: a raw FHIR passthrough proxy on the broker's HTTP stack.

    .venv/bin/python bench/passthrough.py --upstream http://127.0.0.1:PORT/fhir/R4 --port 8001

``GET /fhir/{type}?<query>`` is forwarded verbatim to ``<upstream>/{type}?<query>`` and the
upstream's status, content type and body are returned. No authentication, no policy, no
audit, no parsing: what any Python gateway on this stack costs before it does any work.

The stack is the broker's, piece for piece, so the difference is the broker's own work:
- a FastAPI app served by ``uvicorn.run`` with the arguments ``broker serve`` uses (one
  process, uvicorn's default loop and HTTP implementation -- uvloop and httptools when
  installed --, no server header, no access log, no log config);
- one shared ``aiohttp.ClientSession`` built like ``connectors/fhir.py`` builds its session
  (same connector limits, timeouts and Accept header), created on the serving loop; the body
  is read whole, in 64 KiB chunks, as the connector reads it.

``--audit-db URL --audit-event FILE`` makes it the *audited* passthrough, bench/gateway.py's
fourth target: what any gateway that looks at every resource and durably audits every request
costs here before it decides anything. For each answer it also parses the upstream JSON and
serializes it again (orjson, as the broker does), and before answering commits one audit event
through the broker's own sink (``GroupCommitAuditSink`` with its normal settings, on a database
``broker db upgrade`` would create: for SQLite, WAL with ``synchronous=FULL``). The event is the
JSON object in FILE (gateway.py takes the one the broker wrote for the same search) with a fresh
``request_id`` and ``time``. It collects garbage as ``broker serve`` does (``tune_gc_for_serving``).
No authentication, no policy, no classification, no labels.
"""

from __future__ import annotations

import argparse
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response
from yarl import URL

_ACCEPT = {"Accept": "application/fhir+json"}


def create_app(upstream: str, *, audit_db: str | None = None, audit_event: dict[str, Any] | None = None) -> FastAPI:
    """The proxy app for one upstream FHIR base URL; with ``audit_db`` and ``audit_event``, the audited one."""
    base = upstream.rstrip("/")
    state: dict[str, Any] = {}
    sink = None
    if audit_db is not None:
        from broker.audit.group import GroupCommitAuditSink
        from broker.audit.sink import append_async
        from broker.store.db import make_engine, make_sessionmaker

        if audit_event is None:
            raise ValueError("the audited passthrough needs an audit event to commit")
        sink = GroupCommitAuditSink(make_sessionmaker(make_engine(audit_db)))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=32, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            raise_for_status=False,
            auto_decompress=True,
        )
        try:
            yield
        finally:
            await state["session"].close()
            if sink is not None:
                sink.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/fhir/{resource_type}")
    async def forward(resource_type: str, request: Request) -> Response:
        query = request.url.query
        url = URL(f"{base}/{resource_type}" + (f"?{query}" if query else ""), encoded=True)
        async with state["session"].get(url, headers=_ACCEPT, allow_redirects=False) as resp:
            chunks = [chunk async for chunk in resp.content.iter_chunked(65536)]
            status, media_type = resp.status, resp.headers.get("Content-Type", "application/fhir+json")
        body = b"".join(chunks)
        if sink is not None:
            body = orjson.dumps(orjson.loads(body))
            await append_async(sink, {**audit_event, "request_id": uuid.uuid4().hex,
                                      "time": datetime.now(timezone.utc)})
        return Response(body, status_code=status, media_type=media_type)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the FHIR base URL, e.g. http://127.0.0.1:9000/fhir/R4")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--audit-db", help="audited: commit one audit event per answer to this database URL")
    parser.add_argument("--audit-event", type=Path, help="audited: the JSON audit event to commit")
    args = parser.parse_args()
    if (args.audit_db is None) != (args.audit_event is None):
        parser.error("--audit-db and --audit-event go together")
    import uvicorn

    event = None
    if args.audit_db is not None:
        from broker.store.db import upgrade

        upgrade(args.audit_db)
        event = orjson.loads(args.audit_event.read_bytes())
        for chained in ("sequence", "previous_hash", "hash"):  # the sink chains it afresh
            event.pop(chained, None)
    app = create_app(args.upstream, audit_db=args.audit_db, audit_event=event)
    if args.audit_db is not None:
        from broker.cli import tune_gc_for_serving

        tune_gc_for_serving()
    # Exactly the keyword arguments of `broker serve` (broker/cli.py cmd_serve).
    uvicorn.run(app, host=args.host, port=args.port, server_header=False, access_log=False, log_config=None)


if __name__ == "__main__":
    main()
