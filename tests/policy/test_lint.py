"""`broker policy lint` reports every defect, at the file and line counsel must edit.

Each defect case copies the shipped policies/ into tmp_path and breaks exactly one thing, so
the finding's code, file and line are known; line numbers of the shipped files are looked up,
never hard-coded, so the tests survive counsel editing the default policy.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import yaml

from broker.policy import CasbinPolicyEngine, PolicyError
from broker.policy import lint as L
from broker.policy.cli_lint import add_parser, run
from broker.policy.lint import Finding, LintReport, SourceFile, format_report, lint, lint_sources

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
WRONG_EDIT = 'p, law-enforcement, youth-statement, CHILDPROT, mdt-member, allow, "made up"'


def copy_policies(tmp_path: Path, name: str = "policies") -> Path:
    """A private copy of the shipped policy directory (without its test tables)."""
    d = tmp_path / name
    shutil.copytree(REPO_POLICY_DIR, d, ignore=shutil.ignore_patterns("tests", "__pycache__"))
    return d


def append(path: Path, *lines: str) -> list[int]:
    """Append lines to a file; return their 1-based line numbers."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    start = len(text.splitlines()) + 1
    path.write_text(text + "".join(f"{line}\n" for line in lines), encoding="utf-8")
    return list(range(start, start + len(lines)))


def line_of(path: Path, pattern: str) -> int:
    """The 1-based line of the only line matching ``pattern`` (a regex)."""
    hits = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if re.search(pattern, line)]
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def where(findings: list[Finding]) -> list[tuple[str, str, int | None]]:
    """(code, file, line) of each finding, the part every case pins exactly."""
    return [(f.code, f.file, f.line) for f in findings]


@pytest.fixture(autouse=True)
def _no_policy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI falls back to BROKER_POLICY_* variables; a developer's shell must not change results."""
    monkeypatch.delenv("BROKER_POLICY_DIR", raising=False)
    monkeypatch.delenv("BROKER_POLICY_OVERRIDE_FILE", raising=False)


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    """A fresh copy of policies/ per test."""
    return copy_policies(tmp_path)


# --- the shipped policy --------------------------------------------------------------------------

def test_default_policy_has_no_errors_or_warnings() -> None:
    """The policy counsel ships must lint clean, or every deploy would start by ignoring the linter."""
    report = lint(REPO_POLICY_DIR)
    assert report.errors == []
    assert report.warnings == []
    assert report.ok


def test_the_wrong_edit_is_caught_as_dead_naming_the_deny_and_its_citation(pdir: Path) -> None:
    """The classic mistake - an allow under an N cell - is an error pointing at the deny that overrides it."""
    csv_path = pdir / "policy.csv"
    deny_line = line_of(csv_path, r"^p, law-enforcement, +youth-statement, +\*, +\*, +deny")
    (line,) = append(csv_path, WRONG_EDIT)
    report = lint(pdir)
    assert where(report.errors) == [(L.DEAD_ALLOW, "policy.csv", line)]
    message = report.errors[0].message
    assert f"the deny rule on line {deny_line} " in message
    assert "(W&IC 18961.7; 42 CFR 2.12(d); In re Wayne H. (1979) 24 Cal.3d 595)" in message
    assert message.startswith("this allow rule can never take effect")
    assert (L.CITATION_FORMAT, "policy.csv", line) in where(report.warnings)
    assert f"policy.csv:{line}: ERROR dead-allow: this allow rule can never take effect" in format_report(report)


# --- one defect per error class ------------------------------------------------------------------

