"""``broker policy lint``: check the policy files before they are deployed; exit 1 on any error."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from broker.policy.lint import format_report, lint

POLICY_DIR_ENV = "BROKER_POLICY_DIR"
OVERRIDE_ENV = "BROKER_POLICY_OVERRIDE_FILE"


def default_policy_dir() -> Path:
    """The directory the broker itself would load: BROKER_POLICY_DIR, else the repository's policies/."""
    configured = os.environ.get(POLICY_DIR_ENV)
    if configured:
        return Path(configured)
    from broker.settings import REPO_POLICY_DIR

    return REPO_POLICY_DIR


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lint`` on a subparsers object (the caller wires it under ``broker policy``)."""
    parser = subparsers.add_parser(
        "lint", help="check the policy files and report every problem (exit 1 on any error)",
        description="Check policy.csv, vocabulary.yaml and valuesets/*.yaml, and optionally a county file, "
                    "and report every error and warning with the file and line to edit.")
    parser.add_argument("--dir", dest="policy_dir", type=Path, default=None, metavar="DIR",
                        help=f"the policy directory (default: ${POLICY_DIR_ENV}, else the repository's policies/)")
    parser.add_argument("--override", type=Path, default=None, metavar="FILE",
                        help="a county file in policy.csv format whose rules are added to the baseline "
                             f"(default: ${OVERRIDE_ENV} when set, as the broker would load it)")
    parser.set_defaults(func=run)
    return parser


def run(argv_namespace: argparse.Namespace) -> int:
    """Print the report; 1 if any error was found, 0 otherwise (warnings alone do not fail)."""
    policy_dir = getattr(argv_namespace, "policy_dir", None) or default_policy_dir()
    override = getattr(argv_namespace, "override", None) or os.environ.get(OVERRIDE_ENV) or None
    report = lint(Path(policy_dir), override=Path(override) if override else None)
    print(format_report(report))
    return 1 if report.errors else 0
