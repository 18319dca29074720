"""Settings refuse to start an unsafe broker."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from broker.auth.keys import generate_private_key_pem
from broker.settings import REPO_POLICY_DIR, Settings


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(generate_private_key_pem("EC"))
    os.chmod(path, 0o600)
    return path


def base(key, **over):
    values = dict(database_url="sqlite:///x.sqlite", public_url="https://broker.county.example",
                  issuer="https://broker.county.example", signing_key_file=key, policy_dir=REPO_POLICY_DIR)
    values.update(over)
    return values


def test_valid_settings_load(key):
    s = Settings(**base(key))
    assert s.token_endpoint == "https://broker.county.example/oauth/token"


@pytest.mark.parametrize(("change", "message"), [
    (lambda k, t: {"signing_key_file": t / "missing.pem"}, "missing or unreadable"),
    (lambda k, t: {"policy_dir": t / "nope"}, "policy_dir"),
    (lambda k, t: {"public_url": "http://broker.county.example"}, "https"),
    (lambda k, t: {"access_token_ttl_seconds": 3600}, "less than or equal to 900"),
    (lambda k, t: {"external_jwks_url": "https://idp.example/jwks"}, "external_issuer"),
])
def test_unsafe_settings_are_refused(key, tmp_path, change, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**base(key, **change(key, tmp_path)))


def test_group_readable_key_is_refused(key):
    os.chmod(key, 0o640)
    with pytest.raises(ValidationError, match="group or others"):
        Settings(**base(key))


def test_missing_policy_file_is_refused(key, tmp_path):
    (tmp_path / "model.conf").write_text((REPO_POLICY_DIR / "model.conf").read_text())
    with pytest.raises(ValidationError, match="policy.csv"):
        Settings(**base(key, policy_dir=tmp_path))


def test_required_settings_must_be_present(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    with pytest.raises(ValidationError) as err:
        Settings()
    missing = {e["loc"][0] for e in err.value.errors()}
    assert {"database_url", "public_url", "issuer", "signing_key_file"} <= missing


def test_cli_reports_configuration_errors_without_values(monkeypatch, capsys):
    from broker.cli import main

    for name in list(os.environ):
        if name.startswith("BROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BROKER_DATABASE_URL", "postgresql://user:s3cret-password@db/broker")
    with pytest.raises(SystemExit) as exc:
        main(["db", "upgrade"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "s3cret-password" not in err
