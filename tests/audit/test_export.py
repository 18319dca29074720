"""Exports: NDJSON round trip verified offline, CSV safe for spreadsheets, FHIR AuditEvent valid, memory flat."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from datetime import datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import insert

from broker.audit import SqlAuditSink, canonical_json, chain_hash, verify_chain
from broker.audit.checkpoint import AuditKey, write_checkpoint
from broker.audit.export import CSV_COLUMNS, export_csv, export_fhir, export_ndjson, verify_export
from broker.audit.sink import index_columns
from broker.store.db import make_engine, make_sessionmaker, upgrade
from broker.store.models import AuditCheckpoint, AuditEventRow, AuditHead

from .bulk import bulk_chain
from .conftest import Db, _drop_database
from .events import make_event

N = 30
ACTIONS = [("fhir.search", "GET", 200), ("fhir.read", "GET", 404), ("record.read", "GET", 200),
           ("audit.export", "GET", 200), ("consent.create", "POST", 201), ("fhir.search", "GET", 403),
           ("fhir.search", "GET", 503), ("record.read", "GET", 500)]


def pipeline_event(i: int) -> dict[str, Any]:
    """An event shaped like Exchange.audit_event, with consents, orders and break-glass now and then."""
    action, method, status = ACTIONS[i % len(ACTIONS)]
    consents = [f"consent-{i % 4}", "consent-hiv-1"] if i % 3 == 0 else []
    event = make_event(i, action=action, outcome=status, purpose="CHILDPROT" if i % 5 == 0 else "TREAT")
    for flat in ("categories_requested", "categories_released", "categories_withheld"):
        event.pop(flat)
    event |= {
        "method": method,
        "route": "/mdts/{id}/fhir/{type}",
        "grounds": {"used": ["consent-hiv", "mdt-member"] if consents else ["mdt-member"], "membership_id": "m-1",
                    "consent_ids": consents, "court_order_ids": ["order-9"] if i % 7 == 0 else [],
                    "break_glass_id": "bg-1" if i % 11 == 0 else None},
        "break_glass": i % 11 == 0,
        "categories": {"requested": ["general-health", "hiv", "mental-health"],
                       "released": ["general-health", "hiv"] if consents else ["general-health"],
                       "withheld": ["mental-health"]},
        "decisions": [{"category": "general-health", "effect": "allow", "ground": "mdt-member", "rule": ["p"],
                       "citation": "W&IC 18961.7"},
                      {"category": "hiv", "effect": "allow" if consents else "deny",
                       "ground": "consent-hiv" if consents else None, "rule": None, "citation": "HSC 120980"}],
    }
    if i % 13 == 0:
        event["youth_id"] = None
        event["actor"] = None
        event["client_id"] = None
    return event


@pytest.fixture
def key() -> AuditKey:
    return AuditKey(Ed25519PrivateKey.generate())


@pytest.fixture
def signed(db, key) -> Db:
    """N events through the sink, signed at 20 and at N."""
    sink = SqlAuditSink(db.sessions)
    for i in range(1, N + 1):
        sink.append(pipeline_event(i))
        if i in (20, N):
            write_checkpoint(db.sessions, key, reason="manual")
    return db


@pytest.fixture
def empty_store(db, request, tmp_path):
    """A second, empty, migrated database on the same backend."""
    if db.backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'reimport.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    upgrade(url)
    engine = make_engine(url)
    yield Db(db.backend, url, engine, make_sessionmaker(engine))
    engine.dispose()
    if db.backend == "postgresql":
        _drop_database(url)


def _reimport(lines: list[str], store: Db) -> int:
    """Rebuild the tables from an export alone, as an auditor's own copy would be."""
    objects = [json.loads(line) for line in lines]
    header, rest = objects[0], objects[1:]
    prev, rows, checkpoints = header["first_prev_hash"], [], []
    for line, obj in zip(lines[1:], rest):
        if "sequence" in obj:
            body = line.rstrip("\n").encode()
            digest = chain_hash(prev, body)
            event = obj | {"time": datetime.fromisoformat(obj["time"])}
            rows.append({"seq": obj["sequence"], "body": body.decode(), "prev_hash": prev, "hash": digest,
                         **index_columns(event)})
            prev = digest
        elif obj["type"] == "checkpoint":
            checkpoints.append({k: obj[k] for k in ("seq", "head_hash", "key_id", "signature", "reason")}
                               | {"time": datetime.fromisoformat(obj["time"])})
    with store.engine.begin() as conn:
        conn.execute(insert(AuditEventRow), rows)
        conn.execute(insert(AuditHead).values(id=1, seq=rows[-1]["seq"], hash=prev))
        conn.execute(insert(AuditCheckpoint), checkpoints)
    return len(rows)


