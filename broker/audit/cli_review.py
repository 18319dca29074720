"""``broker audit overdue``: list break-glass grants still unreviewed past the configured age."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta


def add_parsers(audit_subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``overdue`` under ``broker audit``."""
    p = audit_subparsers.add_parser("overdue", help="list break-glass grants awaiting review past the allowed age")
    p.add_argument("--max-age-hours", type=int, default=None,
                   help="override BROKER_BREAK_GLASS_REVIEW_MAX_AGE_HOURS")
    p.add_argument("--database-url", default=None, help="instead of BROKER_DATABASE_URL (then other settings "
                   "are not needed)")
    p.set_defaults(func=cmd_overdue)


def cmd_overdue(args: argparse.Namespace) -> int:
    """Print the overdue grants as a table; exit 0 (an empty queue is not an error)."""
    from broker.audit.review import format_table, overdue
    from broker.settings import Settings
    from broker.store.db import make_engine, make_sessionmaker

    if args.database_url:
        url = args.database_url
        hours = args.max_age_hours if args.max_age_hours is not None else \
            Settings.model_fields["break_glass_review_max_age_hours"].default
    else:
        from broker.cli import _settings_from_env

        settings = _settings_from_env()
        url = settings.database_url
        hours = args.max_age_hours if args.max_age_hours is not None else settings.break_glass_review_max_age_hours
    if hours < 1:
        raise SystemExit("--max-age-hours must be at least 1")
    now = datetime.now(UTC)
    engine = make_engine(url)
    try:
        grants = overdue(make_sessionmaker(engine), now=now, max_age=timedelta(hours=hours))
    finally:
        engine.dispose()
    print(f"break-glass grants unreviewed for more than {hours} h as of {now.strftime('%Y-%m-%dT%H:%MZ')}: "
          f"{len(grants)}")
    if grants:
        print(format_table(grants, now=now))
    return 0
