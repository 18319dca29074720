"""HL7's own R4 Consent examples (npm package hl7.fhir.r4.examples 4.0.1), each with the broker's verdict.

The package is fetched from the npm registry by the test command (never committed). Ordinary
FHIR consents lack what California and federal law require of an authorization to disclose
(a signer and the capacity they sign in, the signed form, the categories, recipients named in
the IRCP role, an expiry date), so every official example is refused, and the table names
exactly the elements each refusal points at. docs/consents.md explains each element.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from fhir.resources.R4B.consent import Consent

from broker.consent.validation import YouthFacts, validate_consent
from broker.errors import Unprocessable
from broker.settings import REPO_POLICY_DIR
from broker.vocabulary import Vocabulary

PACKAGE = "hl7.fhir.r4.examples@4.0.1"
CACHE = Path(__file__).resolve().parents[1] / ".cache"
TARBALL = CACHE / "hl7.fhir.r4.examples-4.0.1.tgz"
NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)

VERDICTS = {
    "consent-example-Emergency": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.provision", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-Out": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-basic": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.period.end", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-grantor": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.actor[1].role", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-notAuthor": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-notOrg": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-notThem": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-notThis": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.data", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-notTime": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.period.end", "Consent.provision.securityLabel", "Consent.provision.type", "Consent.sourceAttachment"},
    "consent-example-pkb": {"Consent.extension:signer-capacity", "Consent.performer", "Consent.provision.actor[0].role", "Consent.provision.provision", "Consent.provision.securityLabel", "Consent.provision.type"},
    "consent-example-signature": {"Consent.extension:signer-capacity", "Consent.provision.actor[0].role", "Consent.provision.period.end", "Consent.provision.provision", "Consent.provision.securityLabel", "Consent.provision.type"},
    "consent-example-smartonfhir": {"Consent.extension:signer-capacity", "Consent.provision.period.end", "Consent.provision.provision", "Consent.provision.securityLabel", "Consent.provision.type"},
}


def _tarball() -> Path:
    """The official examples package, fetched once with npm (the test command fetches it too)."""
    if not TARBALL.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(CACHE), "--silent"], check=True,
                       capture_output=True, timeout=600)
    return TARBALL


def _examples() -> dict[str, dict]:
    out = {}
    with tarfile.open(_tarball()) as t:
        for member in t.getmembers():
            if member.name.startswith("package/Consent-"):
                resource = json.loads(t.extractfile(member).read())
                out[resource["id"]] = resource
    return out


EXAMPLES = _examples()
VOCAB = Vocabulary.load(REPO_POLICY_DIR)


def test_every_official_example_has_a_verdict():
    assert set(EXAMPLES) == set(VERDICTS)


@pytest.mark.parametrize("example_id", sorted(VERDICTS))
def test_official_example_is_parsed_and_refused_with_its_reasons(example_id):
    resource = EXAMPLES[example_id]
    Consent.model_validate(resource)  # structurally valid FHIR (R4B model)
    patient = resource["patient"]["reference"].split("/")[-1]
    with pytest.raises(Unprocessable) as refused:
        validate_consent(resource, youth=YouthFacts(patient, date(2010, 1, 1), False), vocabulary=VOCAB, now=NOW)
    issues = refused.value.issues
    assert {expression for expression, _ in issues} == VERDICTS[example_id]
    assert all(text for _, text in issues)
    display = resource["patient"].get("display")
    if display:  # reasons never quote the resource
        assert all(display not in text for _, text in issues)