def test_ndjson_round_trip_verifies_offline_and_again_after_reimport(signed, key, empty_store):
    lines = list(export_ndjson(signed.sessions, key=key, batch=7))
    header = json.loads(lines[0])
    assert header["type"] == "mdt-broker-audit-export" and header["first_seq"] == 1 and header["last_seq"] == N
    assert header["checkpoint_key"] == key.public_pem() and header["checkpoint_seqs"] == [N]
    assert json.loads(lines[-2])["type"] == "checkpoint"
    assert json.loads(lines[-1])["type"] == "mdt-broker-audit-export-end"
    bodies = [json.loads(line) for line in lines[1:N + 1]]
    assert [b["sequence"] for b in bodies] == list(range(1, N + 1))
    assert all(canonical_json(b).decode() + "\n" == line for b, line in zip(bodies, lines[1:N + 1]))

    offline = verify_export(lines, key.public_pem())
    assert offline.ok and offline.count == N and offline.signed_through == N, offline

    assert _reimport(lines, empty_store) == N
    again = verify_chain(empty_store.sessions, public_key=key.public_key)
    assert again.ok and again.count == N and again.signed_through == N, again
    assert list(export_ndjson(empty_store.sessions, key=key)) == lines


def test_partial_exports_anchor_on_the_previous_hash(signed, key):
    later = list(export_ndjson(signed.sessions, since_seq=11, key=key))
    assert json.loads(later[0])["first_seq"] == 11
    assert verify_export(later, key.public_pem()).count == N - 10

    cutoff = datetime.fromisoformat(json.loads(later[8])["time"])  # the 8th exported event, sequence 18
    early = list(export_ndjson(signed.sessions, until=cutoff, key=key))
    assert json.loads(early[0])["last_seq"] == 17 and json.loads(early[0])["checkpoint_seqs"] == []
    assert verify_export(early, None).ok
    unsigned = verify_export(early, key.public_pem())  # with a key, something must be signed
    assert (unsigned.ok, unsigned.kind) == (False, "unsigned-checkpoint")


def _edit(lines, index, **changes):
    body = json.loads(lines[index]) | changes
    lines[index] = canonical_json(body).decode() + "\n"


def _rewrite_consistently(lines):
    """Change event 3 and relink every later event, as a forger without the key would."""
    _edit(lines, 3, youth_id="Y-forged")
    prev = chain_hash(json.loads(lines[3])["previous_hash"], lines[3].rstrip("\n").encode())
    for index in range(4, N + 1):
        _edit(lines, index, previous_hash=prev)
        prev = chain_hash(prev, lines[index].rstrip("\n").encode())
    end = json.loads(lines[-1]) | {"last_hash": prev}
    lines[-1] = canonical_json(end).decode() + "\n"


OFFLINE_TAMPERS = [
    ("edit-field", lambda ls: _edit(ls, 5, outcome=200, categories={"released": ["hiv"]}), 6, "edited"),
    ("delete-event", lambda ls: ls.pop(5), 5, "deleted"),
    ("insert-duplicate", lambda ls: ls.insert(6, ls[5]), 5, "inserted"),
    ("swap-two", lambda ls: ls.__setitem__(slice(3, 5), [ls[4], ls[3]]), 3, "reordered"),
    ("truncate-tail", lambda ls: ls.__delitem__(slice(N - 1, None)), N - 1, "truncated"),
    ("rewrite-consistently", _rewrite_consistently, N, "rewritten"),
    ("forge-checkpoint-hash", lambda ls: ls.__setitem__(-2, ls[-2].replace(json.loads(ls[-2])["head_hash"], "0" * 64)),
     N, "rewritten"),
]


@pytest.mark.parametrize(("name", "tamper", "bad_seq", "kind"), OFFLINE_TAMPERS, ids=[t[0] for t in OFFLINE_TAMPERS])
def test_offline_verification_names_each_tampering(signed, key, name, tamper, bad_seq, kind):
    lines = list(export_ndjson(signed.sessions, key=key))
    tamper(lines)
    report = verify_export(lines, key.public_pem())
    assert (report.ok, report.first_bad_seq, report.kind) == (False, bad_seq, kind), report


def test_offline_verification_needs_the_right_key_and_a_real_export(signed, key):
    lines = list(export_ndjson(signed.sessions, key=key))
    stranger = AuditKey(Ed25519PrivateKey.generate())
    assert verify_export(lines, stranger.public_pem()).kind == "unsigned-checkpoint"
    keyless = verify_export(lines, None)
    assert keyless.ok and keyless.signed_through is None and keyless.checkpoints == 1
    assert verify_export(lines[1:], key.public_pem()).problem == "not an mdt-broker audit export"
    assert verify_export([line.encode() for line in lines], key.public_pem().encode()).ok


FORMULAS = {"request_id": "=HYPERLINK(\"http://x\")", "mdt_id": "-2+3", "client_id": "@SUM(A1)",
            "actor": {"sub": "+cmd|' /C calc'!A0", "agency": "\tprobation", "role": "probation-officer"}}


