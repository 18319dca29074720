"""Typed settings that refuse to start a broker that would be unsafe.

Values come from ``BROKER_*`` environment variables (or keyword arguments in tests).
Outside demo mode the broker refuses: a missing or group/world-readable signing key,
the demo key, an unreadable policy directory, or an access-token lifetime over 15 minutes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
DEMO_STATE_DIR_NAME = "mdt-broker-demo"


class SourceConfig(BaseModel):
    """One source system the broker reads from."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    kind: str = "fhir"
    base_url: str | None = None
    data_dir: Path | None = None
    identifier_system: str
    default_categories: list[str] = Field(default_factory=lambda: ["general-health"])
    resource_types: list[str] = Field(default_factory=list)
    timeout: float = Field(default=5.0, gt=0, le=60)
    max_pages: int = Field(default=50, ge=1, le=1000)
    database_url: str | None = Field(default=None, description="kind sql: the agency database (SQLAlchemy URL)")
    mapping_file: Path | None = Field(default=None, description="kind sql: the mapping file; a relative path "
                                      "that does not exist is looked up in connectors/mappings/")
    pool_size: int = Field(default=4, ge=1, le=64, description="kind sql: connections and worker threads")


class Settings(BaseSettings):
    """Everything the broker needs to run; validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="forbid")

    mode: Literal["production", "demo"] = "production"
    database_url: str
    public_url: str = Field(description="Base URL agency systems use, e.g. https://broker.county.example")
    issuer: str = Field(description="The iss claim of access tokens the broker issues")
    audience: str = "mdt-broker"
    signing_key_file: Path
    access_token_ttl_seconds: int = Field(default=600, ge=30, le=900)
    client_assertion_max_age_seconds: int = Field(default=300, ge=30, le=900)
    clock_skew_seconds: int = Field(default=30, ge=0, le=120)
    external_jwks_url: str | None = None
    external_issuer: str | None = None
    external_audience: str | None = None
    policy_dir: Path = REPO_POLICY_DIR
    policy_watch: bool = Field(default=False, description="Poll policies/ and reload (lint + cases first) "
                               "when a file changes; SIGHUP and POST /policy/reload always work")
    policy_override_file: Path | None = Field(
        default=None, description="A county's rules layered on policy_dir/policy.csv (docs/policy-layers.md)")
    sources: list[SourceConfig] = Field(default_factory=list)
    sources_file: Path | None = None
    break_glass_minutes: int = Field(default=60, ge=1, le=24 * 60)
    break_glass_review_max_age_hours: int = Field(default=72, ge=1, le=24 * 90)
    audit_key_file: Path | None = Field(default=None, description="Ed25519 private key (PEM) that signs "
                                        "audit checkpoints; without it checkpoints are not written")
    audit_checkpoint_interval_seconds: int = Field(default=300, ge=5, le=86400)
    audit_retention_days: int = Field(default=6 * 365 + 2, ge=365)
    audit_archive_dir: Path | None = None
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_count: int = Field(default=200, ge=1, le=1000)
    context_cache_size: int = Field(default=10_000, ge=0, le=1_000_000, description="Resolved contexts and "
                                    "grounds kept per process while the registry generation and clock allow "
                                    "(broker/pipeline/context_cache.py); 0 resolves every request afresh")
    source_breaker_threshold: int = Field(default=5, ge=1, le=1000, description="Consecutive failures or "
                                          "timeouts of a source after which it is not asked for a while")
    source_breaker_reset_seconds: float = Field(default=30.0, gt=0, le=3600, description="How long a source "
                                                "whose breaker opened is reported unavailable without asking it")
    rate_limit_per_minute: int = Field(default=6000, ge=1, le=1_000_000, description="Requests per minute "
                                       "each client_id may make to the audited routes (data, registry, audit)")
    token_rate_limit_per_minute: int = Field(default=3000, ge=1, le=1_000_000, description="Token requests "
                                             "per minute each authenticated client may make at /oauth/token")
    token_rate_limit_per_address_per_minute: int = Field(
        default=3000, ge=1, le=1_000_000, description="Requests per minute each remote address may make to "
        "/oauth/token, counted before authentication (unauthenticated floods)")
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call the API (exact https origins); "
        "empty, the default, means no CORS headers at all: agency systems call server to server")
    log_level: str = "INFO"
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str | None = None

    @field_validator("public_url", "issuer")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> "Settings":
        key = self.signing_key_file
        if not key.is_file() or not os.access(key, os.R_OK):
            raise ValueError(f"signing_key_file {key} is missing or unreadable")
        if not self.policy_dir.is_dir() or not os.access(self.policy_dir, os.R_OK):
            raise ValueError(f"policy_dir {self.policy_dir} is missing or unreadable")
        for name in ("model.conf", "policy.csv", "vocabulary.yaml"):
            f = self.policy_dir / name
            if not f.is_file() or not os.access(f, os.R_OK):
                raise ValueError(f"policy file {f} is missing or unreadable")
        override = self.policy_override_file
        if override is not None and (not override.is_file() or not os.access(override, os.R_OK)):
            raise ValueError(f"policy_override_file {override} is missing or unreadable")
        if self.mode != "demo":
            if DEMO_STATE_DIR_NAME in key.resolve().parts:
                raise ValueError("the demo signing key may not be used outside demo mode")
            if key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ValueError(f"signing_key_file {key} must not be readable by group or others")
            if not self.public_url.startswith("https://") and not _is_loopback(self.public_url):
                raise ValueError("public_url must be https outside demo mode")
        for origin in self.cors_allow_origins:
            if not _is_origin(origin):
                raise ValueError("cors_allow_origins entries must be exact origins (https://host[:port]; "
                                 "http only on loopback), never '*'")
        if self.external_jwks_url and not (self.external_issuer and self.external_audience):
            raise ValueError("external_jwks_url needs external_issuer and external_audience")
        if self.sources_file is not None:
            data = _read_yaml(self.sources_file) or {}
            self.sources = [SourceConfig.model_validate(s) for s in data.get("sources", [])]
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError("source names must be unique")
        return self

    @property
    def token_endpoint(self) -> str:
        """The URL client assertions must name as their audience (RFC 7523 section 3)."""
        return f"{self.public_url}/oauth/token"


def _read_yaml(path: Path) -> Any:
    """Parse a settings file; a syntax error names its position only, never the text, which may hold a password."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{path} is not valid YAML{where}") from None


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    return host in {"127.0.0.1", "localhost", "::1"}


def _is_origin(value: str) -> bool:
    """``scheme://host[:port]`` with nothing else; https, or http on loopback."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    if parts.scheme not in ("https", "http") or not parts.hostname or "*" in value:
        return False
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        return False
    return parts.scheme == "https" or _is_loopback(value)
