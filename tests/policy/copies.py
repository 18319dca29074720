"""Editable copies of the shipped policies/ for reload and impact tests (the repo copy is never touched)."""

from __future__ import annotations

import shutil
from pathlib import Path

from broker.settings import REPO_POLICY_DIR

# A lint-clean edit the spotlight cases accept: the clinician loses general health for treatment.
MH_TREAT_ALLOW = "p, mental-health-clinician,  general-health,       TREAT,     mdt-member,  allow, " \
                 '"Civ. Code 56.10(c)(1); 45 CFR 164.506(c)"'
# A lint-clean edit that breaks a spotlight case (the social worker's mental-health COC allow).
CW_MH_COC_ALLOW = 'p, child-welfare-worker,     mental-health,        COC,       mdt-member,  allow, ' \
                  '"W&IC 5328.04(a); Civ. Code 56.103"'
UNKNOWN_ROLE_LINE = 'p, social-worker, general-health, COC, mdt-member, allow, "W&IC 18961.7"'


def copy_policies(dest: Path, *, spotlight_only: bool = True) -> Path:
    """policies/ copied to ``dest``; by default its cases are the 71 spotlight cases (fast to run)."""
    shutil.copytree(REPO_POLICY_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    if spotlight_only:
        (dest / "tests" / "matrix.yaml").unlink()
    return dest


def remove_line(policy_dir: Path, line: str) -> None:
    """Delete one exact rule line from policy.csv (it must be there once)."""
    path = policy_dir / "policy.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    matches = [i for i, text in enumerate(lines) if text.rstrip("\n") == line]
    assert len(matches) == 1, f"expected the rule once: {line}"
    del lines[matches[0]]
    path.write_text("".join(lines), encoding="utf-8")


def append_line(policy_dir: Path, line: str) -> int:
    """Append a rule line to policy.csv; return its 1-based line number."""
    path = policy_dir / "policy.csv"
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text += "\n"
    text += line + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.splitlines())
