"""`broker audit export|archive|checkpoint|verify --export` with settings from BROKER_* variables."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from broker.audit import SqlAuditSink
from broker.audit.checkpoint import generate_audit_key_pem
from broker.audit.cli_audit import add_parsers, add_verify_arguments, run_verify
from broker.auth.keys import generate_private_key_pem
from broker.settings import REPO_POLICY_DIR

from .events import make_event


def _parser() -> argparse.ArgumentParser:
    """The `broker audit` tree as broker/cli.py will build it once merged."""
    parser = argparse.ArgumentParser(prog="broker")
    audit = parser.add_subparsers(dest="command", required=True).add_parser("audit")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    add_parsers(sub)
    verify = sub.add_parser("verify")
    verify.add_argument("--from", dest="from_seq", type=int, default=1)
    verify.add_argument("--database-url", default=None)
    add_verify_arguments(verify)
    verify.set_defaults(func=run_verify)
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(["audit", *argv])
    return args.func(args)


@pytest.fixture
def env(db, tmp_path, monkeypatch):
    """Production-style settings in the environment, with an audit key and an archive directory."""
    signing = tmp_path / "broker.pem"
    signing.write_bytes(generate_private_key_pem("EC"))
    audit_key = tmp_path / "audit.pem"
    audit_key.write_bytes(generate_audit_key_pem())
    for path in (signing, audit_key):
        os.chmod(path, 0o600)
    values = {"DATABASE_URL": db.url, "PUBLIC_URL": "http://127.0.0.1:8000", "ISSUER": "http://127.0.0.1:8000",
              "SIGNING_KEY_FILE": str(signing), "POLICY_DIR": str(REPO_POLICY_DIR),
              "AUDIT_KEY_FILE": str(audit_key), "AUDIT_ARCHIVE_DIR": str(tmp_path / "archive")}
    for name, value in values.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    sink = SqlAuditSink(db.sessions)
    for i in range(1, 21):
        sink.append(make_event(i))
    return tmp_path


def test_checkpoint_export_and_offline_verify(env, capsys):
    assert _run("checkpoint") == 0
    assert "sequence 20" in capsys.readouterr().out
    assert _run("export", "--out", str(env / "log.ndjson")) == 0
    assert _run("export", "--format", "csv", "--out", str(env / "log.csv"), "--since-seq", "5") == 0
    assert _run("export", "--format", "fhir") == 0
    fhir_lines = capsys.readouterr().out.splitlines()
    assert len(fhir_lines) == 20 and json.loads(fhir_lines[0])["resourceType"] == "AuditEvent"
    assert len((env / "log.csv").read_text().splitlines()) == 1 + 16

    pem = env / "checkpoint-key.pem"
    header = json.loads((env / "log.ndjson").read_text().splitlines()[0])
    pem.write_text(header["checkpoint_key"])
    assert _run("verify", "--export", str(env / "log.ndjson"), "--public-key", str(pem)) == 0
    assert capsys.readouterr().out.strip() == "OK: 20 events verified; signed through sequence 20"
    assert _run("verify") == 0
    assert "signed through sequence 20" in capsys.readouterr().out

    lines = (env / "log.ndjson").read_text().splitlines(keepends=True)
    (env / "cut.ndjson").write_text("".join(lines[:10]))
    assert _run("verify", "--export", str(env / "cut.ndjson"), "--public-key", str(pem)) == 1
    assert "(truncated" in capsys.readouterr().out
    assert _run("verify", "--export", str(env / "missing.ndjson"), "--public-key", str(pem)) == 2


def test_archive_uses_the_retention_setting_and_the_archive_verifies(env, capsys, monkeypatch):
    assert _run("archive") == 0  # the events are from 2025: younger than six years
    assert "nothing to archive" in capsys.readouterr().out
    assert _run("archive", "--older-than-days", "1", "--actor", "county-it") == 0
    out = capsys.readouterr().out
    assert "archived events 1..20" in out
    [archive_file] = (env / "archive").glob("*.ndjson.gz")
    assert _run("checkpoint") == 0
    pem = env / "k.pem"
    from broker.audit.checkpoint import load_audit_key

    pem.write_text(load_audit_key(os.environ["BROKER_AUDIT_KEY_FILE"]).public_pem())
    assert _run("verify", "--export", str(archive_file), "--public-key", str(pem)) == 0
    assert _run("verify") == 0

    monkeypatch.delenv("BROKER_AUDIT_KEY_FILE")
    assert _run("verify", "--export", str(archive_file)) == 0  # warns: signatures unchecked
    assert "warning" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("archive", "--older-than-days", "1")