def test_csv_is_flat_parses_and_defuses_formulas(db):
    sink = SqlAuditSink(db.sessions)
    for i in range(1, 12):
        sink.append(pipeline_event(i))
    sink.append(pipeline_event(12) | FORMULAS)

    text = "".join(export_csv(db.sessions, batch=5))
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert tuple(rows[0].keys()) == CSV_COLUMNS and len(rows) == 12
    assert [int(r["seq"]) for r in rows] == list(range(1, 13))
    nine = rows[8]
    assert nine["consent_ids"] == "consent-1;consent-hiv-1" and nine["grounds_used"] == "consent-hiv;mdt-member"
    assert nine["categories_released"] == "general-health;hiv" and nine["categories_withheld"] == "mental-health"
    assert rows[10]["break_glass"] == "true" and rows[9]["break_glass"] == "false"
    assert rows[6]["court_order_ids"] == "order-9" and rows[6]["outcome"] == "500"
    with db.sessions() as s:
        assert rows[11]["hash"] == s.get(AuditEventRow, 12).hash
    forged = rows[11]
    assert forged["request_id"] == "'=HYPERLINK(\"http://x\")" and forged["mdt_id"] == "'-2+3"
    assert forged["client_id"] == "'@SUM(A1)" and forged["actor_sub"].startswith("'+cmd")
    assert forged["actor_agency"] == "'\tprobation"
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row.values())


def test_fhir_export_of_a_thousand_events_validates_as_r4_audit_events(db):
    bulk_chain(db.engine, 1000, pipeline_event)
    resources = [json.loads(line) for line in export_fhir(db.sessions, batch=300)]
    assert len(resources) == 1000
    for resource in resources:
        AuditEvent.model_validate(resource)

    def by_seq(seq: int) -> dict:
        return resources[seq - 1]

    search = by_seq(24)  # fhir.search, 200, consents relied on
    assert search["type"]["code"] == "rest" and search["subtype"][0]["code"] == "search-type"
    assert (search["action"], search["outcome"], search["recorded"]) == ("E", "0", pipeline_event(24)["time"]
                                                                        .strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    assert search["purposeOfEvent"][0]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                                        "code": "TREAT"}
    client, human, broker = search["agent"]
    assert client["requestor"] is False and client["who"]["identifier"]["value"] == "probation-cms"
    assert human["requestor"] is True and human["who"]["identifier"]["value"] == "staff-42"
    assert human["role"][0]["coding"][0]["code"] == "probation-officer"
    assert broker["who"]["display"] == "mdt-broker" and search["source"]["observer"]["display"] == "mdt-broker"
    patient, *consents = search["entity"]
    assert patient["what"]["identifier"]["value"] == "Y-0" and patient["role"]["code"] == "1"
    assert [c["code"] for c in patient["securityLabel"]] == ["general-health", "hiv"]
    assert [c["what"]["reference"] for c in consents] == ["Consent/consent-0", "Consent/consent-hiv-1"]
    assert all(c["type"]["code"] == "Consent" and c["role"]["code"] == "consent" for c in consents)
    assert [label["code"] for label in consents[0]["securityLabel"]] == ["hiv"]

    assert by_seq(1)["subtype"][0]["code"] == "read" and by_seq(1)["outcome"] == "4"
    assert (by_seq(3)["type"]["code"], by_seq(3)["action"]) == ("110106", "R")  # audit.export
    assert (by_seq(2)["type"]["code"], by_seq(2)["action"]) == ("110112", "E")  # record.read: a query
    assert (by_seq(4)["subtype"][0]["code"], by_seq(4)["action"]) == ("create", "C")
    assert by_seq(6)["outcome"] == "8" and by_seq(7)["outcome"] == "12"
    assert by_seq(10)["purposeOfEvent"][0]["coding"][0]["code"] == "CHILDPROT"
    assert len(by_seq(13)["agent"]) == 1 and "entity" not in by_seq(13)  # no actor, client or youth


def _peak(generator) -> int:
    tracemalloc.start()
    try:
        for _ in generator:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_exports_stream_in_flat_memory(db, key):
    bulk_chain(db.engine, 20_000)
    write_checkpoint(db.sessions, key, reason="manual")
    list(export_ndjson(db.sessions, since_seq=19_990, key=key))  # warm statement caches and the pool

    cases = [("ndjson", lambda **kw: export_ndjson(db.sessions, key=key, **kw), 15_001, 1),
             ("csv", lambda **kw: export_csv(db.sessions, **kw), 18_751, 15_001),  # 1,250 vs 5,000
             ("fhir", lambda **kw: export_fhir(db.sessions, **kw), 18_751, 15_001)]
    for name, export, small_from, large_from in cases:
        small = _peak(export(since_seq=small_from, batch=250))
        large = _peak(export(since_seq=large_from, batch=250))  # four times as many events
        assert large < small * 1.5 + 256 * 1024 and large < 4 * 1024 * 1024, (name, small, large)
