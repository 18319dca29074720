"""Release only what belongs to the youth and is wholly allowed; never mutate the source's copy."""

from __future__ import annotations

import copy

from broker.pipeline.filtering import filter_resources
from connectors.base import belongs_to_patient as belongs_to
from broker.pipeline.labels import CategoryLabels, Labeller

GH = frozenset({"general-health"})


def classify(resource, defaults):
    return defaults | frozenset(resource.get("_cats", []))


def obs(rid, patient="p1", cats=()):
    return {"resourceType": "Observation", "id": rid, "subject": {"reference": f"Patient/{patient}"},
            "_cats": list(cats)}


def test_belongs_to():
    assert belongs_to(obs("a"), "p1")
    assert belongs_to({"resourceType": "Immunization", "patient": {"reference": "http://x/fhir/Patient/p1"}}, "p1")
    assert not belongs_to(obs("a", "p2"), "p1")
    assert not belongs_to({"resourceType": "Observation", "id": "a"}, "p1")
    assert not belongs_to({"resourceType": "Observation", "subject": {"reference": "Patient/p10"}}, "p1")
    assert belongs_to({"resourceType": "Patient", "id": "p1"}, "p1")
    assert not belongs_to({"resourceType": "Patient", "id": "p2"}, "p1")


def test_every_category_must_be_allowed():
    items = [(obs("a"), "p1", GH), (obs("b", cats=["hiv"]), "p1", GH), (obs("c", "p2"), "p1", GH)]
    out = filter_resources(items, classify=classify, allowed=frozenset({"general-health"}))
    assert [r["id"] for r, _ in out.released] == ["a"]
    assert out.withheld_categories == {"hiv"}
    assert out.foreign_dropped == 1


def test_released_items_are_copies():
    source = obs("a")
    pristine = copy.deepcopy(source)
    out = filter_resources([(source, "p1", GH)], classify=classify, allowed=GH)
    released, cats = out.released[0]
    Labeller(spec={"general-health": CategoryLabels("R", (), ("NORDSCLCD",))}, confidentiality_system="c",
             sensitivity_system="s", obligation_system="o", local_system="l", obligation_text={}).label(released, cats)
    assert source == pristine and released is not source and "security" in released["meta"]


def test_patient_location_is_removed_unless_placement_is_allowed():
    patient = {"resourceType": "Patient", "id": "p1", "address": [{"city": "Nowhere"}], "telecom": [{}],
               "gender": "female"}
    out = filter_resources([(patient, "p1", GH)], classify=classify, allowed=GH)
    released = out.released[0][0]
    assert "address" not in released and "telecom" not in released and released["gender"] == "female"
    assert sorted(out.redactions) == ["Patient.address", "Patient.telecom"]
    assert "address" in patient
    out = filter_resources([(patient, "p1", GH)], classify=classify, allowed=GH | {"placement-location"})
    assert "address" in out.released[0][0] and out.redactions == []


def test_labels_take_the_strictest_confidentiality_and_keep_upstream_labels():
    labeller = Labeller(spec={"general-health": CategoryLabels("R", (), ("NORDSCLCD",)),
                              "hiv": CategoryLabels("V", ("HIV",), ("NORDSCLCD", "local:NOUSEAGAINSTYOUTH"))},
                        confidentiality_system="conf", sensitivity_system="act", obligation_system="act",
                        local_system="local", obligation_text={})
    r = {"resourceType": "Observation", "meta": {"security": [{"system": "conf", "code": "N"},
                                                              {"system": "up", "code": "X"}]}}
    labeller.label(r, frozenset({"general-health", "hiv"}))
    codes = [(s["system"], s["code"]) for s in r["meta"]["security"]]
    assert ("conf", "V") in codes and ("conf", "N") not in codes and ("up", "X") in codes
    assert ("act", "HIV") in codes and ("local", "NOUSEAGAINSTYOUTH") in codes
    assert len(codes) == len(set(codes))
    # a category with no label spec gets the strictest labels
    assert labeller.summarize(["unknown-category"])[0] == "V"


def test_fresh_items_are_released_as_they_are_and_still_redacted():
    """``fresh`` (the connector's items are the caller's alone): no copy, the same objects are
    released, labelled elements still removed from them; without it the source's items stay untouched."""
    from broker.pipeline.redaction import CATEGORY_SYSTEM, INLINE_LABEL_URL

    def labelled():
        return {**obs("l"), "note": [{"text": "kept"}, {"text": "withheld", "extension": [
            {"url": INLINE_LABEL_URL, "valueCoding": {"system": CATEGORY_SYSTEM, "code": "substance-use"}}]}]}

    plain, marked = obs("a"), labelled()
    out = filter_resources([(plain, "p1", GH), (marked, "p1", GH)], classify=classify, allowed=GH,
                           known=GH | {"substance-use"}, fresh=True)
    assert out.released[0][0] is plain and out.released[1][0] is marked
    assert marked["note"] == [{"text": "kept"}] and out.redactions and "substance-use" in out.withheld_categories

    source = labelled()
    kept = copy.deepcopy(source)
    out = filter_resources([(source, "p1", GH)], classify=classify, allowed=GH, known=GH | {"substance-use"})
    assert source == kept and out.released[0][0] is not source and out.released[0][0]["note"] == [{"text": "kept"}]


def test_labels_are_remembered_per_category_set_but_no_item_shares_them():
    labeller = Labeller(spec={"general-health": CategoryLabels("R", (), ("NORDSCLCD",)),
                              "hiv": CategoryLabels("V", ("HIV",), ("NORDSCLCD",))},
                        confidentiality_system="conf", sensitivity_system="act", obligation_system="act",
                        local_system="local", obligation_text={})
    a, b, c = {}, {}, {}
    assert labeller.label(a, frozenset({"general-health"})) == ("NORDSCLCD",)
    assert labeller.label(b, frozenset({"general-health"})) == ("NORDSCLCD",)
    assert labeller.label(c, {"general-health", "hiv"}) == ("NORDSCLCD",)  # any iterable of categories
    assert a["meta"]["security"] == b["meta"]["security"] == [{"system": "conf", "code": "R"},
                                                              {"system": "act", "code": "NORDSCLCD"}]
    assert ("conf", "V") in {(s["system"], s["code"]) for s in c["meta"]["security"]}
    a["meta"]["security"][0]["code"] = "changed-on-one-item"
    assert b["meta"]["security"][0]["code"] == "R"
    assert labeller.label({}, frozenset({"general-health"})) == ("NORDSCLCD",)
    again = {}
    labeller.label(again, frozenset({"general-health"}))
    assert again["meta"]["security"][0] == {"system": "conf", "code": "R"}