# (id, appended policy.csv line, the one error code expected at that line)
BAD_POLICY_LINES = [
    ("csv-quoting", 'p, casa, hiv, TREAT, own-statute, allow, "H&S "120985""', L.SYNTAX),
    ("field-count", "p, casa, hiv, TREAT, own-statute, allow, H&S 120985, 120980", L.SYNTAX),
    ("rule-type", 'p2, casa, hiv, TREAT, own-statute, allow, "H&S 120985"', L.SYNTAX),
    ("g-field-count", "g, casa", L.SYNTAX),
    ("unknown-role", 'p, social-worker, mental-health, COC, mdt-member, allow, "W&IC 5328.04"', L.UNKNOWN_ROLE),
    ("unknown-category", 'p, casa, mental-heath, COC, mdt-member, allow, "W&IC 5328.04"', L.UNKNOWN_CATEGORY),
    ("unknown-purpose", 'p, casa, mental-health, TREATMENT, mdt-member, allow, "W&IC 5328.04"', L.UNKNOWN_PURPOSE),
    ("unknown-ground", 'p, casa, mental-health, COC, consent-mh, allow, "Civ. Code 56.11"', L.UNKNOWN_GROUND),
    ("g-unknown-member", "g, social-worker, line-staff", L.UNKNOWN_ROLE),
    ("g2-unknown-member", "g2, mental-heath, health", L.UNKNOWN_CATEGORY),
    ("missing-citation", 'p, casa, hiv, TREAT, own-statute, allow, ""', L.MISSING_CITATION),
    ("blank-citation", 'p, casa, hiv, TREAT, own-statute, allow, "   "', L.MISSING_CITATION),
    ("bad-effect", 'p, casa, hiv, TREAT, own-statute, permit, "H&S 120985"', L.BAD_EFFECT),
    ("consent-ground-mismatch", 'p, casa, hiv, TREAT, consent-cmia, allow, "Civ. Code 56.11"',
     L.CONSENT_GROUND_MISMATCH),
    ("consent-ground-on-deny", 'p, casa, hiv, *, consent-cmia, deny, "H&S 120980"', L.CONSENT_GROUND_MISMATCH),
    ("admin-role", 'p, registry-admin, hiv, *, *, deny, "H&S 120975"', L.ADMIN_ROLE),
    ("admin-in-group", "g, registry-admin, line-staff", L.ADMIN_ROLE),
    ("allow-wildcard-ground", 'p, casa, hiv, TREAT, *, allow, "H&S 120985"', L.ALLOW_WILDCARD_GROUND),
    ("group-reserved-name", "g, casa, *", L.BAD_GROUP),
    ("group-of-itself", "g, casa, casa", L.BAD_GROUP),
]


@pytest.mark.parametrize(("bad", "code"), [b[1:] for b in BAD_POLICY_LINES], ids=[b[0] for b in BAD_POLICY_LINES])
def test_each_bad_policy_line_is_one_error_at_its_line(pdir: Path, bad: str, code: str) -> None:
    """Each defect class has its own stable code, reported once, at the defective line of policy.csv."""
    (line,) = append(pdir / "policy.csv", bad)
    report = lint(pdir)
    assert where(report.errors) == [(code, "policy.csv", line)]


# Defects the loader accepts but lint (stricter) reports: excluded from the parity check below.
LINT_ONLY = {"consent-ground-on-deny"}
LOADER_REFUSES = [b for b in BAD_POLICY_LINES if b[0] not in LINT_ONLY]


@pytest.mark.parametrize(("bad", "code"), [b[1:] for b in LOADER_REFUSES], ids=[b[0] for b in LOADER_REFUSES])
def test_lint_errors_wherever_the_loader_refuses(pdir: Path, bad: str, code: str) -> None:
    """A policy that lints clean must load, so lint covers every defect the loader refuses."""
    append(pdir / "policy.csv", bad)
    assert lint(pdir).errors
    with pytest.raises(PolicyError):
        CasbinPolicyEngine.load(pdir)


def test_unknown_term_names_the_vocabulary_file_and_a_likely_fix(pdir: Path) -> None:
    """Counsel is told which glossary section to edit, and the probable typo."""
    append(pdir / "policy.csv", 'p, casa, mental-heath, COC, mdt-member, allow, "W&IC 5328.04"')
    (finding,) = lint(pdir).errors
    assert "define it under categories in vocabulary.yaml" in finding.message
    assert "Did you mean 'mental-health'?" in finding.message


def test_consent_ground_on_a_category_no_consent_covers(pdir: Path) -> None:
    """A consent can never unlock psychotherapy notes: the rule is wrong twice (wrong ground, and denied anyway)."""
    (line,) = append(pdir / "policy.csv",
                     'p, casa, psychotherapy-notes, COC, consent-release, allow, "Evid. Code 912"')
    report = lint(pdir)
    assert where(report.errors) == [(L.CONSENT_GROUND_MISMATCH, "policy.csv", line),
                                    (L.DEAD_ALLOW, "policy.csv", line)]
    assert "no consent ever covers psychotherapy-notes" in report.errors[0].message


