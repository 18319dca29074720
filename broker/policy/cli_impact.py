"""``broker policy impact``: what a candidate policy would change, replayed over the audit log."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``impact`` under the ``broker policy`` sub-commands."""
    parser = subparsers.add_parser("impact", help="replay the audit log against a candidate policy")
    parser.add_argument("--candidate", required=True, type=Path, help="the candidate policy directory")
    parser.add_argument("--override", type=Path, default=None, help="a county override file for the candidate")
    parser.add_argument("--since", type=_date, default=None, help="only events from this UTC day on (YYYY-MM-DD)")
    parser.add_argument("--database-url", default=None, help="default: BROKER_DATABASE_URL via the settings")
    parser.add_argument("--fail-on-flips", action="store_true", help="exit 1 when any decision would flip")
    parser.set_defaults(func=cmd_policy_impact)
    return parser


def cmd_policy_impact(args: argparse.Namespace) -> int:
    """Load the candidate (refusing an invalid one with file:line), replay, print the report."""
    from broker.policy.engine import CasbinPolicyEngine
    from broker.policy.errors import PolicyError
    from broker.policy.impact import format_impact, impact
    from broker.store.db import make_engine, make_sessionmaker

    try:
        candidate = CasbinPolicyEngine.load(args.candidate, override=args.override)
    except PolicyError as err:
        print(f"candidate refused: {err}", file=sys.stderr)
        return 2
    url = args.database_url
    if url is None:
        from broker.cli import _settings_from_env

        url = _settings_from_env().database_url
    engine = make_engine(url)
    try:
        report = impact(make_sessionmaker(engine), candidate, since=args.since)
    finally:
        engine.dispose()
    print(format_impact(report))
    return 1 if args.fail_on_flips and report.total_flips else 0


def _date(text: str) -> datetime:
    """YYYY-MM-DD as the start of that day in UTC."""
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
