"""The engine's combining rules, failure handling, memoization and versioning."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.domain import Decision, DecisionSet
from broker.policy import CasbinPolicyEngine, PolicyEngine

M = frozenset({"mdt-member"})
MS = frozenset({"mdt-member", "own-statute"})
S = frozenset({"own-statute"})

ALLOW_MH = 'p, mental-health-clinician, mental-health, TREAT, mdt-member, allow, "W&IC 5328(a)(1)"\n'
DENY_MH_OWN = 'p, mental-health-clinician, mental-health, *, own-statute, deny, "Evid. Code 1014"\n'


def decide(engine: CasbinPolicyEngine, role: str, category: str, purpose: str, grounds=M) -> Decision:
    return engine.decide(role=role, category=category, purpose=purpose, grounds=grounds)


def test_engine_satisfies_the_protocol(policy_dir) -> None:
    """The pipeline depends on the Protocol, not on Casbin."""
    assert isinstance(CasbinPolicyEngine.load(policy_dir(ALLOW_MH)), PolicyEngine)


def test_allow_reports_rule_ground_citation_and_version(policy_dir) -> None:
    """An allow carries the rule that decided it, without the CSV quotes."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT")
    assert d == Decision(category="mental-health", effect="allow", ground="mdt-member",
                         rule=("mental-health-clinician", "mental-health", "TREAT", "mdt-member", "allow",
                               "W&IC 5328(a)(1)"),
                         citation="W&IC 5328(a)(1)", policy_version=engine.version)
    assert engine.version.startswith("sha256:") and len(engine.version) == len("sha256:") + 64


def test_no_matching_rule_is_a_deny_without_rule(policy_dir) -> None:
    """Default deny: another purpose, role or category matches nothing."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    for role, category, purpose in [("mental-health-clinician", "mental-health", "COC"),
                                    ("casa", "mental-health", "TREAT"),
                                    ("mental-health-clinician", "hiv", "TREAT")]:
        d = decide(engine, role, category, purpose)
        assert (d.effect, d.rule, d.citation, d.ground) == ("deny", None, None, None)


@pytest.mark.parametrize("order", ["allow-first", "deny-first"])
def test_deny_overrides_allow_on_the_same_ground(policy_dir, order: str) -> None:
    """A matching deny beats a matching allow whatever their order in the file."""
    deny = 'p, *, mental-health, TREAT, mdt-member, deny, "Evid. Code 1014"\n'
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH + deny if order == "allow-first" else deny + ALLOW_MH))
    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT")
    assert d.effect == "deny"
    assert d.rule == ("*", "mental-health", "TREAT", "mdt-member", "deny", "Evid. Code 1014")
    assert d.citation == "Evid. Code 1014"
    assert d.ground == "mdt-member"


def test_deny_on_any_ground_overrides_allow_on_another(policy_dir) -> None:
    """Holding an extra ground can never turn a deny into an allow."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH + DENY_MH_OWN))
    assert decide(engine, "mental-health-clinician", "mental-health", "TREAT", M).allowed
    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT", MS)
    assert (d.effect, d.ground, d.citation) == ("deny", "own-statute", "Evid. Code 1014")


def test_first_allowing_ground_in_sorted_order_decides(policy_dir) -> None:
    """With two allowing grounds the report is deterministic: the first in sorted order."""
    both = ALLOW_MH + 'p, mental-health-clinician, mental-health, TREAT, own-statute, allow, "Civ. Code 56.10"\n'
    engine = CasbinPolicyEngine.load(policy_dir(both))
    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT", MS)
    assert (d.effect, d.ground, d.citation) == ("allow", "mdt-member", "W&IC 5328(a)(1)")
    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT", S)
    assert (d.effect, d.ground, d.citation) == ("allow", "own-statute", "Civ. Code 56.10")


