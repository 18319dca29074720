"""Canonical JSON and chain-hash golden vectors: a change here would break every stored hash."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from broker.audit import GENESIS_HASH, canonical_json, chain_hash


class Effect(enum.StrEnum):
    ALLOW = "allow"


CANONICAL = [
    ({}, b"{}"),
    ([], b"[]"),
    ({"b": 1, "a": [1, 2, {"d": None, "c": True}]}, b'{"a":[1,2,{"c":true,"d":null}],"b":1}'),
    ({"\u00e9": 1, "z": 2, "A": 3, "a": 4}, '{"A":3,"a":4,"z":2,"\u00e9":1}'.encode()),
    ({"name": "Zo\u00eb \u2713"}, b'{"name":"Zo\xc3\xab \xe2\x9c\x93"}'),
    ({"s": 'q"b\\s\nt\u0001'}, b'{"s":"q\\"b\\\\s\\nt\\u0001"}'),
    ({"f": 1.5, "g": -2, "h": 10**20, "i": False}, b'{"f":1.5,"g":-2,"h":100000000000000000000,"i":false}'),
    (datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), b'"2024-05-06T07:08:09.000000Z"'),
    (datetime(2024, 5, 6, 0, 8, 9, 123, tzinfo=timezone(timedelta(hours=-7))),
     b'"2024-05-06T07:08:09.000123Z"'),
    ({"c": {"b", "a", "c"}}, b'{"c":["a","b","c"]}'),
    (frozenset({2, "1", 10}), b'["1",10,2]'),  # ordered by canonical bytes, whatever the types
    ((1, ("x", None)), b'[1,["x",null]]'),
    ({"e": Effect.ALLOW}, b'{"e":"allow"}'),
]


@pytest.mark.parametrize(("value", "expected"), CANONICAL)
def test_canonical_json_golden(value, expected):
    assert canonical_json(value) == expected


def test_canonical_json_is_independent_of_insertion_order():
    a = {"x": {"p": 1, "q": [3, {"k": "v", "j": "w"}]}, "y": "z"}
    b = {"y": "z", "x": {"q": [3, {"j": "w", "k": "v"}], "p": 1}}
    assert canonical_json(a) == canonical_json(b)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), {"x": [float("nan")]},
                                   datetime(2024, 1, 1), "\ud800"])
def test_canonical_json_refuses_values_without_one_form(value):
    with pytest.raises(ValueError):
        canonical_json(value)


@pytest.mark.parametrize("value", [object(), Decimal("1.0"), date(2024, 1, 1), b"bytes", {1: "x"},
                                   {"a": {("t",): 1}}, {"a": [object()]}])
def test_canonical_json_refuses_unknown_types(value):
    with pytest.raises(TypeError):
        canonical_json(value)


def test_genesis_is_64_zeros():
    assert GENESIS_HASH == "0" * 64


@pytest.mark.parametrize(("prev", "body", "expected"), [
    (GENESIS_HASH, b"{}", "5649d09ed68c17156095d175eef152856c5b1a81c117c409c1e00f096aa6838e"),
    ("abc", b'{"a":1}', "76d60f196e163a815fca6ce112418a550ab4e61e1870c2bfc932fb0f011efb33"),
    ("f" * 64, '{"name":"Zo\u00eb \u2713"}'.encode(),
     "970dc1c747246726f20350d0ee77a2116c228470711189c4b719a45e4bd47ff7"),
    (GENESIS_HASH, b"", "827d096d92f3deeaa0e8070d79f45beb176768e57a958a1cd325f5f4b754b048"),
])
def test_chain_hash_golden(prev, body, expected):
    assert chain_hash(prev, body) == expected


def test_chain_hash_depends_on_both_links():
    base = chain_hash(GENESIS_HASH, b"{}")
    assert chain_hash("1" + GENESIS_HASH[1:], b"{}") != base
    assert chain_hash(GENESIS_HASH, b"{ }") != base


def _stdlib(value):
    import json
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def test_fast_encoder_matches_the_standard_library_for_every_code_point():
    # canonical_json uses orjson when it can; its bytes must be the stdlib's for every string.
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for i in range(0, len(chars), 4096):
        chunk = chars[i:i + 4096]
        value = {"k" + c: "v" + c + "w" for c in chunk}
        assert canonical_json(value) == _stdlib(value)


@pytest.mark.parametrize(("value", "expected"), [
    # exponents orjson would write as 1e-7 / 1e16: the standard library's form is kept
    ({"f": 1e-07, "g": 1e16, "h": 0.1, "i": -0.0}, b'{"f":1e-07,"g":1e+16,"h":0.1,"i":-0.0}'),
    ({"big": 2**64, "neg": -(2**63) - 1, "edge": 2**64 - 1, "low": -(2**63)},
     b'{"big":18446744073709551616,"edge":18446744073709551615,"low":-9223372036854775808,'
     b'"neg":-9223372036854775809}'),
    ({"s": {0.5, 2, "x"}, "n": [1.25, {"d": 3}]}, b'{"n":[1.25,{"d":3}],"s":["x",0.5,2]}'),
    ({"mixed": ["\u2028", "\x7f", "\x00", "\U0001f600"]},
     b'{"mixed":["\xe2\x80\xa8","\x7f","\\u0000","\xf0\x9f\x98\x80"]}'),
])
def test_canonical_json_equals_the_standard_library_rendering(value, expected):
    assert canonical_json(value) == expected


def test_canonical_json_of_a_pipeline_event_is_unchanged():
    # The bytes an event rendered as before the fast path: a stored chain must still verify.
    from tests.audit.events import make_event
    import hashlib
    body = canonical_json(make_event(7))
    assert hashlib.sha256(body).hexdigest() == EVENT_7_SHA256


EVENT_7_SHA256 = "0fe26118131dcf1c0f48aa1ba237ea30619e80af8f9919f59eae641f5ca19479"


@pytest.mark.parametrize("when", [
    datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), datetime(2024, 5, 6, 7, 8, 9, 5, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC), datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2024, 3, 10, 1, 59, 59, tzinfo=timezone(timedelta(hours=-8, minutes=-30))),
])
def test_format_time_is_the_documented_strftime_form(when):
    from broker.audit.canonical import _TIME_FORMAT, format_time
    assert format_time(when) == when.astimezone(UTC).strftime(_TIME_FORMAT)


def test_the_group_writer_renders_exactly_canonical_json():
    # GroupCommitAuditSink reduces in the caller's thread and adds the chain fields later.
    from broker.audit.canonical import dump_plain, reduce
    from tests.audit.events import make_event
    for event in (make_event(3), make_event(4, score=1.5, big=2**70)):
        reduced, stdlib = reduce(event)
        reduced.update(sequence=12, previous_hash="ab" * 32)
        assert dump_plain(reduced, stdlib) == canonical_json({**event, "sequence": 12, "previous_hash": "ab" * 32})
