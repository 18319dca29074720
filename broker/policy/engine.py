"""The one place that calls Casbin: (role, category, purpose, grounds) → Decision with its citation.

An engine is immutable once loaded: its version hashes the exact bytes it was built from, and
a policy change means loading a new engine. Decisions are memoized per engine, so the cost of
Casbin's linear rule scan is paid once per distinct request tuple.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import casbin
import structlog
from casbin.effect.default_effectors import AllowAndDenyEffector
from casbin.model import Model

from broker.domain import Decision, DecisionSet
from broker.policy.errors import PolicyError
from broker.policy.rules import P_FIELDS, PolicyRule, read_rules
from broker.vocabulary import VOCABULARY_FILE, Vocabulary

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"
VALUESET_DIR = "valuesets"
NO_GROUND = "none"  # the ground evaluated when a request has none, so deny rules still report

_REQUEST_TOKENS = ["r_role", "r_category", "r_purpose", "r_ground"]
_POLICY_TOKENS = [f"p_{f}" if f != "effect" else "p_eft" for f in P_FIELDS]

log = structlog.get_logger()

# One ground's outcome: ("allow" | "deny", the matched rule), or None when no rule matched.
_Verdict = tuple[str, tuple[str, ...]] | None


@runtime_checkable
class PolicyEngine(Protocol):
    """Decides per data category whether a requester may see it, and which rule says so.

    Concurrency: safe for concurrent use from any number of threads and tasks; a decision does
    no I/O. Errors: ``decide`` and ``decide_all`` never raise — any internal failure is a deny
    with no rule and no citation (fail closed). Loading raises ``PolicyError``.
    """

    @property
    def version(self) -> str:
        """``sha256:<hex>`` over the policy files this engine was built from."""
        ...

    def files(self) -> dict[str, str]:
        """Relative path → sha256 hex of each file covered by ``version``."""
        ...

    def decide(self, *, role: str, category: str, purpose: str, grounds: frozenset[str]) -> Decision:
        """One category's verdict; deny overrides allow; no matching rule is a deny."""
        ...

    def decide_all(self, *, role: str, categories: Iterable[str], purpose: str,
                   grounds: frozenset[str]) -> DecisionSet:
        """A verdict for each category, in the order given."""
        ...