def test_duplicate_names_both_lines(pdir: Path) -> None:
    """A repeated rule (even with another citation) names the first line so counsel can pick one."""
    csv_path = pdir / "policy.csv"
    first = line_of(csv_path, r"^p, mental-health-clinician, +hiv, +TREAT, +own-statute, +allow")
    (line,) = append(csv_path, 'p, mental-health-clinician, hiv, TREAT, own-statute, allow, "H&S 120985(a)(1)"')
    report = lint(pdir)
    assert where(report.errors) == [(L.DUPLICATE_RULE, "policy.csv", line)]
    assert f"repeats the rule on line {first} " in report.errors[0].message
    assert "citations differ" in report.errors[0].message


def test_dead_allow_through_a_role_group(pdir: Path) -> None:
    """A deny on a role group shadows an allow for one of its members (g lines count)."""
    csv_path = pdir / "policy.csv"
    allow = line_of(csv_path, r"^p, district-attorney, +hiv, +HLEGAL, +consent-hiv, +allow")
    _g, deny = append(csv_path, "g, district-attorney, prosecution", 'p, prosecution, hiv, *, *, deny, "H&S 120975"')
    report = lint(pdir)
    assert where(report.errors) == [(L.DEAD_ALLOW, "policy.csv", allow)]
    assert f"the deny rule on line {deny} (H&S 120975)" in report.errors[0].message


def test_dead_allow_through_a_category_group(pdir: Path) -> None:
    """A deny on a category group shadows an allow for one of its member categories (g2 lines count)."""
    csv_path = pdir / "policy.csv"
    allow = line_of(csv_path, r"^p, dependency-attorney, +hiv, +HLEGAL, +consent-hiv, +allow")
    append(csv_path, "g2, hiv, sensitive", 'p, dependency-attorney, sensitive, *, *, deny, "H&S 120975"')
    assert where(lint(pdir).errors) == [(L.DEAD_ALLOW, "policy.csv", allow)]


def test_allow_for_a_group_only_partly_denied_is_not_dead(pdir: Path) -> None:
    """An allow on a group still releases to the members no deny covers, so it is live."""
    append(pdir / "policy.csv", "g, casa, advocates", "g, caregiver, advocates",
           'p, advocates, youth-statement, COC, mdt-member, allow, "W&IC 18961.7(b)"')
    assert lint(pdir).errors == []


def test_category_no_rule_mentions_is_an_error_at_its_definition(pdir: Path) -> None:
    """Deleting a category's only rule leaves it silently denied: flagged where vocabulary.yaml defines it."""
    csv_path = pdir / "policy.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    deny = line_of(csv_path, r"^p, \*, +psychotherapy-notes, ")
    csv_path.write_text("".join(lines[:deny - 1] + ["# removed\n"] + lines[deny:]), encoding="utf-8")
    report = lint(pdir)
    defined = line_of(pdir / "vocabulary.yaml", r"^  psychotherapy-notes:")
    assert where(report.errors) == [(L.UNUSED_CATEGORY, "vocabulary.yaml", defined)]
    assert "valuesets/psychotherapy-notes.yaml" in report.errors[0].message


def test_bad_vocabulary_yaml_is_a_syntax_error_at_its_line(pdir: Path) -> None:
    """Broken YAML in the glossary is reported at its line, and the rest of the checks still run."""
    vocab = pdir / "vocabulary.yaml"
    casa = line_of(vocab, r"^  casa:")
    text = vocab.read_text(encoding="utf-8").splitlines(keepends=True)
    text[casa - 1] = "  casa: [unclosed\n"
    vocab.write_text("".join(text), encoding="utf-8")
    (line,) = append(pdir / "policy.csv", 'p, casa, hiv, TREAT, own-statute, permit, "H&S 120985"')
    report = lint(pdir)
    assert (L.SYNTAX, "vocabulary.yaml") in [(c, f) for c, f, _l in where(report.errors)]
    assert (L.BAD_EFFECT, "policy.csv", line) in where(report.errors)
    assert [f.line for f in report.errors if f.file == "vocabulary.yaml"][0] in (casa, casa + 1)


def test_vocabulary_defect_is_reported_at_its_line(pdir: Path) -> None:
    """A glossary the loader would refuse (a role defined twice) is an error at the repeated line."""
    vocab = pdir / "vocabulary.yaml"
    casa = line_of(vocab, r"^  casa:")
    text = vocab.read_text(encoding="utf-8").splitlines(keepends=True)
    text.insert(casa, "  casa: defined twice\n")
    vocab.write_text("".join(text), encoding="utf-8")
    assert where(lint(pdir).errors) == [(L.BAD_VOCABULARY, "vocabulary.yaml", casa + 1)]


