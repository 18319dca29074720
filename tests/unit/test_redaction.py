"""Element-level redaction: labelled elements go, nothing shows they were there, paths are reported."""

from __future__ import annotations

import copy
import json

import pytest

from broker.pipeline.filtering import filter_resources
from broker.pipeline.redaction import CATEGORY_SYSTEM, INLINE_LABEL_URL, redact_labelled_elements

KNOWN = frozenset({"child-welfare-case", "canra-report", "reporter-identity", "placement-location", "general-health"})
CW = frozenset({"child-welfare-case", "canra-report"})
REPORTER = "Reporty McReportface"
ADDRESS = "123 Nowhere Ln"


def label(category: str, system: str = CATEGORY_SYSTEM) -> dict:
    return {"url": INLINE_LABEL_URL, "valueCoding": {"system": system, "code": category}}


def referral() -> dict:
    return {
        "resourceType": "Communication", "id": "ref-1", "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "sender": {"display": REPORTER, "extension": [label("reporter-identity")]},
        "payload": [{"contentString": "Referral received; allegations summarised without the reporter."}],
    }


def placement() -> dict:
    return {
        "resourceType": "EpisodeOfCare", "id": "pl-1", "status": "active", "patient": {"reference": "Patient/p1"},
        "type": [{"coding": [{"system": "https://example.org/placement-type", "code": "rfh"}]}],
        "extension": [
            {"url": "https://mdt-broker.example.org/StructureDefinition/placement-address",
             "valueAddress": {"line": [ADDRESS], "city": "Faketown", "extension": [label("placement-location")]}},
            {"url": "https://example.org/other", "valueString": "kept"},
        ],
    }


def test_reporter_is_removed_without_a_trace_and_the_path_is_reported():
    r = referral()
    out = redact_labelled_elements(r, CW, KNOWN)
    assert "sender" not in r
    text = json.dumps(r)
    assert REPORTER not in text and "reporter-identity" not in text and INLINE_LABEL_URL not in text
    assert out.paths == ["Communication.sender"] and out.withheld == {"reporter-identity"} and not out.kept


def test_allowed_element_stays_with_its_label_and_its_category_is_reported_kept():
    r = referral()
    out = redact_labelled_elements(r, CW | {"reporter-identity"}, KNOWN)
    assert r == referral() and out.paths == [] and out.kept == {"reporter-identity"}


def test_extension_emptied_by_the_removal_goes_too_other_extensions_stay():
    p = placement()
    out = redact_labelled_elements(p, CW, KNOWN)
    assert p["extension"] == [{"url": "https://example.org/other", "valueString": "kept"}]
    assert ADDRESS not in json.dumps(p) and "placement-address" not in json.dumps(p)
    assert out.paths == ["EpisodeOfCare.extension.valueAddress"]
    assert p["type"] == placement()["type"]


def test_list_emptied_by_the_removal_is_deleted():
    p = placement()
    del p["extension"][1]
    redact_labelled_elements(p, CW, KNOWN)
    assert "extension" not in p


@pytest.mark.parametrize("bad", [label("no-such-category"), label("reporter-identity", system="http://other"),
                                 {"url": INLINE_LABEL_URL}, {"url": INLINE_LABEL_URL, "valueCoding": "x"}])
def test_a_label_the_broker_cannot_read_removes_the_element(bad):
    r = referral()
    r["sender"]["extension"] = [bad]
    out = redact_labelled_elements(r, KNOWN, KNOWN)  # everything known is allowed, still removed
    assert "sender" not in r and out.paths == ["Communication.sender"]


def test_primitive_labels_take_the_value_with_them():
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "2010-02-03",
               "_birthDate": {"extension": [label("placement-location")]},
               "name": [{"family": "Fakename", "given": ["Ann", "Secret"],
                         "_given": [None, {"extension": [label("placement-location")]}]}]}
    out = redact_labelled_elements(patient, CW, KNOWN)
    assert "birthDate" not in patient and "_birthDate" not in patient
    assert patient["name"] == [{"family": "Fakename", "given": ["Ann"]}]
    assert sorted(out.paths) == ["Patient.birthDate", "Patient.name.given"]


def test_elements_the_source_sent_empty_are_left_alone():
    r = referral()
    r["note"] = []
    r["meta"] = {}
    redact_labelled_elements(r, CW, KNOWN)
    assert r["note"] == [] and r["meta"] == {}


def test_labels_inside_contained_resources_count():
    r = referral()
    r["contained"] = [{"resourceType": "Practitioner", "id": "rep",
                       "name": [{"text": REPORTER, "extension": [label("reporter-identity")]}]}]
    redact_labelled_elements(r, CW, KNOWN)
    assert REPORTER not in json.dumps(r)


def test_absurd_nesting_is_refused_not_released_unexamined():
    deep: dict = {"resourceType": "Basic", "id": "x"}
    node = deep
    for _ in range(40):
        node["extension"] = [{"url": "u", "extension": []}]
        node = node["extension"][0]
    with pytest.raises(ValueError):
        redact_labelled_elements(deep, CW, KNOWN)


def test_filter_redacts_copies_and_labels_kept_elements():
    source = referral()
    pristine = copy.deepcopy(source)
    classify = lambda r, defaults: defaults | {"canra-report"}  # noqa: E731
    out = filter_resources([(source, "p1", frozenset({"child-welfare-case"}))], classify=classify, allowed=CW,
                           known=KNOWN)
    released, categories = out.released[0]
    assert source == pristine and "sender" not in released
    assert out.redactions == ["Communication.sender"] and "reporter-identity" in out.withheld_categories
    assert categories == CW
    out = filter_resources([(source, "p1", frozenset({"child-welfare-case"}))], classify=classify,
                           allowed=CW | {"reporter-identity"}, known=KNOWN)
    released, categories = out.released[0]
    assert released["sender"]["display"] == REPORTER and categories == CW | {"reporter-identity"}


def test_unlabelled_items_are_copied_and_not_walked(monkeypatch):
    import broker.pipeline.filtering as filtering

    walked = []
    monkeypatch.setattr(filtering, "redact_labelled_elements",
                        lambda r, a, k: walked.append(r["id"]) or redact_labelled_elements(r, a, k))
    plain = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"}}
    items = [(plain, "p1", frozenset({"child-welfare-case"})), (referral(), "p1", frozenset({"child-welfare-case"}))]
    out = filter_resources(items, classify=lambda r, d: d, allowed=CW, known=KNOWN)
    assert walked == ["ref-1"]  # only the labelled item was walked, and it was redacted
    assert out.released[0][0] == plain and out.released[0][0] is not plain
    assert "sender" not in out.released[1][0]
