"""The glossary loads into typed values, and a defective one names its file and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.policy import PolicyError
from broker.vocabulary import CategoryLabelSpec, Purpose, Vocabulary


def test_repo_vocabulary_loads_with_labels_for_every_category(repo_policy_dir: Path) -> None:
    """The shipped glossary is valid and every category carries labels (the labeller relies on it)."""
    vocab = Vocabulary.load(repo_policy_dir)
    assert "probation-officer" in vocab.roles
    assert "registry-admin" in vocab.admin_roles
    assert vocab.purposes["COC"] == Purpose("COC", "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                            "coordination of care")
    assert set(vocab.grounds) >= {"mdt-member", "own-statute"}
    assert set(vocab.labels.categories) == set(vocab.categories)
    assert vocab.labels.categories["sud-part2"] == CategoryLabelSpec(
        "V", ("SUD",), ("NORDSCLCD", "local:PART2NOTICE", "local:NOUSEAGAINSTYOUTH"))
    assert vocab.labels.local_system == "https://mdt-broker.example.org/CodeSystem/security"
    for spec in vocab.labels.categories.values():
        assert all(code in vocab.labels.obligation_text for code in spec.obligations)


def test_repo_consent_grounds(repo_policy_dir: Path) -> None:
    """Each category's consent yields its own ground; nothing ever yields one for psychotherapy notes."""
    vocab = Vocabulary.load(repo_policy_dir)
    assert {"consent-part2", "consent-hiv", "consent-cmia", "consent-education", "consent-release",
            "court-order", "break-glass"} <= set(vocab.grounds)
    specific = {"sud-part2": "consent-part2", "hiv": "consent-hiv", "general-health": "consent-cmia",
                "mental-health": "consent-cmia", "reproductive-health": "consent-cmia", "sti": "consent-cmia",
                "education": "consent-education"}
    expected = {c: specific.get(c, "consent-release") for c in vocab.categories if c != "psychotherapy-notes"}
    assert vocab.consent_grounds == expected
    assert "psychotherapy-notes" in vocab.categories and "psychotherapy-notes" not in vocab.consent_grounds


def test_small_vocabulary_consent_grounds(tmp_path: Path, small_vocabulary: str) -> None:
    """consent_grounds loads as a plain category → ground dict; an empty mapping is valid (no consent counts)."""
    vocab = Vocabulary.load(_write(tmp_path, small_vocabulary))
    assert vocab.consent_grounds == {"general-health": "consent-cmia", "mental-health": "consent-cmia",
                                     "hiv": "consent-hiv"}
    empty = small_vocabulary.replace(
        "consent_grounds:\n  general-health: consent-cmia\n  mental-health: consent-cmia\n  hiv: consent-hiv\n",
        "consent_grounds: {}\n")
    assert empty != small_vocabulary
    assert Vocabulary.load(_write(tmp_path, empty)).consent_grounds == {}


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "vocabulary.yaml").write_text(text, encoding="utf-8")
    return tmp_path


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


