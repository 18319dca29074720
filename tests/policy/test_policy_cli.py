"""``broker policy explain`` and ``broker policy test``: the exit codes and output counsel relies on."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from broker.policy.cli_policy import add_parsers

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
PO_PART2_COC = re.compile(r"^p,\s*probation-officer,\s*sud-part2,\s*COC,\s*consent-part2,\s*allow,.*$", re.M)


def _run(argv: list[str]) -> int:
    """Parse as ``broker policy <argv>`` would and call the handler (it returns the exit code)."""
    parser = argparse.ArgumentParser(prog="broker policy")
    add_parsers(parser.add_subparsers(dest="policy_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_explain_prints_the_rule_and_exits_0(capsys):
    code = _run(["explain", "--role", "probation-officer", "--category", "sud-part2", "--purpose", "COC",
                 "--ground", "mdt-member", "--dir", str(REPO_POLICY_DIR)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("deny: probation-officer / sud-part2 / COC / [mdt-member]")
    assert "a 42 CFR 2.31 consent naming probation-officer (consent-part2)" in out


def test_explain_json_is_the_explanation(capsys):
    code = _run(["explain", "--role", "district-attorney", "--category", "youth-statement", "--purpose", "HLEGAL",
                 "--ground", "court-order", "--ground", "mdt-member", "--json", "--dir", str(REPO_POLICY_DIR)])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["effect"] == "deny" and data["denied_by_rule"] and data["would_allow"] == []
    assert data["grounds_tried"] == ["court-order", "mdt-member"]
    assert data["rule"]["location"].startswith("policy.csv:")


def test_explain_refuses_unknown_terms_with_exit_2(capsys):
    code = _run(["explain", "--role", "probation-officer", "--category", "no-such-category", "--purpose", "COC",
                 "--dir", str(REPO_POLICY_DIR)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown category" in err and "no-such-category" not in err


def test_default_policy_passes_its_cases(capsys):
    code = _run(["test", "--dir", str(REPO_POLICY_DIR)])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "FAIL" not in out
    summary = re.search(r"^(\d+) cases, 0 failures$", out, re.M)
    assert summary and int(summary.group(1)) > 1000


@pytest.fixture
def altered_policy(tmp_path) -> tuple[Path, int]:
    """A copy of policies/ where the PO's Part 2 coordination rule relies on membership, not a consent.

    Only the hand-picked cases are kept, so the run stays quick; they include the tuple this breaks.
    """
    copy = tmp_path / "policies"
    shutil.copytree(REPO_POLICY_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    (copy / "tests" / "matrix.yaml").unlink()
    csv = copy / "policy.csv"
    text = csv.read_text(encoding="utf-8")
    match = PO_PART2_COC.search(text)
    assert match is not None
    line = text.count("\n", 0, match.start()) + 1
    csv.write_text(text.replace(match.group(0), match.group(0).replace("consent-part2", "mdt-member", 1)),
                   encoding="utf-8")
    return copy, line


def test_an_altered_rule_fails_with_the_tuple_and_the_rule(altered_policy, capsys):
    policy_dir, line = altered_policy
    code = _run(["test", "--dir", str(policy_dir)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL probation-officer/sud-part2/COC/[mdt-member,own-statute] (spotlight.yaml)" in out
    assert f"allow by policy.csv:{line} probation-officer, sud-part2, COC, mdt-member, allow " \
           "(42 CFR 2.31; 42 CFR 2.35)" in out
    assert "expected deny with no matching rule" in out
    assert re.search(r"^\d+ cases, [1-9]\d* failures$", out, re.M)


def test_cases_dir_can_be_given_separately(altered_policy, capsys):
    policy_dir, _line = altered_policy
    code = _run(["test", "--dir", str(REPO_POLICY_DIR), "--cases", str(policy_dir / "tests")])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"^\d+ cases, 0 failures$", out, re.M)


def test_a_broken_policy_or_case_table_exits_2(tmp_path, capsys):
    broken = tmp_path / "policies"
    shutil.copytree(REPO_POLICY_DIR, broken, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    (broken / "tests" / "extra.yaml").write_text("cases:\n  - {role: nobody, category: hiv, purpose: COC, "
                                                 "grounds: [], expect: deny}\n", encoding="utf-8")
    assert _run(["test", "--dir", str(broken)]) == 2
    assert "unknown role 'nobody'" in capsys.readouterr().err
    (broken / "policy.csv").write_text("p, nobody, hiv, COC, mdt-member, allow, \"x\"\n", encoding="utf-8")
    assert _run(["test", "--dir", str(broken)]) == 2
    assert "policy.csv:1" in capsys.readouterr().err


def test_explain_locates_a_county_override_rule(tmp_path, capsys):
    county = tmp_path / "county.csv"
    county.write_text('# county\np, casa, hiv, *, *, deny, "H&S 120980"\n', encoding="utf-8")
    code = _run(["explain", "--role", "casa", "--category", "hiv", "--purpose", "COC", "--ground", "consent-hiv",
                 "--dir", str(REPO_POLICY_DIR), "--override", str(county)])
    out = capsys.readouterr().out
    assert code == 0 and "county.csv:2" in out and "no ground lifts this deny rule" in out
