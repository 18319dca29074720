"""Request quotas per client and per remote address, answered with 429 and ``Retry-After``.

Three quotas, each a fixed window that starts at a key's first request (``limits`` in-memory
storage, O(1) per key, swept of forgotten keys once a second):

* every audited route (data, registry, consent, audit): ``rate_limit_per_minute`` per
  ``client_id``, checked by the pipeline right after the token is verified, so the 429 is
  audited like any other answer;
* ``POST /oauth/token``: ``token_rate_limit_per_minute`` per client, checked once the client
  has authenticated (a forged assertion naming a client cannot use up that client's quota);
* ``POST /oauth/token``: ``token_rate_limit_per_address_per_minute`` per remote address,
  checked before any key or database work, against floods from callers who never authenticate.

Counters live in this process: with N broker processes behind a load balancer a client may
make up to N times the configured rate. Thread-safe: ``limits``' memory storage locks per key,
and the token endpoint calls in from worker threads.
"""

from __future__ import annotations

import math
import time
from typing import Any

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from broker.errors import BrokerError

__all__ = ["RateLimits", "Throttled"]

WINDOW_SECONDS = 60
THROTTLED_TEXT = "too many requests; retry after the number of seconds in Retry-After"


class Throttled(BrokerError):
    """A quota is used up: 429 with ``Retry-After`` (whole seconds, at least 1)."""

    status, code = 429, "throttled"

    def __init__(self, retry_after: int) -> None:
        super().__init__(THROTTLED_TEXT, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class SweptMemoryStorage(MemoryStorage):
    """``limits``' in-memory storage, with forgotten counters swept on the caller's thread.

    The library sweeps expired keys from a ``threading.Timer`` that it starts again, 10 ms
    later, whenever the last one has finished: at a steady trickle of requests that is a new
    thread for nearly every request (measured at 0.1-0.6 ms each under load). A counter's own
    expiry does not depend on the sweep (``incr`` and ``get`` drop an expired counter first);
    the sweep only frees the memory of keys nobody uses any more, so once a second is enough.
    """

    SWEEP_SECONDS = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._next_sweep = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # replaces the library's private hook
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_SECONDS
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


class RateLimits:
    """The broker's quotas; ``window_seconds`` is shorter only in tests."""

    def __init__(self, *, per_client: int, token_per_client: int, token_per_address: int,
                 window_seconds: int = WINDOW_SECONDS) -> None:
        self._limiter = FixedWindowRateLimiter(SweptMemoryStorage())
        self._client = RateLimitItemPerSecond(per_client, window_seconds)
        self._token_client = RateLimitItemPerSecond(token_per_client, window_seconds)
        self._token_address = RateLimitItemPerSecond(token_per_address, window_seconds)
        # one audited refusal per address and window; the rest of a flood is only counted in the log
        self._address_audit = RateLimitItemPerSecond(1, window_seconds)

    @classmethod
    def from_settings(cls, settings: Any) -> "RateLimits":
        """Quotas from ``BROKER_RATE_LIMIT_PER_MINUTE`` and the two token-endpoint settings."""
        return cls(per_client=settings.rate_limit_per_minute,
                   token_per_client=settings.token_rate_limit_per_minute,
                   token_per_address=settings.token_rate_limit_per_address_per_minute)

    def admit_client(self, client_id: str) -> None:
        """Count one request by an authenticated client; raises Throttled over its quota."""
        self._hit(self._client, "client", client_id)

    def admit_token_client(self, client_id: str) -> None:
        """Count one token request by a client that has just authenticated."""
        self._hit(self._token_client, "token-client", client_id)

    def admit_token_address(self, address: str) -> None:
        """Count one token request from a remote address, before anything else is done."""
        self._hit(self._token_address, "token-address", address)

    def audit_address_refusal(self, address: str) -> bool:
        """True for the first per-address refusal in a window: that one is audited."""
        return self._limiter.hit(self._address_audit, "token-address-audited", address)

    def _hit(self, item: RateLimitItemPerSecond, kind: str, key: str) -> None:
        if self._limiter.hit(item, kind, key):
            return
        reset, _remaining = self._limiter.get_window_stats(item, kind, key)
        raise Throttled(max(1, math.ceil(reset - time.time())))
