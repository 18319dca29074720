"""Canonical JSON and the hash chain, so that `broker audit verify` can recompute every hash.

Canonical form: object keys sorted by Unicode code point, separators ``,`` and ``:`` with no
whitespace, UTF-8 (nothing ASCII-escaped). Only JSON values are accepted, plus three
conveniences with one fixed rendering each: aware datetimes become UTC ISO-8601 strings with
microseconds and ``Z``; tuples become lists; sets become lists sorted by their canonical bytes.
Anything else is refused rather than guessed at, because a rendering that could change later
would break every stored hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64
"""The previous hash of sequence 1."""

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def canonical_json(obj: Any) -> bytes:
    """Render ``obj`` in the one byte form every hash is computed over.

    Raises TypeError for a type JSON cannot hold or a non-string object key, and ValueError
    for NaN/infinity, a naive datetime or a string that is not valid Unicode.
    """
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return text.encode("utf-8")


def chain_hash(prev_hash: str, body: bytes) -> str:
    """Link ``body`` to its predecessor: sha256(prev_hash ASCII + b"\\n" + body), hex."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()


def format_time(value: datetime) -> str:
    """The canonical text of an instant; naive datetimes are refused because their zone is a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime cannot be rendered canonically")
    return value.astimezone(UTC).strftime(_TIME_FORMAT)


def _plain(obj: Any) -> Any:
    """Reduce to str/int/float/bool/None/list/dict so json.dumps has nothing left to decide."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("NaN and infinity have no JSON form")
        return float(obj)
    if isinstance(obj, datetime):
        return format_time(obj)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"object keys must be str, not {type(key).__name__}")
            out[str(key)] = _plain(value)
        return out
    if isinstance(obj, list | tuple):
        return [_plain(item) for item in obj]
    if isinstance(obj, set | frozenset):
        return [json.loads(b) for b in sorted(canonical_json(item) for item in obj)]
    raise TypeError(f"{type(obj).__name__} has no canonical JSON form")
