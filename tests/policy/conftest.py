"""Small policy directories written in tmp_path, so each test states exactly the rules it needs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"

SMALL_VOCABULARY = textwrap.dedent("""\
    roles:
      child-welfare-worker: Child welfare social worker
      mental-health-clinician: Mental health clinician
      district-attorney: District attorney
      casa: Court appointed special advocate
    admin_roles:
      registry-admin: County IT
    categories:
      general-health: Physical health
      mental-health: Mental health
      hiv: HIV
    purposes:
      TREAT: {system: "http://terminology.hl7.org/CodeSystem/v3-ActReason", display: treatment}
      COC: {system: "http://terminology.hl7.org/CodeSystem/v3-ActReason", display: coordination of care}
    grounds:
      mdt-member: Active MDT member
      own-statute: Own statutory access
      consent-cmia: Civ. Code 56.11 authorization
      consent-hiv: H&S 120980 authorization
    consent_grounds:
      general-health: consent-cmia
      mental-health: consent-cmia
      hiv: consent-hiv
    labels:
      confidentiality_system: http://terminology.hl7.org/CodeSystem/v3-Confidentiality
      sensitivity_system: http://terminology.hl7.org/CodeSystem/v3-ActCode
      obligation_system: http://terminology.hl7.org/CodeSystem/v3-ActCode
      local_system: https://mdt-broker.example.org/CodeSystem/security
      categories:
        general-health: {confidentiality: R, sensitivity: [], obligations: [NORDSCLCD]}
        mental-health: {confidentiality: R, sensitivity: [MH], obligations: [NORDSCLCD, local:NOUSEAGAINSTYOUTH]}
        hiv: {confidentiality: V, sensitivity: [HIV], obligations: [NORDSCLCD]}
      obligation_text:
        NORDSCLCD: Do not redisclose.
        local:NOUSEAGAINSTYOUTH: Not for use against the youth.
    """)

PolicyDirFactory = Callable[..., Path]


@pytest.fixture
def policy_dir(tmp_path: Path) -> PolicyDirFactory:
    """Factory: write policy.csv (and optionally vocabulary/model) into a fresh directory."""
    counter = iter(range(1_000))

    def make(policy: str, *, vocabulary: str = SMALL_VOCABULARY, model: str | None = None,
             valuesets: dict[str, str] | None = None) -> Path:
        d = tmp_path / f"policies{next(counter)}"
        d.mkdir()
        (d / "policy.csv").write_text(textwrap.dedent(policy), encoding="utf-8")
        (d / "vocabulary.yaml").write_text(vocabulary, encoding="utf-8")
        model_text = model if model is not None else (REPO_POLICY_DIR / "model.conf").read_text(encoding="utf-8")
        (d / "model.conf").write_text(model_text, encoding="utf-8")
        if valuesets:
            (d / "valuesets").mkdir()
            for name, text in valuesets.items():
                (d / "valuesets" / name).write_text(text, encoding="utf-8")
        return d

    return make


@pytest.fixture
def small_vocabulary() -> str:
    """The fixture glossary's YAML text."""
    return SMALL_VOCABULARY


@pytest.fixture
def repo_policy_dir() -> Path:
    """The policies/ directory as shipped."""
    return REPO_POLICY_DIR