def test_no_grounds_evaluates_ground_none(policy_dir) -> None:
    """A groundless request is denied, and a * deny still reports its citation."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH + 'p, *, hiv, *, *, deny, "H&S 120975"\n'))
    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT", frozenset())
    assert (d.effect, d.rule) == ("deny", None)
    d = decide(engine, "mental-health-clinician", "hiv", "TREAT", frozenset())
    assert (d.effect, d.ground, d.citation) == ("deny", None, "H&S 120975")


def test_wildcards_match_every_role_category_and_purpose(policy_dir) -> None:
    """* in role, category or purpose matches every vocabulary term."""
    engine = CasbinPolicyEngine.load(policy_dir(
        'p, *, general-health, COC, mdt-member, allow, "Civ. Code 56.103"\n'
        'p, casa, *, TREAT, own-statute, allow, "W&IC 107"\n'
        'p, district-attorney, hiv, *, mdt-member, allow, "H&S 120985"\n'))
    for role in ("child-welfare-worker", "mental-health-clinician", "district-attorney", "casa"):
        assert decide(engine, role, "general-health", "COC").citation == "Civ. Code 56.103"
        assert not decide(engine, role, "general-health", "TREAT").allowed
    for category in ("general-health", "mental-health", "hiv"):
        assert decide(engine, "casa", category, "TREAT", S).citation == "W&IC 107"
        assert not decide(engine, "casa", category, "TREAT", M).allowed
    for purpose in ("TREAT", "COC"):
        assert decide(engine, "district-attorney", "hiv", purpose).allowed


def test_wildcard_deny_on_every_ground(policy_dir) -> None:
    """A * ground deny blocks every ground, including none."""
    engine = CasbinPolicyEngine.load(policy_dir(
        'p, casa, hiv, TREAT, own-statute, allow, "H&S 120985"\np, casa, hiv, *, *, deny, "H&S 120980"\n'))
    for grounds in (frozenset(), M, S, MS):
        d = decide(engine, "casa", "hiv", "TREAT", grounds)
        assert (d.effect, d.citation) == ("deny", "H&S 120980")


def test_identity_without_g_lines_and_hierarchy_with_them(policy_dir) -> None:
    """A role matches itself with no g line; g/g2 lines extend rules to members of a group."""
    engine = CasbinPolicyEngine.load(policy_dir(
        "g, casa, advocates\ng2, hiv, minor-consent\n"
        'p, advocates, minor-consent, TREAT, own-statute, allow, "H&S 120985"\n'
        'p, mental-health-clinician, hiv, TREAT, own-statute, allow, "H&S 120985(a)"\n'))
    assert decide(engine, "casa", "hiv", "TREAT", S).allowed
    assert not decide(engine, "casa", "mental-health", "TREAT", S).allowed
    assert not decide(engine, "district-attorney", "hiv", "TREAT", S).allowed
    assert decide(engine, "mental-health-clinician", "hiv", "TREAT", S).citation == "H&S 120985(a)"


def test_unknown_terms_are_denied_even_by_wildcard_allow(policy_dir) -> None:
    """A * allow must not admit a role, category or purpose the vocabulary does not define."""
    engine = CasbinPolicyEngine.load(policy_dir('p, *, *, *, mdt-member, allow, "W&IC 18961.7"\n'))
    assert decide(engine, "casa", "hiv", "TREAT").allowed
    for role, category, purpose in [("registry-admin", "hiv", "TREAT"), ("exploiter", "hiv", "TREAT"),
                                    ("casa", "psychotherapy", "TREAT"), ("casa", "hiv", "MARKETING"),
                                    ("*", "hiv", "TREAT"), ("casa", "*", "*")]:
        d = decide(engine, role, category, purpose)
        assert (d.effect, d.rule) == ("deny", None), (role, category, purpose)


def test_unknown_grounds_are_ignored(policy_dir) -> None:
    """Only vocabulary grounds count; a made-up ground neither allows nor breaks the decision."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    assert not decide(engine, "mental-health-clinician", "mental-health", "TREAT", frozenset({"trust-me"})).allowed
    assert decide(engine, "mental-health-clinician", "mental-health", "TREAT",
                  frozenset({"trust-me", "mdt-member"})).allowed


def test_exception_inside_enforce_is_a_deny_and_logs_only_the_class(policy_dir, monkeypatch) -> None:
    """Fail closed: any error is a deny with no rule; the log carries no message text."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))

    def boom(*args):
        raise ValueError("youth Jane Doe DOB 2010-01-01")

    monkeypatch.setattr(engine._enforcer, "enforce_ex", boom)
    with capture_logs() as logs:
        d = decide(engine, "mental-health-clinician", "mental-health", "TREAT")
    assert (d.effect, d.rule, d.citation, d.ground) == ("deny", None, None, None)
    assert d.policy_version == engine.version
    assert logs == [{"event": "policy.decide_failed", "error": "ValueError", "log_level": "warning"}]
    assert "Jane" not in repr(logs)
    monkeypatch.undo()
    assert decide(engine, "mental-health-clinician", "mental-health", "TREAT").allowed  # failure not cached


@pytest.mark.parametrize("answer", [(True, []), (False, ["mental-health-clinician", "mental-health", "TREAT",
                                                         "mdt-member", "allow", "x"]),
                                    (True, ["*", "mental-health", "*", "*", "deny", "x"]), (True, ["short"]),
                                    None])
def test_inconsistent_enforce_answer_is_a_deny(policy_dir, monkeypatch, answer) -> None:
    """An allow without a matching allow rule (e.g. a disabled enforcer) is never trusted."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    monkeypatch.setattr(engine._enforcer, "enforce_ex", lambda *a: answer)
    with capture_logs():
        d = decide(engine, "mental-health-clinician", "mental-health", "TREAT")
    assert (d.effect, d.rule) == ("deny", None)


