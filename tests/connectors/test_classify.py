"""The classifier on the county's real value sets and on broken ones."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from connectors.classify import LOCAL_CATEGORY_SYSTEM, Classifier
from tests.connectors.conftest import DEFAULTS, DEMO_FHIR, VALUESETS, demo_rows, known_categories

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"


def demo_resources() -> dict[str, dict]:
    out = {}
    for path in sorted(DEMO_FHIR.glob("*.json")):
        for entry in json.loads(path.read_text())["entry"]:
            out[entry["resource"]["id"]] = entry["resource"]
    return out


@pytest.mark.parametrize("row", demo_rows(), ids=lambda r: r.id)
def test_each_demo_resource_gets_exactly_the_readme_categories(classifier, row):
    assert classifier.classify(demo_resources()[row.id], DEFAULTS) == row.categories


def test_readme_table_covers_every_demo_resource():
    assert {r.id for r in demo_rows()} == set(demo_resources())


def test_alpha_has_every_category_and_charlie_only_three():
    coded = {c for r in demo_rows() if r.patient == "pt-alpha" for c in r.categories}
    assert coded == {"general-health", "mental-health", "psychotherapy-notes", "sud-part2", "hiv",
                     "reproductive-health", "sti", "youth-statement"}
    charlie = {c for r in demo_rows() if r.patient == "pt-charlie" and r.type != "Patient" for c in r.categories}
    assert charlie - DEFAULTS == {"sud-part2", "hiv", "psychotherapy-notes"}


def labelled(*labels: tuple[str | None, str]) -> dict:
    security = [{"code": code} if system is None else {"system": system, "code": code} for system, code in labels]
    return {"resourceType": "Observation", "meta": {"security": security}}


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([(ACT, "ETH")], {"sud-part2"}),
        ([(ACT, "SUD")], {"sud-part2"}),
        ([(ACT, "42CFRPart2")], {"sud-part2"}),
        ([(ACT, "HIV")], {"hiv"}),
        ([(ACT, "MH")], {"mental-health"}),
        ([(ACT, "PSY")], {"mental-health"}),
        ([(ACT, "PSYTHPN")], {"psychotherapy-notes"}),
        ([(ACT, "SEX")], {"reproductive-health"}),
        ([(ACT, "STD")], {"sti"}),
        ([("http://hl7.org/fhir/v3/ActCode", "HIV")], {"hiv"}),  # the pre-THO system URL
        ([(None, "STD")], {"sti"}),  # no system: assume ActCode, the restrictive reading
        ([(ACT, "HIV"), (ACT, "SUD")], {"hiv", "sud-part2"}),
        ([("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "V")], set()),
        ([("https://other.example.org/labels", "HIV")], set()),  # someone else's code named HIV
        ([(ACT, "NORDSCLCD")], set()),
        ([(LOCAL_CATEGORY_SYSTEM, "youth-statement")], {"youth-statement"}),
        ([(LOCAL_CATEGORY_SYSTEM, "canra-report")], {"canra-report"}),
    ],
)
def test_security_labels_map_to_categories(classifier, labels, expected):
    assert classifier.classify(labelled(*labels), DEFAULTS) == DEFAULTS | expected


def test_unknown_local_category_is_carried_as_is_for_the_policy_to_deny(classifier):
    cats = classifier.classify(labelled((LOCAL_CATEGORY_SYSTEM, "gang-intel")), DEFAULTS)
    assert cats == {"general-health", "gang-intel"}
    assert "gang-intel" not in known_categories()


def coded(system: str, code: str, element: str = "code") -> dict:
    return {"resourceType": "Condition", element: {"coding": [{"system": system, "code": code}]}}


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        (ICD, "F12.20", {"sud-part2"}),
        (ICD, "F1220", {"sud-part2"}),  # written without the dot
        (ICD, "f12.20", {"sud-part2"}),
        (ICD, "F10", {"sud-part2"}),  # the prefix itself
        (ICD, "F19.99", {"sud-part2"}),
        (ICD, "F17.210", set()),  # nicotine: not a SUD under 42 CFR 2.11
        (ICD, "F1", set()),  # shorter than any prefix
        (ICD, "F43.10", {"mental-health"}),
        (ICD, "F32.A", {"mental-health"}),
        (ICD, "F90.0", {"mental-health"}),
        (ICD, "F84.0", set()),  # autism: developmental, not listed
        (ICD, "B20", {"hiv"}),
        (ICD, "Z21", {"hiv"}),
        (ICD, "R75", {"hiv"}),
        (ICD, "Z11.4", {"hiv"}),
        (ICD, "Z11.3", {"sti"}),
        (ICD, "Z11.59", set()),  # screening for other viral diseases
        (ICD, "A56.00", {"sti"}),
        (ICD, "A64", {"sti"}),
        (ICD, "A49.9", set()),
        (ICD, "O9A.211", {"reproductive-health"}),
        (ICD, "O98.711", {"hiv", "reproductive-health"}),
        (ICD, "Z30.011", {"reproductive-health"}),
        (ICD, "Z31.0", set()),
        (ICD, "J45.909", set()),
        ("http://hl7.org/fhir/sid/icd-10", "F12.2", set()),  # WHO ICD-10 has no value set entries here
        (LOINC, "75622-1", {"hiv"}),
        (LOINC, "75622", set()),  # LOINC is matched exactly, never by prefix
        (LOINC, "2106-3", {"reproductive-health"}),
        (LOINC, "21613-5", {"sti"}),
        (LOINC, "44249-1", {"mental-health"}),
        (LOINC, "29463-7", set()),
        (SCT, "86406008", {"hiv"}),
        (SCT, "F12.20", set()),  # right code, wrong system
        (None, "F12.20", set()),
    ],
)
def test_code_and_prefix_matching(classifier, system, code, expected):
    resource = {"resourceType": "Condition", "code": {"coding": [{"system": system, "code": code}]}}
    assert classifier.classify(resource, frozenset()) == expected


@pytest.mark.parametrize(
    "resource",
    [
        coded(ICD, "B20"),
        {"resourceType": "Observation", "valueCodeableConcept": {"coding": [{"system": ICD, "code": "B20"}]}},
        {"resourceType": "MedicationRequest",
         "medicationCodeableConcept": {"coding": [{"system": ICD, "code": "B20"}]}},
        {"resourceType": "DocumentReference", "type": {"coding": [{"system": ICD, "code": "B20"}]}},
        {"resourceType": "Condition", "category": [{"text": "x"}, {"coding": [{"system": ICD, "code": "B20"}]}]},
        {"resourceType": "Encounter", "reasonCode": [{"coding": [{"system": LOINC, "code": "1-8"},
                                                                  {"system": ICD, "code": "B20"}]}]},
        {"resourceType": "Immunization", "vaccineCode": {"coding": [{"system": LOINC, "code": "75622-1"}]}},
        {"resourceType": "Encounter", "type": [{"coding": [{"system": ICD, "code": "Z21"}]}]},
        {"resourceType": "Observation", "code": {"text": "panel"},
         "component": [{"code": {"coding": [{"system": LOINC, "code": "56888-1"}]}}]},
        {"resourceType": "Observation", "contained": [coded(ICD, "B20")]},
    ],
    ids=["code", "value", "medication", "type", "category-list", "reason-list", "vaccine", "type-list",
         "component", "contained"],
)
def test_codings_are_found_in_every_coded_element(classifier, resource):
    assert classifier.classify(resource, frozenset()) == {"hiv"}


def test_codes_outside_coded_elements_do_not_count(classifier):
    resource = {"resourceType": "Observation", "code": {"text": "weight"},
                "note": [{"text": "B20"}], "identifier": [{"system": ICD, "value": "B20"}],
                "bodySite": {"coding": [{"system": ICD, "code": "B20"}]}}
    assert classifier.classify(resource, frozenset()) == frozenset()


@pytest.mark.parametrize(
    "resource",
    [{}, {"resourceType": "Observation", "code": "B20"}, {"code": {"coding": "B20"}}, {"meta": {"security": "HIV"}},
     {"code": {"coding": [None, 3, {"system": ICD, "code": 20}]}}, {"meta": None, "contained": [1, None]}],
)
def test_malformed_resources_get_the_defaults(classifier, resource):
    assert classifier.classify(resource, DEFAULTS) == DEFAULTS


@pytest.mark.parametrize("defaults", [frozenset(), DEFAULTS, frozenset({"general-health", "education"})])
def test_defaults_are_always_included(classifier, defaults):
    resource = coded(ICD, "F12.20")
    assert classifier.classify(resource, defaults) == defaults | {"sud-part2"}
    assert classifier.classify({"resourceType": "Patient"}, defaults) == defaults


def test_every_value_set_names_a_vocabulary_category_and_cites_law(classifier):
    cats = {vs.category for vs in classifier.value_sets}
    assert cats == {"sud-part2", "hiv", "mental-health", "reproductive-health", "sti", "psychotherapy-notes"}
    assert cats <= known_categories()
    assert all(vs.citation and vs.description for vs in classifier.value_sets)


def test_classification_is_fast(classifier):
    resources = list(demo_resources().values()) * 300
    started = time.perf_counter()
    for resource in resources:
        classifier.classify(resource, DEFAULTS)
    per_item = (time.perf_counter() - started) / len(resources)
    assert per_item < 100e-6, f"{per_item * 1e6:.1f} µs per resource"


GOOD = """category: hiv
citation: "H&S 120975"
description: HIV tests
codes:
  - system: http://loinc.org
    codes: [75622-1]
