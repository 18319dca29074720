"""The legal form rules, one element at a time: each required element's absence is named."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from broker.consent import validation as v
from broker.consent.validation import ValidatedConsent, capacity_refusal, validate_consent
from broker.errors import Unprocessable
from broker.settings import REPO_POLICY_DIR
from broker.vocabulary import Vocabulary
from tests.consent import fixtures as f

VOCAB = Vocabulary.load(REPO_POLICY_DIR)


def check(resource: dict, youth=None, vocabulary=VOCAB, **kw) -> ValidatedConsent:
    return validate_consent(resource, youth=youth or f.youth(15), vocabulary=vocabulary, now=f.NOW, **kw)


def refused(resource: dict, youth=None, **kw) -> list[tuple[str, str]]:
    with pytest.raises(Unprocessable) as err:
        check(resource, youth, **kw)
    assert err.value.issues, "a refusal must name the elements at fault"
    return err.value.issues


def remove(resource: dict, what: str) -> dict:
    """The resource without one element: a dotted path, or ``ext:<name>`` for a broker extension."""
    out = copy.deepcopy(resource)
    if what.startswith("ext:"):
        url = v.BASE + "/StructureDefinition/" + what[4:]
        out["extension"] = [e for e in out["extension"] if e["url"] != url]
        return out
    *parents, leaf = what.split(".")
    node = out
    for p in parents:
        node = node[p]
    del node[leaf]
    return out


BUILDERS = {"part2": f.part2, "hiv": f.hiv, "cmia": f.cmia, "education": f.education, "release": f.release}
COMMON = [  # every form
    ("performer", "Consent.performer", "signer"),
    ("ext:signer-capacity", "Consent.extension:signer-capacity", "capacity"),
    ("provision.securityLabel", "Consent.provision.securityLabel", "categories"),
    ("provision.type", "Consent.provision.type", "permit"),
    ("patient", "Consent.patient", "42 CFR 2.31(a)(1)"),
    ("status", "Consent.status", "required element"),
]
REQUIRED = {
    "part2": [
        ("organization", "Consent.organization", "42 CFR 2.31(a)(2): who may disclose is missing"),
        ("provision.code", "Consent.provision.code", "42 CFR 2.31(a)(3)"),
        ("provision.actor", "Consent.provision.actor", "42 CFR 2.31(a)(4)"),
        ("provision.purpose", "Consent.provision.purpose", "42 CFR 2.31(a)(5)"),
        ("ext:revocation-notice", "Consent.extension:revocation-notice", "42 CFR 2.31(a)(6)"),
        ("provision.period.end", "Consent.provision.period.end", "42 CFR 2.31(a)(7)"),
        ("sourceAttachment", "Consent.sourceAttachment", "42 CFR 2.31(a)(8)"),
        ("dateTime", "Consent.dateTime", "42 CFR 2.31(a)(9)"),
    ],
    "hiv": [
        ("sourceAttachment", "Consent.sourceAttachment", "H&S 120980"),
        ("dateTime", "Consent.dateTime", "H&S 120980"),
        ("provision.actor", "Consent.provision.actor", "exactly one recipient"),
        ("provision.purpose", "Consent.provision.purpose", "purpose of use"),
    ],
    "cmia": [
        ("sourceAttachment", "Consent.sourceAttachment", "Civ. 56.11(c)"),
        ("dateTime", "Consent.dateTime", "Civ. 56.11(c)"),
        ("provision.purpose", "Consent.provision.purpose", "Civ. 56.11(d)"),
        ("provision.code", "Consent.provision.code", "Civ. 56.11(d)"),
        ("organization", "Consent.organization", "Civ. 56.11(e)"),
        ("provision.actor", "Consent.provision.actor", "Civ. 56.11(f)"),
        ("ext:use-limitation", "Consent.extension:use-limitation", "Civ. 56.11(g)"),
        ("provision.period.end", "Consent.provision.period.end", "Civ. 56.11(h)"),
        ("ext:copy-provided", "Consent.extension:copy-provided", "Civ. 56.11(i)"),
        ("ext:revocation-notice", "Consent.extension:revocation-notice", "right to revoke"),
    ],
    "education": [
        ("sourceAttachment", "Consent.sourceAttachment", "34 CFR 99.30(a)"),
        ("dateTime", "Consent.dateTime", "34 CFR 99.30(a)"),
        ("provision.code", "Consent.provision.code", "34 CFR 99.30(b)(1)"),
        ("provision.purpose", "Consent.provision.purpose", "34 CFR 99.30(b)(2)"),
        ("provision.actor", "Consent.provision.actor", "34 CFR 99.30(b)(3)"),
    ],
    "release": [
        ("sourceAttachment", "Consent.sourceAttachment", "release authorization"),
        ("dateTime", "Consent.dateTime", "release authorization"),
        ("provision.actor", "Consent.provision.actor", "release authorization"),
        ("provision.purpose", "Consent.provision.purpose", "release authorization"),
        ("provision.period.end", "Consent.provision.period.end", "release authorization"),
    ],
}
CASES = [pytest.param(form, *case, id=f"{form}-{case[0]}")
         for form in BUILDERS for case in REQUIRED[form] + COMMON]


@pytest.mark.parametrize("form", BUILDERS)
def test_each_complete_fixture_is_accepted_as_its_form(form):
    result = check(BUILDERS[form]())
    assert result.form == form


@pytest.mark.parametrize("form,element,expression,legal", CASES)
def test_removing_a_required_element_is_refused_naming_it(form, element, expression, legal):
    issues = refused(remove(BUILDERS[form](), element))
    assert any(e == expression and legal in t for e, t in issues), issues


def test_every_missing_element_is_reported_at_once():
    resource = f.part2()
    for element in ("organization", "provision.code", "sourceAttachment", "ext:revocation-notice"):
        resource = remove(resource, element)
    expressions = {e for e, _t in refused(resource)}
    assert {"Consent.organization", "Consent.provision.code", "Consent.sourceAttachment",
            "Consent.extension:revocation-notice"} <= expressions


def test_a_part2_consent_maps_to_its_terms():
    result = check(f.part2())
    assert result.categories == ("sud-part2",)
    assert result.grounds == {"sud-part2": "consent-part2"}
    assert result.recipients == ({"kind": "role", "value": "child-welfare-worker"},)
    assert result.purposes == ("COC",)
    assert result.signer_capacity == "youth" and result.signer_reference == "RelatedPerson/signer-1"
    assert result.signed_at.isoformat() == "2025-02-21T01:30:00+00:00"
    assert result.period_start.isoformat() == "2025-02-20T08:00:00+00:00"  # county midnight
    assert result.period_end.isoformat() == "2025-08-21T07:00:00+00:00"  # through the end date
    assert result.disclosure_limit is None and result.expiry_event is None


def test_a_part2_consent_may_expire_on_an_event_instead_of_a_date():
    resource = remove(f.part2(), "provision.period.end")
    resource["extension"].append({"url": v.EXPIRY_EVENT_URL, "valueString": "discharge from the program"})
    result = check(resource)
    assert result.expiry_event == "discharge from the program" and result.period_end is None


def test_cmia_requires_a_date_not_an_event():
    resource = remove(f.cmia(), "provision.period.end")
    resource["extension"].append({"url": v.EXPIRY_EVENT_URL, "valueString": "end of treatment"})
    issues = refused(resource)
    assert ("Consent.extension:expiry-event" in {e for e, _t in issues})
    assert any(e == "Consent.provision.period.end" and "Civ. 56.11(h)" in t for e, t in issues)


def test_psychotherapy_notes_are_always_refused_even_by_a_court():
    resource = f.with_capacity(f.release(), "court")
    resource["provision"]["securityLabel"] = [f.label("PSYTHPN")]
    issues = refused(resource)
    assert ("Consent.provision.securityLabel", v.PSYCHOTHERAPY_REFUSAL) in issues
    assert v.PSYCHOTHERAPY_REFUSAL == ("psychotherapy notes are never released through the broker "
                                       "(45 CFR 164.508(a)(2))")


@pytest.mark.parametrize("builder,category", [(f.part2, "sud-part2"), (f.hiv, "hiv")])
def test_a_generic_mdt_release_form_is_not_valid_for_part2_or_hiv(builder, category):
    resource = builder()
    assert check(resource)  # valid as the specific form
    resource["category"].append({"coding": [{"system": v.CONSENT_FORM_SYSTEM, "code": v.MDT_RELEASE}]})
    issues = refused(resource)
    assert ("Consent.category", v.GENERIC_FORM_INVALID[category]) in issues


def test_a_generic_mdt_release_form_is_fine_for_a_plain_release():
    resource = f.release()
    resource["category"].append({"coding": [{"system": v.CONSENT_FORM_SYSTEM, "code": v.MDT_RELEASE}]})
    assert check(resource).form == "release"


def reproductive(capacity: str) -> dict:
    resource = f.with_capacity(f.cmia(), capacity)
    resource["provision"]["securityLabel"] = [f.label("SEX")]
    return resource


@pytest.mark.parametrize("age", [10, 15])
def test_a_parent_may_not_authorize_reproductive_health_at_any_age(age):
    issues = refused(reproductive("parent-guardian"), f.youth(age))
    assert any(e == "Consent.extension:signer-capacity" and "Fam. 6925" in t for e, t in issues)
    assert check(reproductive("youth"), f.youth(age)).categories == ("reproductive-health",)


def test_the_youth_signs_for_sud_at_13():
    assert check(f.part2(), f.youth(13)).signer_capacity == "youth"


def test_a_parent_signs_for_sud_at_11_but_not_at_13():
    parent = f.with_capacity(f.part2(), "parent-guardian")
    assert check(parent, f.youth(11)).signer_capacity == "parent-guardian"
    issues = refused(parent, f.youth(13))
    assert any(e == "Consent.extension:signer-capacity" and "Fam. 6929" in t for e, t in issues)
    issues = refused(f.part2(), f.youth(11))  # nor does the youth sign alone at 11
    assert any(e == "Consent.extension:signer-capacity" for e, _t in issues)


def test_a_removed_childs_parent_may_not_authorize_mental_health_but_a_court_may():
    removed = f.youth(10, removed=True)
    issues = refused(f.with_capacity(f.cmia(), "parent-guardian"), removed)
    assert any(e == "Consent.extension:signer-capacity" and "Civ. 56.106" in t for e, t in issues)
    assert check(f.with_capacity(f.cmia(), "court"), removed).signer_capacity == "court"
    assert check(f.with_capacity(f.cmia(), "parent-guardian"), f.youth(10)).form == "cmia"


def test_minors_counsel_may_not_sign_an_authorization():
    for builder in BUILDERS.values():
        issues = refused(f.with_capacity(builder(), "minors-counsel"))
        assert any(e == "Consent.extension:signer-capacity" and "W&IC 317(f)" in t for e, t in issues)


def test_once_18_only_the_youth_or_a_court_signs():
    adult = f.youth(18)
    assert check(f.part2(), adult).signer_capacity == "youth"
    assert check(f.with_capacity(f.education(), "youth"), adult).form == "education"
    for capacity in ("parent-guardian", "education-rights-holder"):
        issues = refused(f.with_capacity(f.education(), capacity), adult)
        assert any(e == "Consent.extension:signer-capacity" and "18" in t for e, t in issues)


def test_education_is_signed_by_the_education_rights_holder_while_a_minor():
    for capacity in ("parent-guardian", "youth"):
        issues = refused(f.with_capacity(f.education(), capacity), f.youth(16))
        assert any(e == "Consent.extension:signer-capacity" and "34 CFR 99.30" in t for e, t in issues)


def test_an_unknown_birth_date_means_a_minor_of_12_or_more():
    unknown = f.youth(None)
    assert check(f.part2(), unknown).signer_capacity == "youth"
    issues = refused(f.with_capacity(f.part2(), "parent-guardian"), unknown)
    assert any(e == "Consent.extension:signer-capacity" for e, _t in issues)
    issues = refused(f.with_capacity(f.release(), "youth"), unknown)  # not an adult either
    assert any(e == "Consent.extension:signer-capacity" for e, _t in issues)


def test_capacity_table():
    assert capacity_refusal("sti", "youth", age=12, removed=False) is None
    assert capacity_refusal("sti", "youth", age=11, removed=False) is not None
    assert capacity_refusal("hiv", "parent-guardian", age=11, removed=False) is None
    assert capacity_refusal("hiv", "parent-guardian", age=11, removed=True) is not None
    assert capacity_refusal("general-health", "parent-guardian", age=9, removed=False) is None
    assert capacity_refusal("general-health", "education-rights-holder", age=9, removed=False) is not None
    assert capacity_refusal("placement-location", "court", age=30, removed=True) is None


def test_an_hiv_authorization_names_exactly_one_recipient_and_allows_one_disclosure():
    assert check(f.hiv()).disclosure_limit == 1
    resource = f.hiv()
    resource["provision"]["actor"].append(f.recipient("role", "public-health-nurse"))
    assert ("Consent.provision.actor", v.HIV_ONE_RECIPIENT) in refused(resource)


def test_a_consent_covering_several_categories_meets_each_form_and_takes_the_strictest():
    resource = f.cmia()
    resource["provision"]["securityLabel"] = [f.label("MH"), f.label("SUD")]
    result = check(resource)
    assert result.form == "part2"
    assert result.grounds == {"mental-health": "consent-cmia", "sud-part2": "consent-part2"}
    issues = refused(remove(resource, "ext:copy-provided"))  # the CMIA element is still needed
    assert any("Civ. 56.11(i)" in t for _e, t in issues)


def test_unknown_purpose_role_and_label_are_refused():
    resource = f.part2()
    resource["provision"]["purpose"].append({"system": "http://example.org/x", "code": "MARKETING"})
    resource["provision"]["actor"].append(f.recipient("role", "registry-admin"))
    resource["provision"]["securityLabel"].append({"system": "http://example.org/x", "code": "SECRET"})
    issues = refused(resource)
    assert ("Consent.provision.purpose[1]", "unknown purpose of use") in issues
    assert ("Consent.provision.actor[1].reference.identifier", "unknown team role") in issues
    assert any(e == "Consent.provision.securityLabel[1]" for e, _t in issues)


def test_recipients_must_be_registered_when_a_lookup_is_given():
    resource = f.part2()
    resource["provision"]["actor"] = [f.recipient("person", "staff-nobody"), f.recipient("agency", "bh")]
    issues = refused(resource, known_recipient=lambda kind, value: value == "bh")
    assert issues == [("Consent.provision.actor[0].reference.identifier", "unknown staff member")]


def test_a_recipient_by_literal_reference_or_other_role_is_refused():
    resource = f.part2()
    resource["provision"]["actor"] = [{"role": {"coding": [{"system": v.PARTICIPATION_SYSTEM, "code": "IRCP"}]},
                                       "reference": {"reference": "Practitioner/p1"}},
                                      {"role": {"coding": [{"system": v.PARTICIPATION_SYSTEM, "code": "PRCP"}]},
                                       "reference": {"reference": "Practitioner/p2"}}]
    expressions = {e for e, _t in refused(resource)}
    assert {"Consent.provision.actor[0].reference.identifier", "Consent.provision.actor[1].role"} <= expressions


@pytest.mark.parametrize("status", ["draft", "proposed", "inactive", "rejected"])
def test_only_an_active_consent_is_filed(status):
    assert ("Consent.status", "the consent must have status active to be filed") in refused(f.part2(status=status))


def test_a_deny_provision_is_refused():
    resource = f.part2()
    resource["provision"]["type"] = "deny"
    assert any(e == "Consent.provision.type" for e, _t in refused(resource))


def test_nested_provisions_are_refused_rather_than_ignored():
    resource = f.part2()
    resource["provision"]["provision"] = [{"type": "deny", "actor": [f.recipient("role", "probation-officer")]}]
    assert any(e == "Consent.provision.provision" for e, _t in refused(resource))


def test_a_copy_provided_flag_of_false_is_not_a_copy():
    resource = f.cmia()
    for ext in resource["extension"]:
        if ext["url"] == v.COPY_PROVIDED_URL:
            ext["valueBoolean"] = False
    assert any(e == "Consent.extension:copy-provided" for e, _t in refused(resource))


def test_the_signer_needs_a_reference_or_identifier_not_a_name():
    issues = refused(f.part2(performer=[{"display": "A Name"}]))
    assert ("Consent.performer", "the signer must be identified by reference or identifier, not by name") in issues
    assert all("A Name" not in t for _e, t in issues)


def test_dates_must_make_sense():
    assert any(e == "Consent.dateTime" and "future" in t for e, t in refused(f.part2(dateTime="2026-01-01")))
    assert any(e == "Consent.dateTime" and "birth" in t
               for e, t in refused(f.part2(dateTime="2009-01-01"), f.youth(13)))
    resource = f.part2()
    resource["provision"]["period"]["end"] = "2025-02-25"
    assert any(e == "Consent.provision.period.end" and "expired" in t for e, t in refused(resource))
    resource["provision"]["period"] = {"start": "2025-03-10", "end": "2025-03-05"}
    assert any(e == "Consent.provision.period" for e, _t in refused(resource))
    assert any(e == "Consent.dateTime" for e, _t in refused(f.part2(dateTime="2025-02")))


def test_structural_errors_name_the_path_and_never_echo_the_value():
    resource = f.part2(dateTime="SECRET-VALUE-123")
    resource["provision"]["actor"][0].pop("reference")
    issues = refused(resource)
    assert any(e == "Consent.dateTime" for e, _t in issues)
    assert any(e == "Consent.provision.actor[0].reference" for e, _t in issues)
    assert all(t.startswith("structure:") and "SECRET" not in t for _e, t in issues)
    assert [e for e, _t in refused({"resourceType": "Patient"})] == ["Consent.resourceType"]


def test_the_security_label_table_agrees_with_the_value_sets():
    for path in sorted(Path(REPO_POLICY_DIR, "valuesets").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for code in spec.get("security") or ():
            assert v.SECURITY_LABEL_CATEGORIES[code] == spec["category"], (path.name, code)


def test_grounds_come_from_the_vocabulary_and_the_fallback_agrees_with_it():
    table = VOCAB.consent_grounds
    for category in VOCAB.categories:
        if category != v.PSYCHOTHERAPY_NOTES:
            assert v.consent_ground(category, object()) == table[category], category
    custom = dataclasses.replace(VOCAB, consent_grounds={**table, "sud-part2": "consent-part2-county"})
    assert check(f.part2(), vocabulary=custom).grounds == {"sud-part2": "consent-part2-county"}


def test_the_documented_example_is_accepted_as_documented():
    import json
    import re

    text = Path(REPO_POLICY_DIR).parent.joinpath("docs", "consents.md").read_text()
    example = json.loads(re.search(r"## Complete example.*?```json\n(.*?)```", text, re.S).group(1))
    result = check(example, dataclasses.replace(f.youth(15), youth_id="y-alpha"))
    assert (result.form, result.categories, result.purposes) == ("part2", ("sud-part2",), ("COC",))
    assert result.recipients == ({"kind": "role", "value": "child-welfare-worker"},)
    assert result.grounds == {"sud-part2": "consent-part2"}
    assert (result.period_start.isoformat(), result.period_end.isoformat()) == (
        "2025-02-20T08:00:00+00:00", "2025-08-21T07:00:00+00:00")
