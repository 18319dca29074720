"""Consents shaped like HL7's published R4 Consent examples, each with the verdict the broker gives.

fhir.resources 8.3 ships no example resources and none are installed on this machine, so the
examples below are written here, following the shapes of the HL7 examples (a basic opt-in
under a privacy policy, an opt-out, an exception for one practitioner, a research consent, a
scanned form referenced by URL, an advance directive) without copying their text. Ordinary
FHIR consents lack the elements California and federal law require, so most are rejected:
the table names the exact elements each rejection points at.
"""

from __future__ import annotations

import pytest

from broker.consent import validation as v
from broker.consent.validation import validate_consent
from broker.errors import Unprocessable
from broker.settings import REPO_POLICY_DIR
from broker.vocabulary import Vocabulary
from tests.consent import fixtures as f

VOCAB = Vocabulary.load(REPO_POLICY_DIR)
PRIVACY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}
LOINC_CONSENT = [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}]
PATIENT = {"reference": f"Patient/{f.YOUTH_ID}"}


def hl7_basic_opt_in() -> dict:
    """A patient opts in to a privacy policy; no recipients, categories, signer capacity or signed form."""
    return {"resourceType": "Consent", "status": "active", "scope": PRIVACY, "category": LOINC_CONSENT,
            "patient": PATIENT, "dateTime": "2025-01-10",
            "organization": [{"reference": "Organization/clinic"}],
            "sourceAttachment": {"title": "Privacy notice acknowledgement"},
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTIN"}]}}


def hl7_opt_out() -> dict:
    """A patient withholds everything from everyone: a deny provision, which the broker does not file."""
    return {**hl7_basic_opt_in(), "provision": {"type": "deny"}}


def hl7_exception_for_one_practitioner() -> dict:
    """Permit with a nested deny for one practitioner; the broker refuses rather than ignore the exception."""
    resource = f.part2()
    resource["provision"]["provision"] = [{"type": "deny", "actor": [{
        "role": {"coding": [{"system": v.PARTICIPATION_SYSTEM, "code": "PRCP"}]},
        "reference": {"reference": "Practitioner/p-1"}}]}]
    return resource


def hl7_research() -> dict:
    """A research consent naming a study, not a disclosure to a team member."""
    return {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "patient": PATIENT, "dateTime": "2025-01-10",
            "policy": [{"uri": "https://example.org/studies/1"}],
            "provision": {"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                                         "code": "HRESCH"}]}}


def hl7_scanned_form_by_url() -> dict:
    """A signed form referenced by URL with the broker's elements: accepted as a Part 2 consent."""
    resource = f.part2()
    resource["sourceAttachment"] = {"contentType": "application/pdf", "url": "https://ehr.example.org/forms/77"}
    return resource


def hl7_advance_directive() -> dict:
    """An advance directive (scope adr) in draft: neither active nor a disclosure authorization."""
    return {"resourceType": "Consent", "status": "proposed",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "adr"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "75320-2"}]}],
            "patient": PATIENT, "dateTime": "2025-01-10",
            "sourceAttachment": {"contentType": "application/pdf", "url": "https://ehr.example.org/forms/9"},
            "provision": {"type": "permit"}}


def hl7_other_patient() -> dict:
    """A consent about a patient the broker does not know by that reference."""
    return {**f.part2(), "patient": {"reference": "Patient/f001"}}


def hl7_without_scope() -> dict:
    """Structurally invalid: scope and category are required in R4."""
    resource = f.part2()
    del resource["scope"], resource["category"]
    return resource


NO_BROKER_ELEMENTS = {"Consent.provision.type", "Consent.provision.securityLabel", "Consent.performer",
                      "Consent.extension:signer-capacity", "Consent.sourceAttachment"}
VERDICTS = [
    ("basic opt-in", hl7_basic_opt_in, ("rejected", NO_BROKER_ELEMENTS)),
    ("opt-out", hl7_opt_out, ("rejected", NO_BROKER_ELEMENTS)),
    ("exception for one practitioner", hl7_exception_for_one_practitioner,
     ("rejected", {"Consent.provision.provision"})),
    ("research", hl7_research, ("rejected", {"Consent.provision.purpose[0]", "Consent.provision.securityLabel",
                                              "Consent.performer", "Consent.extension:signer-capacity"})),
    ("scanned form by url", hl7_scanned_form_by_url, ("accepted", "part2", ("sud-part2",))),
    ("advance directive", hl7_advance_directive,
     ("rejected", {"Consent.status", "Consent.provision.securityLabel", "Consent.performer",
                   "Consent.extension:signer-capacity"})),
    ("another patient", hl7_other_patient, ("rejected", {"Consent.patient"})),
    ("no scope", hl7_without_scope, ("rejected", {"Consent.scope", "Consent.category"})),
]


@pytest.mark.parametrize("name,build,verdict", VERDICTS, ids=[n for n, _b, _v in VERDICTS])
def test_example_verdict(name, build, verdict):
    youth = f.youth(15)
    if verdict[0] == "accepted":
        result = validate_consent(build(), youth=youth, vocabulary=VOCAB, now=f.NOW)
        assert (result.form, result.categories) == verdict[1:]
        return
    with pytest.raises(Unprocessable) as err:
        validate_consent(build(), youth=youth, vocabulary=VOCAB, now=f.NOW)
    assert {e for e, _t in err.value.issues} == verdict[1]
    assert all(t for _e, t in err.value.issues), "every rejection gives a reason"
