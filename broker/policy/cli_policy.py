"""``broker policy explain`` and ``broker policy test``: counsel's "why?" and "does it still hold?" at a prompt.

Exit codes: 0 success; 1 a case failed (``test``); 2 the policy, the case tables or the request
terms are invalid. Neither command touches a database or a record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from broker.policy.cli_lint import POLICY_DIR_ENV, default_policy_dir
from broker.policy.errors import PolicyError

CASE_DIR_NAME = "tests"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``explain`` and ``test`` on the ``broker policy`` subparsers."""
    dir_help = f"the policy directory (default: ${POLICY_DIR_ENV}, else the repository's policies/)"
    override_help = "a county file in policy.csv format layered on the baseline"

    explain = subparsers.add_parser(
        "explain", help="why a role may or may not see a category, and what would allow it",
        description="Decide one (role, category, purpose, grounds) tuple and explain it: the deciding rule "
                    "with its file, line and citation, and for a deny the grounds that would allow it.")
    explain.add_argument("--role", required=True, help="a role from vocabulary.yaml, e.g. probation-officer")
    explain.add_argument("--category", required=True, help="a data category, e.g. sud-part2")
    explain.add_argument("--purpose", required=True, help="a purpose-of-use code, e.g. COC")
    explain.add_argument("--ground", dest="grounds", action="append", default=[],
                         help="a ground the requester holds (repeat for several), e.g. mdt-member")
    explain.add_argument("--dir", dest="policy_dir", type=Path, default=None, help=dir_help)
    explain.add_argument("--override", type=Path, default=None, help=override_help)
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(func=cmd_explain)

    test = subparsers.add_parser(
        "test", help="run the policy case tables (exit 1 on any failing case)",
        description="Expand and run the YAML case tables against the policy; print each failure with the "
                    "rule that actually decided, then 'N cases, M failures'.")
    test.add_argument("--dir", dest="policy_dir", type=Path, default=None, help=dir_help)
    test.add_argument("--cases", dest="case_dir", type=Path, default=None,
                      help="the directory of *.yaml case tables (default: <dir>/tests)")
    test.add_argument("--override", type=Path, default=None, help=override_help)
    test.set_defaults(func=cmd_test)


def _load_engine(args: argparse.Namespace):
    """The engine for --dir (and --override); PolicyError propagates for the caller to report."""
    from broker.policy.engine import CasbinPolicyEngine

    policy_dir = Path(args.policy_dir or default_policy_dir())
    override = getattr(args, "override", None)
    if override is not None:
        return CasbinPolicyEngine.load(policy_dir, override=override)
    return CasbinPolicyEngine.load(policy_dir)


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the explanation; 0 whatever the verdict, 2 if the policy or a term is invalid."""
    from broker.policy.explain import UnknownTerm, explain, explain_text

    try:
        engine = _load_engine(args)
        result = explain(engine, role=args.role, category=args.category, purpose=args.purpose,
                         grounds=frozenset(args.grounds), vocabulary=engine.vocabulary)
    except PolicyError as err:
        print(f"policy error: {err}", file=sys.stderr)
        return 2
    except UnknownTerm as err:
        print(f"{err} (not defined in vocabulary.yaml)", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else explain_text(result))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """Run every case; print failures with their rule and a summary; 1 on any failure."""
    from broker.policy import cases as case_tables
    from broker.policy.explain import rule_ref

    try:
        engine = _load_engine(args)
        case_dir = Path(args.case_dir or Path(args.policy_dir or default_policy_dir()) / CASE_DIR_NAME)
        if not case_dir.is_dir():
            print(f"case error: no case directory at {case_dir}", file=sys.stderr)
            return 2
        tables = case_tables.load_tables(case_dir, engine.vocabulary)
    except PolicyError as err:
        print(f"policy error: {err}", file=sys.stderr)
        return 2
    except (case_tables.SpecError, KeyError, TypeError) as err:
        print(f"case error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    cases = tables.all
    if not cases:
        print(f"case error: no cases in {case_dir}", file=sys.stderr)
        return 2
    failures = case_tables.run(engine, cases)
    for failure in failures:
        case, decision = failure.case, failure.decision
        rule = rule_ref(engine, decision.rule)
        expected = case.expect + (f" by {case.citation!r}" if case.check_citation and case.citation
                                  else " with no matching rule" if case.check_citation else "")
        decided = (f"{decision.effect} by {rule.location} {rule.fields_text()} ({rule.citation})"
                   if rule else f"{decision.effect} with no matching rule")
        print(f"FAIL {case.id} ({case.source})\n  expected {expected}\n  got      {decided}")
    print(f"{len(cases)} cases, {len(failures)} failures")
    return 1 if failures else 0