class CasbinPolicyEngine:
    """PolicyEngine over a plain pycasbin Enforcer; Casbin calls are serialized, results memoized."""

    def __init__(self, *, enforcer: casbin.Enforcer, vocabulary: Vocabulary, rules: tuple[PolicyRule, ...],
                 version: str, files: Mapping[str, str]) -> None:
        self._enforcer = enforcer
        self._vocabulary = vocabulary
        self._rules = rules
        self._version = version
        self._files = dict(files)
        self._lock = threading.Lock()  # pycasbin mutates shared state inside enforce_ex
        self._verdicts: dict[tuple[str, str, str, str], _Verdict] = {}
        self._decisions: dict[tuple[str, str, str, frozenset[str]], Decision] = {}

    @classmethod
    def load(cls, policy_dir: Path, vocabulary: Vocabulary | None = None,
             override: Path | None = None) -> CasbinPolicyEngine:
        """Validate and load model.conf, policy.csv (plus a county override) and the vocabulary."""
        policy_dir = Path(policy_dir)
        blobs = _read_files(policy_dir)
        if vocabulary is None:
            vocabulary = Vocabulary.parse(_text(policy_dir, VOCABULARY_FILE, blobs), policy_dir / VOCABULARY_FILE)
        model = _load_model(policy_dir / MODEL_FILE, _text(policy_dir, MODEL_FILE, blobs))
        rules = read_rules(policy_dir / POLICY_FILE, _text(policy_dir, POLICY_FILE, blobs), vocabulary)
        if override is not None:  # layered on the baseline: see broker/policy/layers.py
            from broker.policy.layers import merge, read_override

            layer = read_override(Path(override))
            rules = merge(policy_dir / POLICY_FILE, rules, layer, vocabulary)
            blobs[layer.files_key] = layer.data
        enforcer = _build_enforcer(policy_dir / POLICY_FILE, model, rules)
        return cls(enforcer=enforcer, vocabulary=vocabulary, rules=rules, version=_version(blobs),
                   files={rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(blobs.items())})

    @property
    def version(self) -> str:
        """``sha256:<hex>`` over the sorted (relative path, bytes) of every policy file."""
        return self._version

    @property
    def vocabulary(self) -> Vocabulary:
        """The glossary the rules were validated against."""
        return self._vocabulary

    @property
    def rules(self) -> tuple[PolicyRule, ...]:
        """Every rule as written, with its line, for explanations and the CLI."""
        return self._rules

    def files(self) -> dict[str, str]:
        """Relative path → sha256 hex of each file covered by ``version`` (a copy)."""
        return dict(self._files)

    def decide(self, *, role: str, category: str, purpose: str, grounds: frozenset[str]) -> Decision:
        """Deny if any ground hits a deny rule, else allow on the first allowing ground, else deny."""
        try:
            key = (role, category, purpose, frozenset(grounds))
            cached = self._decisions.get(key)
            if cached is not None:
                return cached
            decision = self._decide(role, category, purpose, key[3])
            if self._memoizable(key):
                with self._lock:
                    decision = self._decisions.setdefault(key, decision)
            return decision
        except Exception as exc:  # fail closed: a broken decision is a deny, never an allow
            log.warning("policy.decide_failed", error=type(exc).__name__)
            return self._deny(category, None, None)

    def decide_all(self, *, role: str, categories: Iterable[str], purpose: str,
                   grounds: frozenset[str]) -> DecisionSet:
        """One decision per distinct category, in the order given; a failure releases nothing."""
        try:
            ordered = list(dict.fromkeys(categories))
        except Exception as exc:
            log.warning("policy.decide_failed", error=type(exc).__name__)
            return DecisionSet(decisions=(), policy_version=self._version)
        decisions = tuple(self.decide(role=role, category=c, purpose=purpose, grounds=grounds) for c in ordered)
        return DecisionSet(decisions=decisions, policy_version=self._version)

    def _decide(self, role: str, category: str, purpose: str, grounds: frozenset[str]) -> Decision:
        """Combine per-ground verdicts; unknown terms never reach Casbin (a * rule must not admit them)."""
        vocab = self._vocabulary
        if role not in vocab.roles or category not in vocab.categories or purpose not in vocab.purposes:
            return self._deny(category, None, None)
        known = sorted(g for g in grounds if g in vocab.grounds) or [NO_GROUND]
        verdicts = [(g, self._verdict(role, category, purpose, g)) for g in known]
        for ground, verdict in verdicts:
            if verdict is not None and verdict[0] == "deny":
                return self._deny(category, None if ground == NO_GROUND else ground, verdict[1])
        for ground, verdict in verdicts:
            if verdict is not None and verdict[0] == "allow":
                rule = verdict[1]
                return Decision(category=category, effect="allow", ground=ground, rule=rule,
                                citation=rule[5], policy_version=self._version)
        return self._deny(category, None, None)

    def _verdict(self, role: str, category: str, purpose: str, ground: str) -> _Verdict:
        """Casbin's answer for one ground, computed once per engine."""
        key = (role, category, purpose, ground)
        if key in self._verdicts:
            return self._verdicts[key]
        with self._lock:
            if key in self._verdicts:
                return self._verdicts[key]
            allowed, explain = self._enforcer.enforce_ex(role, category, purpose, ground)
            verdict = _interpret(allowed, explain)
            self._verdicts[key] = verdict
            return verdict

    def _memoizable(self, key: tuple[str, str, str, frozenset[str]]) -> bool:
        """Only vocabulary terms are cached, so junk input cannot grow the cache."""
        role, category, purpose, grounds = key
        vocab = self._vocabulary
        return (role in vocab.roles and category in vocab.categories and purpose in vocab.purposes
                and all(g in vocab.grounds for g in grounds))

    def _deny(self, category: str, ground: str | None, rule: tuple[str, ...] | None) -> Decision:
        """A deny, with the deciding rule when one matched."""
        return Decision(category=category, effect="deny", ground=ground, rule=rule,
                        citation=rule[5] if rule else None, policy_version=self._version)


def _interpret(allowed: object, explain: object) -> _Verdict:
    """Turn enforce_ex output into a verdict; anything inconsistent raises (and so denies)."""
    rule = tuple(str(x) for x in (explain or ()))
    if not rule:
        if allowed is False:
            return None
        raise RuntimeError("enforce_ex allowed without a matching rule")
    if len(rule) != len(P_FIELDS):
        raise RuntimeError("enforce_ex returned a rule of the wrong size")
    rule = (*rule[:5], _unquote(rule[5]))
    if rule[4] == "deny" and allowed is False:
        return ("deny", rule)
    if rule[4] == "allow" and allowed is True:
        return ("allow", rule)
    raise RuntimeError("enforce_ex effect disagrees with its matched rule")