def test_missing_vocabulary_is_reported_without_a_line(pdir: Path) -> None:
    """A missing glossary names the file; the rules are still checked for what needs no glossary."""
    (pdir / "vocabulary.yaml").unlink()
    (line,) = append(pdir / "policy.csv", 'p, casa, hiv, TREAT, own-statute, allow, ""')
    assert where(lint(pdir).errors) == [(L.MISSING_CITATION, "policy.csv", line),
                                        (L.UNREADABLE_FILE, "vocabulary.yaml", None)]


def test_value_set_with_unknown_category(pdir: Path) -> None:
    """A value set sorting records into a category the glossary lacks is an error at its category line."""
    path = pdir / "valuesets" / "hiv.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("category: hiv", "category: hiv-aids", 1),
                    encoding="utf-8")
    report = lint(pdir)
    assert where(report.errors) == [(L.UNKNOWN_CATEGORY, "valuesets/hiv.yaml", line_of(path, "^category:"))]
    assert "vocabulary.yaml" in report.errors[0].message


def test_value_set_with_bad_yaml(pdir: Path) -> None:
    """Broken YAML in a value set is a syntax error in that file."""
    path = pdir / "valuesets" / "sti.yaml"
    line = line_of(path, "^category: sti$")
    path.write_text(path.read_text(encoding="utf-8").replace("category: sti\n", "category: sti: std\n", 1),
                    encoding="utf-8")
    assert where(lint(pdir).errors) == [(L.SYNTAX, "valuesets/sti.yaml", line)]


def test_every_finding_is_reported_not_just_the_first(pdir: Path) -> None:
    """Counsel fixes everything in one pass: three defects, three errors, in line order."""
    lines = append(pdir / "policy.csv",
                   'p, casa, hiv, TREAT, own-statute, permit, "H&S 120985"',
                   'p, social-worker, hiv, TREAT, own-statute, allow, "H&S 120985"',
                   'p, casa, hiv, TREAT, own-statute, allow, ""')
    assert where(lint(pdir).errors) == [(L.BAD_EFFECT, "policy.csv", lines[0]),
                                        (L.UNKNOWN_ROLE, "policy.csv", lines[1]),
                                        (L.MISSING_CITATION, "policy.csv", lines[2])]


# --- warnings ------------------------------------------------------------------------------------

def test_wildcard_role_on_protected_category_warns(pdir: Path) -> None:
    """'Every role' on protected data also reaches roles added later; counsel must name them."""
    (line,) = append(pdir / "policy.csv", 'p, *, hiv, TREAT, own-statute, allow, "H&S 120985(a)"')
    report = lint(pdir)
    assert report.errors == []
    assert (L.WILDCARD_ROLE_PROTECTED, "policy.csv", line) in where(report.warnings)


def test_wildcard_role_on_unprotected_category_does_not_warn_as_protected(pdir: Path) -> None:
    """The protected-category warning is kept for protected data, or counsel learns to ignore it."""
    append(pdir / "policy.csv", 'p, *, probation, PUBHLTH, mdt-member, allow, "W&IC 827"')
    report = lint(pdir)
    assert report.errors == []
    assert L.WILDCARD_ROLE_PROTECTED not in [f.code for f in report.warnings]


def test_prosecution_health_allow_without_dagger_warns(pdir: Path) -> None:
    """Health data to law enforcement for anything but HLEGAL needs counsel's dagger note."""
    (line,) = append(pdir / "policy.csv",
                     'p, law-enforcement, mental-health, COC, court-order, allow, "Civ. Code 56.10(b)(1)"')
    report = lint(pdir)
    assert report.errors == []
    assert where(report.warnings) == [(L.DAGGER_MISSING, "policy.csv", line)]


def test_dagger_note_above_the_rule_silences_the_warning(pdir: Path) -> None:
    """A † comment directly above the rule records counsel's decision, so the warning is answered."""
    append(pdir / "policy.csv", "",
           "# † Counsel: an order under Civ. Code 56.10(b)(1) in the case against the exploiter only.",
           'p, law-enforcement, mental-health, COC, court-order, allow, "Civ. Code 56.10(b)(1)"')
    report = lint(pdir)
    assert report.errors == []
    assert report.warnings == []


def test_citation_without_a_section_number_warns(pdir: Path) -> None:
    """'per counsel' is not a citation; a warning asks for the code and section."""
    (line,) = append(pdir / "policy.csv", 'p, casa, hiv, TREAT, own-statute, allow, "per counsel"')
    report = lint(pdir)
    assert report.errors == []
    assert where(report.warnings) == [(L.CITATION_FORMAT, "policy.csv", line)]