security: [HIV]
"""


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("hiv.yaml", "category: hiv\ncodes: [unclosed", "invalid YAML"),
        ("hiv.yaml", "- just\n- a list\n", "must be a mapping"),
        ("hiv.yaml", GOOD.replace('citation: "H&S 120975"\n', ""), "missing keys: citation"),
        ("hiv.yaml", GOOD + "extra: 1\n", "unknown keys: extra"),
        ("secret.yaml", GOOD.replace("category: hiv", "category: secret"), "not in the vocabulary"),
        ("aids.yaml", GOOD, "file name must be hiv.yaml"),
        ("hiv.yaml", GOOD.replace('"H&S 120975"', '""'), "citation must be a non-empty string"),
        ("hiv.yaml", GOOD.replace("codes:\n  - system", "codes: {}\nx:\n  - system"), "unknown keys"),
        ("hiv.yaml", GOOD.replace("codes:\n", "codes: nope\nignored:\n"), "unknown keys"),
        ("hiv.yaml", GOOD.replace("  - system: http://loinc.org\n", "  - sys: http://loinc.org\n"),
         "codes[0] has unknown keys: sys"),
        ("hiv.yaml", GOOD.replace("    codes: [75622-1]\n", ""), "codes[0] needs codes or prefixes"),
        ("hiv.yaml", GOOD.replace("[75622-1]", "[86406008]"), "codes[0].codes must be a list of non-empty strings"),
        ("hiv.yaml", GOOD.replace("codes: [75622-1]", "prefixes: B20"), "codes[0].prefixes must be a list"),
        ("hiv.yaml", GOOD.replace("system: http://loinc.org", "system: ''"), "codes[0].system"),
        ("hiv.yaml", GOOD.replace("security: [HIV]", "security: HIV"), "security must be a list"),
        ("hiv.yaml", "category: hiv\ncitation: x\ndescription: y\ncodes: []\nsecurity: []\n", "at least one"),
    ],
)
def test_bad_value_set_raises_value_error_naming_file_and_problem(tmp_path, name, text, problem):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as info:
        Classifier.from_dir(tmp_path, known_categories())
    assert name in str(info.value)
    assert problem in str(info.value)


def test_good_value_set_loads(tmp_path):
    (tmp_path / "hiv.yaml").write_text(GOOD)
    classifier = Classifier.from_dir(tmp_path, known_categories())
    assert classifier.classify(coded(LOINC, "75622-1"), frozenset()) == {"hiv"}


def test_empty_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no value set files"):
        Classifier.from_dir(tmp_path, known_categories())


def test_one_bad_file_among_good_ones_stops_loading(tmp_path):
    for path in Path(VALUESETS).glob("*.yaml"):
        shutil.copy(path, tmp_path)
    (tmp_path / "sti.yaml").write_text((tmp_path / "sti.yaml").read_text().replace("[STD]", "[STD, 7]"))
    with pytest.raises(ValueError, match="sti.yaml: security"):
        Classifier.from_dir(tmp_path, known_categories())
