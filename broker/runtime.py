"""Builds every long-lived collaborator once, from validated settings."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import entry_points
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker.audit.group import GroupCommitAuditSink
from broker.auth.keys import BrokerKey, load_signing_key
from broker.auth.tokens import TokenIssuer, TokenVerifier
from broker.grounds import GroundsResolver, StoreGrounds
from broker.pipeline.labels import CategoryLabels, Labeller
from broker.pipeline.sources import SourceGate
from broker.policy.engine import CasbinPolicyEngine
from broker.settings import Settings, SourceConfig
from broker.store.db import make_engine, make_sessionmaker
from broker.store.models import PolicyVersion
from broker.vocabulary import Vocabulary
from connectors.base import Connector
from connectors.classify import Classifier

CONNECTOR_GROUP = "mdt_broker.connectors"


@dataclass
class Runtime:
    """What the pipeline and routes need; one per process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    signing_key: BrokerKey
    issuer: TokenIssuer
    verifier: TokenVerifier
    vocabulary: Vocabulary
    policy: CasbinPolicyEngine
    grounds: GroundsResolver
    classifier: Classifier
    labeller: Labeller
    connectors: dict[str, Connector]
    audit: Any
    source_timeouts: dict[str, float] = field(default_factory=dict)
    audit_key: Any = None
    """The Ed25519 key that signs audit checkpoints (None: checkpoints are not written)."""
    gate: SourceGate = field(default_factory=SourceGate)
    """Timeouts and circuit breakers around every connector call."""

    @functools.cached_property
    def categories(self) -> tuple[str, ...]:
        """Every category the vocabulary defines, in a stable order (the vocabulary needs a restart to change)."""
        return tuple(sorted(self.vocabulary.categories))

    @functools.cached_property
    def category_set(self) -> frozenset[str]:
        """The same, for membership tests on the request path."""
        return frozenset(self.categories)

    @property
    def resource_types(self) -> frozenset[str]:
        """Resource types at least one source can answer."""
        types: set[str] = set()
        for c in self.connectors.values():
            types.update(c.resource_types)
        return frozenset(types)

    async def aclose(self) -> None:
        """Close connector sessions and the database pool."""
        for c in self.connectors.values():
            await c.aclose()
        close = getattr(self.audit, "close", None)
        if close is not None:
            close()  # commits whatever is queued before the pool goes away
        self.engine.dispose()


def load_connector(cfg: SourceConfig) -> Connector:
    """Instantiate a connector by its ``kind`` through the entry-point group (plugins welcome)."""
    for ep in entry_points(group=CONNECTOR_GROUP):
        if ep.name == cfg.kind:
            return ep.load().from_config(cfg)
    raise ValueError(f"no connector plugin named {cfg.kind!r}")


def build_labeller(vocabulary: Vocabulary) -> Labeller:
    """Labeller from the glossary's label table."""
    spec = vocabulary.labels
    return Labeller(
        spec={c: CategoryLabels(v.confidentiality, tuple(v.sensitivity), tuple(v.obligations))
              for c, v in spec.categories.items()},
        confidentiality_system=spec.confidentiality_system,
        sensitivity_system=spec.sensitivity_system,
        obligation_system=spec.obligation_system,
        local_system=spec.local_system,
        obligation_text=dict(spec.obligation_text),
    )


def build_runtime(settings: Settings, *, engine: Engine | None = None) -> Runtime:
    """Load keys, policy, value sets and connectors; record the policy version in force."""
    engine = engine or make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    key = load_signing_key(settings.signing_key_file)
    vocabulary = Vocabulary.load(settings.policy_dir)
    policy = CasbinPolicyEngine.load(settings.policy_dir, vocabulary, override=settings.policy_override_file)
    classifier = Classifier.from_dir(settings.policy_dir / "valuesets", set(vocabulary.categories))
    connectors = {cfg.name: load_connector(cfg) for cfg in settings.sources}
    for cfg in settings.sources:
        unknown = set(cfg.default_categories) - set(vocabulary.categories)
        if unknown:
            raise ValueError(f"source {cfg.name} names unknown default categories")
    with sessions() as session:
        if session.get(PolicyVersion, policy.version) is None:
            session.add(PolicyVersion(hash=policy.version, loaded_at=datetime.now(timezone.utc),
                                      files=policy.files()))
            session.commit()
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        signing_key=key,
        issuer=TokenIssuer(settings, key),
        verifier=TokenVerifier(settings, key),
        vocabulary=vocabulary,
        policy=policy,
        grounds=StoreGrounds(getattr(vocabulary, "consent_grounds", {})),
        classifier=classifier,
        labeller=build_labeller(vocabulary),
        connectors=connectors,
        audit=GroupCommitAuditSink(sessions),
        source_timeouts={cfg.name: cfg.timeout for cfg in settings.sources},
        audit_key=_audit_key(settings),
        gate=SourceGate(threshold=settings.source_breaker_threshold,
                        reset_seconds=settings.source_breaker_reset_seconds),
    )


def _audit_key(settings: Settings):  # type: ignore[no-untyped-def]
    """Load the checkpoint signing key when one is configured."""
    if settings.audit_key_file is None:
        return None
    from broker.audit.checkpoint import load_audit_key

    return load_audit_key(settings.audit_key_file)