# --- county override -----------------------------------------------------------------------------

def test_override_findings_name_the_override_file_and_its_lines(pdir: Path) -> None:
    """A county file's defect points into the county file; a baseline deny it hits is named with its file."""
    deny = line_of(pdir / "policy.csv", r"^p, caregiver, +youth-statement, +\*, +\*, +deny")
    county = pdir / "county.csv"
    county.write_text("# Alameda additions\n"
                      'p, caregiver, youth-statement, COC, mdt-member, allow, "W&IC 18961.7(b)"\n'
                      'p, casa, hiv, TREAT, own-statute, permit, "H&S 120985"\n', encoding="utf-8")
    report = lint(pdir, override=county)
    assert where(report.errors) == [(L.DEAD_ALLOW, "county.csv", 2), (L.BAD_EFFECT, "county.csv", 3)]
    assert f"the deny rule on line {deny} of policy.csv " in report.errors[0].message


def test_override_outside_the_policy_dir_is_named_as_given(pdir: Path, tmp_path: Path) -> None:
    """A county file kept elsewhere is named by its path, not confused with the baseline policy.csv."""
    county = tmp_path / "county" / "policy.csv"
    county.parent.mkdir()
    county.write_text('p, casa, hiv, TREAT, own-statute, allow, ""\n', encoding="utf-8")
    assert where(lint(pdir, override=county).errors) == [(L.MISSING_CITATION, str(county), 1)]


def test_override_rules_count_for_the_merged_policy(pdir: Path) -> None:
    """A category the baseline leaves out but the county covers is not unused; a repeat across files is named."""
    csv_path = pdir / "policy.csv"
    deny = line_of(csv_path, r"^p, \*, +psychotherapy-notes, ")
    lines = csv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    csv_path.write_text("".join(lines[:deny - 1] + ["#\n"] + lines[deny:]), encoding="utf-8")
    first = line_of(csv_path, r"^p, mental-health-clinician, +hiv, +TREAT, +own-statute")
    county = pdir / "county.csv"
    county.write_text('p, *, psychotherapy-notes, *, *, deny, "45 CFR 164.508(a)(2)"\n'
                      'p, mental-health-clinician, hiv, TREAT, own-statute, allow, "H&S 120985(a)"\n',
                      encoding="utf-8")
    report = lint(pdir, override=county)
    assert where(report.errors) == [(L.DUPLICATE_RULE, "county.csv", 2)]
    assert f"line {first} of policy.csv" in report.errors[0].message


def test_missing_override_is_an_error(pdir: Path) -> None:
    """Naming a county file that is not there must not lint clean."""
    assert where(lint(pdir, override=pdir / "nope.csv").errors) == [(L.UNREADABLE_FILE, "nope.csv", None)]


def test_lint_sources_is_pure_over_file_contents() -> None:
    """The reload/override code can lint any merge of texts without touching the disk."""
    vocab = (REPO_POLICY_DIR / "vocabulary.yaml").read_text(encoding="utf-8")
    base = (REPO_POLICY_DIR / "policy.csv").read_text(encoding="utf-8")
    report = lint_sources(vocabulary=SourceFile("vocabulary.yaml", vocab),
                          policies=[SourceFile("policy.csv", base), SourceFile("layer-2", WRONG_EDIT + "\n")])
    assert where(report.errors) == [(L.DEAD_ALLOW, "layer-2", 1)]


# --- report and CLI ------------------------------------------------------------------------------

def test_format_report_lines_and_summary() -> None:
    """One 'file:line: LEVEL code: message' line per finding, errors first, then a count."""
    report = LintReport(errors=[Finding("policy.csv", 3, "bad-effect", "m1"), Finding("vocabulary.yaml", None,
                                                                                      "unreadable-file", "m2")],
                        warnings=[Finding("policy.csv", 9, "citation-format", "m3")])
    assert format_report(report).splitlines() == [
        "policy.csv:3: ERROR bad-effect: m1",
        "vocabulary.yaml: ERROR unreadable-file: m2",
        "policy.csv:9: WARNING citation-format: m3",
        "2 errors, 1 warning: fix the errors before deploying this policy",
    ]
    assert format_report(LintReport(errors=[], warnings=[])) == "no errors, no warnings"


def _cli(argv: list[str]) -> argparse.Namespace:
    """Parse argv through a parser built with add_parser, as `broker policy` will."""
    parser = argparse.ArgumentParser(prog="broker policy")
    add_parser(parser.add_subparsers(dest="policy_command", required=True))
    return parser.parse_args(argv)