BROKEN = [
    ("duplicate-role", lambda t: t.replace("  casa: Court", "  casa: Court\n  casa: Again"), "  casa: Again",
     "duplicate key 'casa'"),
    ("labels-unknown-category", lambda t: t.replace(
        "    hiv: {confidentiality: V",
        "    hiv-test: {confidentiality: V, sensitivity: [], obligations: []}\n    hiv: {confidentiality: V"),
     "hiv-test:", "unknown category"),
    ("bad-confidentiality", lambda t: t.replace("hiv: {confidentiality: V", "hiv: {confidentiality: X"),
     "hiv: {confidentiality: X", "confidentiality 'X'"),
    ("obligation-without-text", lambda t: t.replace("sensitivity: [HIV], obligations: [NORDSCLCD]}",
                                                    "sensitivity: [HIV], obligations: [NORDSCLCD, local:NEW]}"),
     "hiv: {confidentiality", "no obligation_text"),
    ("reserved-ground", lambda t: t.replace("  own-statute: Own", "  none: Nothing\n  own-statute: Own"),
     "  none: Nothing", "not a valid name"),
    ("lower-case-purpose", lambda t: t.replace("  COC: {", "  coc: {"), "  coc: {", "purpose code"),
    ("admin-is-team-role", lambda t: t.replace("  registry-admin: County IT", "  casa: County IT"),
     "  casa: County IT", "also a team role"),
    ("unknown-section", lambda t: t + "catagories:\n  x: y\n", "catagories:", "unknown section"),
    ("yaml-syntax", lambda t: t.replace("  casa: Court appointed special advocate", "  casa: [unclosed"),
     None, "invalid YAML"),
    ("description-not-string", lambda t: t.replace("  hiv: HIV", "  hiv: 12"), "  hiv: 12", "non-empty string"),
    ("consent-psychotherapy-notes", lambda t: t.replace("  hiv: consent-hiv\n",
                                                        "  hiv: consent-hiv\n  psychotherapy-notes: consent-cmia\n"),
     "  psychotherapy-notes: consent-cmia", "no consent ever covers it"),
    ("consent-unknown-category",
     lambda t: t.replace("  hiv: consent-hiv\n", "  hiv: consent-hiv\n  sud: consent-hiv\n"),
     "  sud: consent-hiv", "unknown category 'sud'"),
    ("consent-unknown-ground", lambda t: t.replace("  hiv: consent-hiv\n", "  hiv: consent-part2\n"),
     "  hiv: consent-part2", "unknown ground 'consent-part2'"),
    ("consent-not-a-consent-ground", lambda t: t.replace("  hiv: consent-hiv\n", "  hiv: mdt-member\n"),
     "  hiv: mdt-member", "not a consent ground"),
    ("consent-duplicate-category",
     lambda t: t.replace("  hiv: consent-hiv\n", "  hiv: consent-hiv\n  hiv: consent-cmia\n"),
     "  hiv: consent-cmia", "duplicate key 'hiv'"),
    ("consent-ground-not-string", lambda t: t.replace("  hiv: consent-hiv\n", "  hiv: [consent-hiv]\n"),
     "  hiv: [consent-hiv]", "non-empty string"),
    ("consent-grounds-not-mapping", lambda t: t.replace(
        "consent_grounds:\n  general-health: consent-cmia\n  mental-health: consent-cmia\n  hiv: consent-hiv\n",
        "consent_grounds:\n  - hiv\n"), "  - hiv", "must be a mapping"),
]


@pytest.mark.parametrize(("mutate", "needle", "fragment"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_vocabulary_names_file_and_line(tmp_path: Path, small_vocabulary: str, mutate, needle,
                                              fragment: str) -> None:
    """Each defect is a PolicyError on vocabulary.yaml at the offending line."""
    text = mutate(small_vocabulary)
    assert text != small_vocabulary
    d = _write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        Vocabulary.load(d)
    err = info.value
    assert err.file == str(d / "vocabulary.yaml")
    assert fragment in err.message
    assert err.line is not None
    if needle is not None:
        assert err.line == _line_of(text, needle)


def test_missing_labels_for_a_category(tmp_path: Path, small_vocabulary: str) -> None:
    """A category the labeller cannot label is refused (it would otherwise get no obligations)."""
    text = small_vocabulary.replace("  hiv: HIV\n", "  hiv: HIV\n  sti: STI\n")
    with pytest.raises(PolicyError, match="category 'sti' has no labels"):
        Vocabulary.load(_write(tmp_path, text))


def test_missing_section(tmp_path: Path, small_vocabulary: str) -> None:
    """Every section is required, so code that reads it never meets a KeyError."""
    text = small_vocabulary.replace("admin_roles:\n  registry-admin: County IT\n", "")
    with pytest.raises(PolicyError, match="missing section 'admin_roles'"):
        Vocabulary.load(_write(tmp_path, text))


def test_missing_consent_grounds_section(tmp_path: Path, small_vocabulary: str) -> None:
    """consent_grounds is required: a county policy must say which consent unlocks what."""
    text = small_vocabulary.replace(
        "consent_grounds:\n  general-health: consent-cmia\n  mental-health: consent-cmia\n  hiv: consent-hiv\n", "")
    assert text != small_vocabulary
    with pytest.raises(PolicyError, match="missing section 'consent_grounds'"):
        Vocabulary.load(_write(tmp_path, text))


@pytest.mark.parametrize("first", ["broker.vocabulary", "broker.policy", "broker.policy.engine",
                                   "broker.policy.errors"])
def test_no_import_cycle(first: str) -> None:
    """vocabulary imports policy.errors and the engine imports vocabulary: any order must work."""
    code = f"import {first}; from broker.policy import CasbinPolicyEngine, PolicyError; import broker.vocabulary"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
