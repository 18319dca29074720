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