def _unquote(citation: str) -> str:
    """Citations are reported without the CSV quotes."""
    c = citation.strip()
    if len(c) >= 2 and c[0] == c[-1] == '"':
        c = c[1:-1].strip()
    return c


def _read_files(policy_dir: Path) -> dict[str, bytes]:
    """The bytes of every file the version covers, read once so hash and load agree."""
    blobs: dict[str, bytes] = {}
    for name in (MODEL_FILE, POLICY_FILE, VOCABULARY_FILE):
        path = policy_dir / name
        try:
            blobs[name] = path.read_bytes()
        except OSError as exc:
            raise PolicyError(path, None, f"cannot read the policy file ({type(exc).__name__})") from None
    valuesets = policy_dir / VALUESET_DIR
    if valuesets.is_dir():
        for path in sorted(valuesets.glob("*.yaml")):
            try:
                blobs[path.relative_to(policy_dir).as_posix()] = path.read_bytes()
            except OSError as exc:
                raise PolicyError(path, None, f"cannot read the value set ({type(exc).__name__})") from None
    return blobs


def _text(policy_dir: Path, name: str, blobs: dict[str, bytes]) -> str:
    """A policy file as UTF-8 text."""
    try:
        return blobs[name].decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(policy_dir / name, None, "not valid UTF-8") from None


def _version(blobs: dict[str, bytes]) -> str:
    """sha256 over length-framed (relative path, bytes) pairs in sorted path order."""
    h = hashlib.sha256()
    for rel, data in sorted(blobs.items()):
        name = rel.encode("utf-8")
        h.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def _load_model(path: Path, text: str) -> Model:
    """Parse model.conf and insist on the request/policy shape and deny-overrides effect."""
    model = Model()
    try:
        model.load_model_from_text(text)
    except Exception as exc:
        raise PolicyError(path, None, f"invalid Casbin model ({type(exc).__name__}: {exc})") from None
    sections = {
        "r": ("request_definition", lambda: model["r"]["r"].tokens == _REQUEST_TOKENS,
              "r = role, category, purpose, ground"),
        "p": ("policy_definition", lambda: model["p"]["p"].tokens == _POLICY_TOKENS,
              "p = role, category, purpose, ground, eft, citation"),
        "g": ("role_definition", lambda: {"g", "g2"} <= set(model["g"].keys()), "g = _, _ and g2 = _, _"),
        "e": ("policy_effect", lambda: _deny_overrides(model),
              "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))"),
        "m": ("matchers", lambda: bool(model["m"]["m"].value), "m = <matcher>"),
    }
    for key, (section, ok, expected) in sections.items():
        try:
            good = key in model.keys() and ok()
        except Exception:
            good = False
        if not good:
            raise PolicyError(path, _line_of(text, key), f"[{section}] must define {expected}")
    return model


def _deny_overrides(model: Model) -> bool:
    """The engine's combining logic assumes allow-unless-any-deny."""
    from casbin.effect import get_effector

    return isinstance(get_effector(model["e"]["e"].value), AllowAndDenyEffector)


def _line_of(text: str, key: str) -> int | None:
    """The 1-based line where ``key =`` is defined in model.conf, if any."""
    for number, line in enumerate(text.splitlines(), start=1):
        name, sep, _rest = line.partition("=")
        if sep and name.strip() == key:
            return number
    return None


_CASBIN_LOG = logging.getLogger("broker.policy.casbin")
_CASBIN_LOG.setLevel(logging.ERROR)


def _build_enforcer(path: Path, model: Model, rules: tuple[PolicyRule, ...]) -> casbin.Enforcer:
    """A plain Enforcer (FastEnforcer's key filter ignores * and g/g2, and crashes in enforce_ex)."""
    enforcer = casbin.Enforcer(model)
    # pycasbin logs every deny at WARNING on the shared "casbin.enforcer" logger: noise (the
    # audit event records each decision with its rule) and a format call on the hot path.
    enforcer.logger = _CASBIN_LOG
    p_rules = [list(r.fields) for r in rules if r.ptype == "p"]
    if p_rules and not enforcer.add_policies(p_rules):
        raise PolicyError(path, None, "Casbin refused the policy rules")
    for ptype in ("g", "g2"):
        links = [list(r.fields) for r in rules if r.ptype == ptype]
        if links and not enforcer.add_named_grouping_policies(ptype, links):
            raise PolicyError(path, None, f"Casbin refused the {ptype} rules")
    enforcer.build_role_links()
    return enforcer