def test_cli_exit_0_on_clean_policy(pdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A clean policy exits 0 so deploy scripts can gate on it."""
    args = _cli(["lint", "--dir", str(pdir)])
    assert args.func is run
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == "no errors, no warnings"


def test_cli_exit_1_on_error(pdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Any error exits 1 and the report names the file and line."""
    (line,) = append(pdir / "policy.csv", WRONG_EDIT)
    assert run(_cli(["lint", "--dir", str(pdir)])) == 1
    out = capsys.readouterr().out
    assert f"policy.csv:{line}: ERROR dead-allow:" in out
    assert f"policy.csv:{line}: WARNING citation-format:" in out


def test_cli_warnings_alone_exit_0_and_are_printed(pdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Warnings inform counsel without blocking a deploy."""
    (line,) = append(pdir / "policy.csv", 'p, casa, hiv, TREAT, own-statute, allow, "per counsel"')
    assert run(_cli(["lint", "--dir", str(pdir)])) == 0
    assert f"policy.csv:{line}: WARNING citation-format:" in capsys.readouterr().out


def test_cli_override_flag(pdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--override lints the county file on top of the baseline."""
    county = pdir / "county.csv"
    county.write_text(WRONG_EDIT + "\n", encoding="utf-8")
    assert run(_cli(["lint", "--dir", str(pdir), "--override", str(county)])) == 1
    assert "county.csv:1: ERROR dead-allow:" in capsys.readouterr().out


def test_cli_override_defaults_to_broker_policy_override_file(pdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Without --override the linter checks the county file the broker would load."""
    county = pdir / "county.csv"
    county.write_text(WRONG_EDIT + "\n", encoding="utf-8")
    monkeypatch.setenv("BROKER_POLICY_OVERRIDE_FILE", str(county))
    assert run(_cli(["lint", "--dir", str(pdir)])) == 1
    assert "county.csv:1: ERROR dead-allow:" in capsys.readouterr().out


def test_cli_defaults_to_broker_policy_dir(pdir: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Without --dir the linter checks the directory the broker would load (BROKER_POLICY_DIR)."""
    append(pdir / "policy.csv", WRONG_EDIT)
    monkeypatch.setenv("BROKER_POLICY_DIR", str(pdir))
    assert run(_cli(["lint"])) == 1
    monkeypatch.delenv("BROKER_POLICY_DIR")
    assert run(_cli(["lint"])) == 0
    capsys.readouterr()


# --- the counsel README --------------------------------------------------------------------------

def test_readme_glossary_lists_every_vocabulary_term() -> None:
    """policies/README.md lists every role, category, purpose and ground, so it cannot drift from the glossary."""
    readme = (REPO_POLICY_DIR / "README.md").read_text(encoding="utf-8")
    vocab = yaml.safe_load((REPO_POLICY_DIR / "vocabulary.yaml").read_text(encoding="utf-8"))
    listed = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    for section in ("roles", "categories", "purposes", "grounds"):
        missing = set(vocab[section]) - listed
        assert not missing, f"policies/README.md does not list {section}: {sorted(missing)}"


# --- county removals (broker/policy/layers.py) ---------------------------------------------------

def test_county_removal_takes_a_baseline_deny_out_of_the_merge(pdir: Path) -> None:
    """A county that removes a baseline deny and adds an allow gets no false dead-rule error."""
    county = pdir / "county.csv"
    county.write_text("# remove: caregiver, youth-statement, *, *, deny\n"
                      'p, caregiver, youth-statement, COC, mdt-member, allow, "W&IC 18961.7(b)"\n', encoding="utf-8")
    assert lint(pdir, override=county).errors == []
    county.write_text('p, caregiver, youth-statement, COC, mdt-member, allow, "W&IC 18961.7(b)"\n', encoding="utf-8")
    assert where(lint(pdir, override=county).errors) == [(L.DEAD_ALLOW, "county.csv", 1)]


def test_county_removal_that_matches_nothing_is_an_error(pdir: Path) -> None:
    """A misspelt removal would silently leave the rule in force, so it is an error at its line."""
    county = pdir / "county.csv"
    county.write_text("# county rules\n# remove: caregiver, youth-statment, *, *, deny\n", encoding="utf-8")
    report = lint(pdir, override=county)
    assert where(report.errors) == [(L.BAD_REMOVAL, "county.csv", 2)]
    assert "removes nothing" in report.errors[0].message
