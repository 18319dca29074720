"""The ``broker`` command: serve, demo, token, db upgrade, audit verify."""

from __future__ import annotations

import argparse
import sys


def _settings_from_env():  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from broker.settings import Settings

    try:
        return Settings()  # type: ignore[call-arg]
    except ValidationError as err:
        # Field names and messages only: settings values may be secrets.
        for e in err.errors():
            loc = ".".join(str(p) for p in e.get("loc", ())) or "settings"
            print(f"configuration error: {loc}: {e.get('msg')}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the broker with settings from BROKER_* environment variables."""
    import uvicorn

    from broker.app import create_app
    from broker.store.db import upgrade

    settings = _settings_from_env()
    if args.migrate:
        upgrade(settings.database_url)
    app = create_app(settings)
    tune_gc_for_serving()
    uvicorn.run(app, host=args.host, port=args.port, server_header=False, access_log=False, log_config=None)
    return 0


GC_THRESHOLDS = (20_000, 50, 100)
"""CPython's cyclic collector while serving (its defaults: 700, 10, 10). A request parses, copies
and serializes hundreds of JSON containers, which reference counting frees (parsed JSON forms no
cycles; what does is still collected, only less often). With the defaults the collector ran every
700 allocations -- about once per request -- and each full collection walked every object
start-up had built (~160,000, ~100 ms a time); under 32 concurrent requests that was ~13% of the
broker's CPU and a third of its p99 (bench/RESULTS.md)."""


def tune_gc_for_serving() -> None:
    """Before serving: collect once, freeze what start-up built (it lives as long as the process,
    so no collection need walk it again), and collect young objects less often."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def cmd_demo(args: argparse.Namespace) -> int:
    """Seed and run the demo on SQLite with the synthetic FHIR source."""
    import uvicorn

    from broker import demo
    from broker.app import create_app

    directory = demo.state_dir()
    demo.ensure_keys(directory)
    settings = demo.demo_settings(directory, host=args.host, port=args.port)
    demo.seed(settings, directory)
    app = create_app(settings)
    tune_gc_for_serving()
    print(demo.banner(settings), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, server_header=False, access_log=False, log_config=None)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a demo access token, obtained from the running demo through its dev client."""
    from broker import demo

    directory = demo.state_dir()
    if not (directory / "broker.pem").exists():
        print("no demo state: run the demo first", file=sys.stderr)
        return 2
    settings = demo.demo_settings(directory, host=args.host, port=args.port)
    try:
        person = demo.person(args.alias)
    except KeyError:
        print(f"unknown demo person: {args.alias}", file=sys.stderr)
        return 2
    if args.offline:
        print(demo.mint_token(settings, args.alias, args.purpose))
        return 0
    try:
        print(demo.request_token(settings, directory, person, args.purpose))
    except OSError as err:
        print(f"could not reach the demo at {settings.public_url} ({type(err).__name__}); is it running? "
              "(--offline mints a token without it)", file=sys.stderr)
        return 2
    return 0


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    """Apply database migrations."""
    from broker.store.db import upgrade

    upgrade(_settings_from_env().database_url)
    print("database is at the latest revision")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Recompute the audit hash chain and check signed checkpoints; exit 1 at the first broken event."""
    from broker.audit.cli_audit import run_verify_export
    from broker.audit.verify import format_report, verify_chain
    from broker.store.db import make_engine, make_sessionmaker

    if getattr(args, "export", None) is not None:
        return run_verify_export(args)
    key_file = None
    if args.demo:
        from broker import demo

        demo_settings = demo.demo_settings(demo.state_dir())
        url, key_file = demo_settings.database_url, demo_settings.audit_key_file
    elif args.database_url:
        url = args.database_url
    else:
        settings = _settings_from_env()
        url, key_file = settings.database_url, settings.audit_key_file
    public_key = None
    if key_file is not None:
        from broker.audit.checkpoint import load_audit_key

        public_key = load_audit_key(key_file).public_key
    engine = make_engine(url)
    try:
        report = verify_chain(make_sessionmaker(engine), from_seq=args.from_seq, public_key=public_key)
    finally:
        engine.dispose()
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_openapi(_args: argparse.Namespace) -> int:
    """Print the OpenAPI document."""
    from broker.openapi_doc import main as print_openapi

    print_openapi()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by tests)."""
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker (settings from BROKER_* variables)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run the demo (SQLite, synthetic data, dev clients)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(func=cmd_demo)

    token = sub.add_parser("token", help="print a demo access token")
    token.add_argument("--as", dest="alias", default="po", help="cw, po, mh, sud, phn, da, le or admin")
    token.add_argument("--purpose", default=None, help="bind a purpose of use into the token")
    token.add_argument("--offline", action="store_true",
                       help="mint with the demo's key instead of asking the running demo's token endpoint")
    token.add_argument("--host", default="127.0.0.1")
    token.add_argument("--port", type=int, default=8000)
    token.set_defaults(func=cmd_token)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_up = db_sub.add_parser("upgrade", help="apply migrations")
    db_up.set_defaults(func=cmd_db_upgrade)

    from broker.policy.cli_lint import add_parser as add_policy_lint
    from broker.policy.cli_policy import add_parsers as add_policy_parsers

    policy = sub.add_parser("policy", help="policy tools for county counsel: lint, test, explain")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    add_policy_lint(policy_sub)
    add_policy_parsers(policy_sub)
    from broker.policy.cli_impact import add_parser as add_policy_impact

    add_policy_impact(policy_sub)

    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.set_defaults(func=cmd_openapi)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="verify the hash chain")
    verify.add_argument("--from", dest="from_seq", type=int, default=1)
    verify.add_argument("--database-url", default=None)
    verify.add_argument("--demo", action="store_true", help="verify the demo database")
    verify.set_defaults(func=cmd_audit_verify)
    from broker.audit import cli_audit, cli_review

    cli_audit.add_verify_arguments(verify)
    cli_audit.add_parsers(audit_sub)
    cli_review.add_parsers(audit_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
