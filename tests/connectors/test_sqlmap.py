"""Mapping files: every problem is found at start-up and named by file and record; the template rules."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import yaml

from connectors.classify import LOCAL_CATEGORY_SYSTEM
from connectors.sqlmap import INLINE_LABEL_URL, MAPPINGS_DIR, MappingError, load_mapping, vocabulary_categories

KNOWN = vocabulary_categories()

BASE = {
    "name": "referral",
    "resource_type": "Communication",
    "categories": ["child-welfare-case", "canra-report"],
    "table": "cws_referral",
    "columns": {"referral_id": "integer", "youth_id": "string", "received_at": "datetime",
                "reporter_name": "string", "summary": "string", "urgent": "boolean", "score": "decimal",
                "due": "date"},
    "patient_column": "youth_id",
    "id": "cws-referral-{referral_id}",
    "order_by": ["received_at", "-referral_id"],
    "resource": {
        "status": "completed",
        "subject": {"reference": "Patient/{youth_id}"},
        "sent": "{received_at}",
        "sender": {"$label": "reporter-identity", "display": "{reporter_name}"},
        "payload": [{"contentString": "{summary}"}, {"contentString": "Due {due}, urgent: {urgent}"}],
        "reasonCode": [{"coding": [{"system": "urn:x", "code": "{summary}"}], "text": "static text"}],
    },
}


def write(tmp_path, records, name="m.yaml", **top):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"version": 1, **top, "records": records}, sort_keys=False))
    return path


def variant(**changes):  # type: ignore[no-untyped-def]
    rec = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            rec.pop(key, None)
        else:
            rec[key] = value
    return rec


def with_resource(**changes):  # type: ignore[no-untyped-def]
    resource = copy.deepcopy(BASE["resource"])
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    return variant(resource=resource)


def test_the_shipped_mappings_load():
    for path in sorted(MAPPINGS_DIR.glob("*.yaml")):
        mapping = load_mapping(path, KNOWN)
        assert mapping.records and mapping.resource_types


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (variant(resource_type="Placement"), "unknown resource type 'Placement'"),
        (variant(resource_type="Address"), "unknown resource type 'Address'"),
        (variant(categories=["child-welfare-case", "reporter-identiy"]), "unknown category 'reporter-identiy'"),
        (variant(categories=[]), "categories must be a non-empty list"),
        (with_resource(note=[{"text": "{worker_name}"}]), "resource uses columns not in columns: worker_name"),
        (variant(patient_column="child_id"), "patient_column 'child_id' is not in columns"),
        (variant(id="cws-referral-{ref_id}"), "id uses column 'ref_id' which is not in columns"),
        (variant(id="{referral_id}-cws"), "id must be a literal prefix followed by one {column}"),
        (variant(id="cws-referral-{received_at}"), "the id column must be a string or integer column"),
        (variant(order_by=["received"]), "order_by uses column 'received'"),
        (variant(columns={**BASE["columns"], "Bad Name": "string"}), "must be a lower-case SQL identifier"),
        (variant(columns={**BASE["columns"], "x": "blob"}), "column x: type must be one of"),
        (variant(query="SELECT * FROM cws_referral"), "give exactly one of table or query"),
        (variant(table=None), "give exactly one of table or query"),
        (variant(table="cws_referral; DROP TABLE x"), "table must be a table name"),
        (variant(table=None, query="SELECT * FROM t WHERE youth_id = :youth_id"), "must not have bind parameters"),
        (variant(table=None, query="DELETE FROM cws_referral"), "query must be one SELECT statement"),
        (variant(table=None, query="SELECT 1; DELETE FROM cws_referral"), "query must be one SELECT statement"),
        (variant(colour="red"), "unknown keys: colour"),
        (variant(resource=None), "missing keys: resource"),
        (with_resource(subject=None), "resource must have subject"),
        (with_resource(subject={"reference": "Patient/{referral_id}"}), "resource must have subject"),
        (with_resource(id="x"), "must not set resourceType or id"),
        (with_resource(meta={"security": [{"code": "x"}]}), "must not set meta.security"),
        (with_resource(sender={"$label": "reporter-identiy", "display": "{reporter_name}"}),
         "$label names unknown category 'reporter-identiy'"),
        (with_resource(sender={"$lable": "reporter-identity"}), "unknown directive $lable"),
        (with_resource(sender={"display": "{reporter_name}", "extension": [
            {"url": INLINE_LABEL_URL, "valueCoding": {"system": LOCAL_CATEGORY_SYSTEM, "code": "nope"}}]}),
         "an inline security label must name a known category"),
        (with_resource(sentt="{received_at}"), "sentt: Extra inputs are not permitted"),
        (with_resource(sent="{summary}"), "a sample row does not make a valid Communication: sent"),
    ],
)
def test_mapping_problems_name_the_file_and_record(tmp_path, record, message):
    path = write(tmp_path, [record])
    with pytest.raises(ValueError) as info:
        load_mapping(path, KNOWN)
    text = str(info.value)
    assert text.startswith(f"{path}: record 'referral': ")
    assert message in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("records: [", "invalid YAML"),
        ("- a\n- b\n", "a mapping file is a YAML mapping"),
        ("version: 1\nrecords: []\n", "records must be a non-empty list"),
        ("version: 2\nrecords: [{}]\n", "unsupported version"),
        ("version: 1\nsources: []\nrecords: [{}]\n", "unknown keys: sources"),
        ("version: 1\nrecords: [42]\n", "records[0]: must be a mapping"),
    ],
)
def test_file_level_problems(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as info:
        load_mapping(path, KNOWN)
    assert str(info.value).startswith(str(path))
    with pytest.raises(ValueError, match="cannot read mapping file"):
        load_mapping(tmp_path / "missing.yaml", KNOWN)


def test_duplicate_names_and_overlapping_ids(tmp_path):
    with pytest.raises(ValueError, match="record 'referral': name used twice"):
        load_mapping(write(tmp_path, [BASE, BASE]), KNOWN)
    other = variant(name="referral-extra", id="cws-referral-x{referral_id}")
    with pytest.raises(ValueError, match="record 'referral-extra': id prefix 'cws-referral-x' overlaps record "
                                         "'referral'"):
        load_mapping(write(tmp_path, [BASE, other]), KNOWN)
    elsewhere = variant(name="case", resource_type="EpisodeOfCare", resource={
        "status": "active", "patient": {"reference": "Patient/{youth_id}"}})
    assert len(load_mapping(write(tmp_path, [BASE, elsewhere]), KNOWN).records) == 2  # other type: no clash


ROW = {"referral_id": 7, "youth_id": "CWS-1", "received_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
       "reporter_name": "Reporta Tattleton", "summary": "sum", "urgent": True, "score": Decimal("2.50"),
       "due": date(2025, 2, 1)}


def record(tmp_path, **resource):  # type: ignore[no-untyped-def]
    return load_mapping(write(tmp_path, [with_resource(**resource)]), KNOWN).records[0]


def test_render_types_ids_labels_and_categories(tmp_path):
    rec = record(tmp_path, note=[{"text": "score {score}"}], extension=[
        {"url": "urn:score", "valueDecimal": "{score}"}])
    r = rec.render(ROW)
    assert list(r)[:3] == ["resourceType", "id", "meta"]
    assert (r["resourceType"], r["id"]) == ("Communication", "cws-referral-7")
    assert r["meta"] == {"security": [{"system": LOCAL_CATEGORY_SYSTEM, "code": "child-welfare-case"},
                                      {"system": LOCAL_CATEGORY_SYSTEM, "code": "canra-report"}]}
    assert r["sent"] == "2025-01-02T03:04:05Z"
    assert r["payload"][1] == {"contentString": "Due 2025-02-01, urgent: true"}
    assert r["extension"] == [{"url": "urn:score", "valueDecimal": 2.5}]
    assert r["sender"] == {"display": "Reporta Tattleton", "extension": [
        {"url": INLINE_LABEL_URL, "valueCoding": {"system": LOCAL_CATEGORY_SYSTEM, "code": "reporter-identity"}}]}
    naive = rec.render({**ROW, "received_at": datetime(2025, 1, 2, 3, 4, 5)})
    assert naive["sent"] == "2025-01-02T03:04:05Z"  # a naive timestamp is UTC
    assert rec.render(ROW) == r and rec.render(ROW) is not r and rec.render(ROW)["sender"] is not r["sender"]


def test_null_omits_the_element_and_what_is_left_without_data(tmp_path):
    rec = record(tmp_path)
    r = rec.render({**ROW, "reporter_name": None, "summary": None, "due": None})
    assert "sender" not in r  # the label alone does not keep it
    assert "reasonCode" not in r  # static system and text go with the NULL code
    assert "payload" not in r  # both items lost their data
    assert r["status"] == "completed" and r["subject"] == {"reference": "Patient/CWS-1"}
    partial = rec.render({**ROW, "due": None})
    assert partial["payload"] == [{"contentString": "sum"}]
    assert "sent" not in rec.render({**ROW, "received_at": None})
    assert "sender" not in rec.render({**ROW, "reporter_name": ""})  # an empty string is no value in FHIR


def test_key_for_maps_ids_back_to_keys(tmp_path):
    rec = record(tmp_path)
    assert rec.key_for("cws-referral-7") == 7
    for rid in ("cws-referral-", "cws-referral-x", "cws-referral-7 OR 1=1", "cws-case-7", "cws-referral--7"):
        assert rec.key_for(rid) is None
    with pytest.raises(MappingError, match="key column is NULL"):
        rec.render({**ROW, "referral_id": None})
