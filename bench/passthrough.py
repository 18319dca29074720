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
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request
from starlette.responses import Response
from yarl import URL

_ACCEPT = {"Accept": "application/fhir+json"}


def create_app(upstream: str) -> FastAPI:
    """The proxy app for one upstream FHIR base URL."""
    base = upstream.rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

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

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/fhir/{resource_type}")
    async def forward(resource_type: str, request: Request) -> Response:
        query = request.url.query
        url = URL(f"{base}/{resource_type}" + (f"?{query}" if query else ""), encoded=True)
        async with state["session"].get(url, headers=_ACCEPT, allow_redirects=False) as resp:
            chunks = [chunk async for chunk in resp.content.iter_chunked(65536)]
            return Response(b"".join(chunks), status_code=resp.status,
                            media_type=resp.headers.get("Content-Type", "application/fhir+json"))

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the FHIR base URL, e.g. http://127.0.0.1:9000/fhir/R4")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    import uvicorn

    # Exactly the keyword arguments of `broker serve` (broker/cli.py cmd_serve).
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port, server_header=False, access_log=False,
                log_config=None)


if __name__ == "__main__":
    main()
