"""Asking sources: a timeout and a circuit breaker around every connector call.

A source that fails or times out ``threshold`` times in a row is not asked again for
``reset_seconds`` (purgatory's circuit breaker); during that time it is reported unavailable
at once, so a dead system costs a request nothing. The connector contract already bounds each
call by its timeout; the broker enforces it again (plus a small grace) so that a plugin that
ignores the contract cannot hold a request up. Whatever goes wrong is that source's status
(``ok``, ``unavailable``, ``timeout``), never an exception for the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from connectors.base import SourceTimeout

log = structlog.get_logger("broker.sources")

OK, UNAVAILABLE, TIMEOUT = "ok", "unavailable", "timeout"
GRACE_SECONDS = 0.25
"""How far past its own timeout the broker lets a connector run before it stops waiting."""


class SourceGate:
    """Per-source circuit breakers; one per process, safe for concurrent requests."""

    def __init__(self, *, threshold: int = 5, reset_seconds: float = 30.0) -> None:
        self._breakers = AsyncCircuitBreakerFactory(default_threshold=threshold, default_ttl=reset_seconds)

    async def call(self, source: str, fn: Callable[[], Awaitable[Any]], *, timeout: float,
                   request_id: str | None = None) -> tuple[str, Any]:
        """(status, result); result is None unless the status is ``ok``."""
        try:
            async with await self._breakers.get_breaker(source):
                async with asyncio.timeout(timeout + GRACE_SECONDS):
                    return OK, await fn()
        except OpenedState:
            return UNAVAILABLE, None
        except (SourceTimeout, TimeoutError):
            log.warning("source_timeout", source=source, request_id=request_id)
            return TIMEOUT, None
        except Exception as err:  # any source failure is that source's status, never a 500
            log.warning("source_failed", source=source, error_type=type(err).__name__, request_id=request_id)
            return UNAVAILABLE, None