def test_disabled_enforcer_is_a_deny(policy_dir) -> None:
    """Casbin's enable_enforce(False) answers allow to everything; the engine refuses that."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    engine._enforcer.enable_enforce(False)
    with capture_logs():
        assert not decide(engine, "casa", "hiv", "COC").allowed


def test_memoized_decisions_are_identical_objects(policy_dir, monkeypatch) -> None:
    """The second identical request returns the same Decision and never reaches Casbin."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH + DENY_MH_OWN))
    calls: list[tuple] = []
    real = engine._enforcer.enforce_ex

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(engine._enforcer, "enforce_ex", counting)
    first = decide(engine, "mental-health-clinician", "mental-health", "TREAT", MS)
    n = len(calls)
    assert n == 2  # one evaluation per ground
    assert decide(engine, "mental-health-clinician", "mental-health", "TREAT", MS) is first
    assert decide(engine, "mental-health-clinician", "mental-health", "TREAT", frozenset(MS)) is first
    assert len(calls) == n
    decide(engine, "mental-health-clinician", "mental-health", "TREAT", M)  # mdt-member verdict reused
    assert len(calls) == n


def test_concurrent_decisions_agree(policy_dir) -> None:
    """Many threads on a cold engine all get the same, correct answers."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH + DENY_MH_OWN))
    results: list[tuple] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(20):
                for grounds in (M, MS, S, frozenset()):
                    d = decide(engine, "mental-health-clinician", "mental-health", "TREAT", grounds)
                    results.append((tuple(sorted(grounds)), d.effect, d.citation))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(results) == {(("mdt-member",), "allow", "W&IC 5328(a)(1)"),
                            (("mdt-member", "own-statute"), "deny", "Evid. Code 1014"),
                            (("own-statute",), "deny", "Evid. Code 1014"),
                            ((), "deny", None)}


def test_decide_all_keeps_order_drops_repeats_and_carries_version(policy_dir) -> None:
    """One decision per category, in the caller's order."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    ds = engine.decide_all(role="mental-health-clinician", categories=["hiv", "mental-health", "hiv"],
                           purpose="TREAT", grounds=M)
    assert isinstance(ds, DecisionSet)
    assert [d.category for d in ds.decisions] == ["hiv", "mental-health"]
    assert ds.allowed_categories() == frozenset({"mental-health"})
    assert ds.policy_version == engine.version
    assert ds.for_category("mental-health").citation == "W&IC 5328(a)(1)"


def test_decide_all_with_broken_category_iterable_releases_nothing(policy_dir) -> None:
    """Even a caller bug fails closed instead of raising into the pipeline."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))

    def broken():
        yield "mental-health"
        raise RuntimeError("boom")

    with capture_logs():
        ds = engine.decide_all(role="mental-health-clinician", categories=broken(), purpose="TREAT", grounds=M)
    assert ds.allowed_categories() == frozenset()


def test_version_is_stable_and_tracks_every_policy_file(policy_dir) -> None:
    """Same bytes → same version; any change to policy.csv, vocabulary or a value set → new version."""
    valuesets = {"hiv.yaml": "codes: [a]\n"}
    d = policy_dir(ALLOW_MH, valuesets=valuesets)
    first = CasbinPolicyEngine.load(d)
    again = CasbinPolicyEngine.load(d)
    assert first.version == again.version
    assert first.version == CasbinPolicyEngine.load(policy_dir(ALLOW_MH, valuesets=valuesets)).version
    assert set(first.files()) == {"model.conf", "policy.csv", "vocabulary.yaml", "valuesets/hiv.yaml"}
    assert all(len(h) == 64 for h in first.files().values())

    versions = {first.version}
    (d / "policy.csv").write_text(ALLOW_MH + "# a comment is a change too\n")
    versions.add(CasbinPolicyEngine.load(d).version)
    (d / "valuesets" / "hiv.yaml").write_text("codes: [a, b]\n")
    versions.add(CasbinPolicyEngine.load(d).version)
    (d / "vocabulary.yaml").write_text((d / "vocabulary.yaml").read_text() + "# edited\n")
    versions.add(CasbinPolicyEngine.load(d).version)
    assert len(versions) == 4
    assert first.version == again.version  # a loaded engine never changes


def test_files_is_a_copy(policy_dir) -> None:
    """Callers cannot alter what the engine reports about itself."""
    engine = CasbinPolicyEngine.load(policy_dir(ALLOW_MH))
    engine.files()["policy.csv"] = "tampered"
    assert engine.files()["policy.csv"] != "tampered"


def test_vocabulary_passed_in_is_used(policy_dir, repo_policy_dir: Path) -> None:
    """The runtime loads the vocabulary once and hands it to the engine."""
    from broker.vocabulary import Vocabulary

    d = policy_dir(ALLOW_MH)
    vocab = Vocabulary.load(d)
    assert CasbinPolicyEngine.load(d, vocab).vocabulary is vocab
