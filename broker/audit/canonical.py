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

import orjson

GENESIS_HASH = "0" * 64
"""The previous hash of sequence 1."""

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def canonical_json(obj: Any) -> bytes:
    """Render ``obj`` in the one byte form every hash is computed over.

    Raises TypeError for a type JSON cannot hold or a non-string object key, and ValueError
    for NaN/infinity, a naive datetime or a string that is not valid Unicode.

    The bytes are those of ``json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)``. orjson writes the same bytes for strings, integers within 64 bits,
    booleans and null (tests/audit/test_canonical.py checks every code point), several times
    faster, so it is used whenever the value holds nothing else; a float (whose exponent
    orjson writes differently) or a larger integer takes the standard library.
    """
    return dump_plain(*reduce(obj))


def reduce(obj: Any) -> tuple[Any, bool]:
    """``obj`` as plain JSON values, and whether only the standard library renders it canonically.

    ``dump_plain`` of the result (with more plain str/int members added to a top-level dict,
    as the audit writer adds the chain fields) is the canonical form.
    """
    state = _State()
    return _plain(obj, state), state.stdlib


def dump_plain(value: Any, stdlib: bool = False) -> bytes:
    """Canonical bytes of a value already reduced by ``reduce``."""
    if not stdlib:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: let the standard library raise its ValueError
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def chain_hash(prev_hash: str, body: bytes) -> str:
    """Link ``body`` to its predecessor: sha256(prev_hash ASCII + b"\\n" + body), hex."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()


def format_time(value: datetime) -> str:
    """The canonical text of an instant; naive datetimes are refused because their zone is a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime cannot be rendered canonically")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.year < 1000:  # strftime does not pad the year to four digits
        return value.strftime(_TIME_FORMAT)
    # isoformat is faster than strftime; it leaves out a zero fraction, which _TIME_FORMAT
    # keeps as six digits, and ends in +00:00 for UTC (tests compare the two forms).
    text = value.isoformat()[:-6]
    return (text if value.microsecond else text + ".000000") + "Z"


class _State:
    """What the walk found that orjson would render differently from the standard library."""

    __slots__ = ("stdlib",)

    def __init__(self) -> None:
        self.stdlib = False


_ORJSON_INT_MIN, _ORJSON_INT_MAX = -(2**63), 2**64 - 1


def _plain(obj: Any, state: _State) -> Any:
    """Reduce to str/int/float/bool/None/list/dict so the encoder has nothing left to decide.

    Exact built-in types are checked first (the common case, and cheap); subclasses are then
    reduced to their base value so that an enum or a str subclass renders as plain data.
    """
    t = type(obj)
    if t is str or obj is None or t is bool:
        return obj
    if t is dict:
        out = {}
        for key, value in obj.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise TypeError(f"object keys must be str, not {type(key).__name__}")
                key = str(key)
            vt = type(value)  # the leaves most values are, without a call (most of the walk's cost)
            out[key] = value if vt is str or value is None or vt is bool else _plain(value, state)
        return out
    if t is list or t is tuple:
        return [item if type(item) is str else _plain(item, state) for item in obj]
    if t is int:
        if not _ORJSON_INT_MIN <= obj <= _ORJSON_INT_MAX:
            state.stdlib = True
        return obj
    if t is datetime:
        return format_time(obj)
    if t is set or t is frozenset:
        return _sorted_set(obj, state)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return _plain(int(obj), state)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("NaN and infinity have no JSON form")
        state.stdlib = True
        return float(obj)
    if isinstance(obj, datetime):
        return format_time(obj)
    if isinstance(obj, dict):
        return _plain(dict(obj), state)
    if isinstance(obj, list | tuple):
        return [_plain(item, state) for item in obj]
    if isinstance(obj, set | frozenset):
        return _sorted_set(obj, state)
    raise TypeError(f"{type(obj).__name__} has no canonical JSON form")


def _sorted_set(obj: set[Any] | frozenset[Any], state: _State) -> list[Any]:
    """A set as a list ordered by its members' canonical bytes."""
    if all(type(item) is str for item in obj):
        try:
            return sorted(obj, key=orjson.dumps)  # a string's canonical bytes are orjson's
        except orjson.JSONEncodeError:
            pass  # not valid Unicode: the general path raises the ValueError
    items = [_plain(item, state) for item in obj]
    keyed = sorted((canonical_json(item), i) for i, item in enumerate(items))
    return [items[i] for _, i in keyed]
