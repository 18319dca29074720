"""Safe reload: only a candidate that loads, lints and passes its cases replaces the policy in force."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from broker.app import create_app
from broker.auth.keys import BrokerKey
from broker.policy.reload import PolicyReloader, install_sighup, watch
from broker.runtime import Runtime, build_runtime
from broker.store.db import upgrade
from broker.store.models import PolicyVersion
from tests.policy.copies import (
    CW_MH_COC_ALLOW,
    MH_TREAT_ALLOW,
    UNKNOWN_ROLE_LINE,
    append_line,
    copy_policies,
    remove_line,
)
from tests.scenarios.harness import AGENCIES, PUBLIC_URL, Broker, make_settings, seed, write_key

MH_TREAT = dict(role="mental-health-clinician", category="general-health", purpose="TREAT",
                grounds=frozenset({"mdt-member"}))


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """An editable copy of the shipped policy with the spotlight cases."""
    return copy_policies(tmp_path / "policies")


@pytest.fixture
async def runtime(tmp_path: Path, policies: Path) -> Runtime:
    """A runtime (no sources) on SQLite, built from the copy."""
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    upgrade(url)
    rt = build_runtime(make_settings(tmp_path, url, "http://127.0.0.1:1", policy_dir=policies, sources=[]))
    yield rt
    await rt.aclose()


def _reloader(runtime: Runtime, policies: Path) -> PolicyReloader:
    return PolicyReloader(runtime, policy_dir=policies, override=None)


def test_valid_edit_is_swapped_in_and_recorded(runtime, policies) -> None:
    """The new version decides from now on and has its PolicyVersion row."""
    old = runtime.policy
    assert old.decide(**MH_TREAT).allowed
    remove_line(policies, MH_TREAT_ALLOW)
    result = _reloader(runtime, policies).reload("test")
    assert result.accepted and result.errors == []
    assert result.version == runtime.policy.version != old.version
    assert not runtime.policy.decide(**MH_TREAT).allowed
    with runtime.sessions() as s:
        row = s.get(PolicyVersion, result.version)
        assert row is not None and row.files == runtime.policy.files()


def test_unchanged_files_are_a_no_op(runtime, policies) -> None:
    """Reloading the same bytes keeps the same engine (and its warm decision cache)."""
    engine = runtime.policy
    result = _reloader(runtime, policies).reload("test")
    assert result.accepted and result.version == engine.version and runtime.policy is engine


def test_unknown_role_is_refused_with_file_and_line(runtime, policies) -> None:
    """A load error keeps the last good policy and logs where to fix it."""
    engine = runtime.policy
    line = append_line(policies, UNKNOWN_ROLE_LINE)
    with capture_logs() as logs:
        result = _reloader(runtime, policies).reload("test")
    assert not result.accepted and runtime.policy is engine and result.version == engine.version
    location = f"{policies / 'policy.csv'}:{line}"
    assert result.errors and result.errors[0].startswith(location) and "unknown role" in result.errors[0]
    refused = [e for e in logs if e["event"] == "policy_reload_refused"]
    assert refused == [{"event": "policy_reload_refused", "log_level": "warning", "source": "test",
                        "policy_version": engine.version, "error_type": "PolicyError",
                        "policy_location": location}]


def test_edit_that_breaks_a_policy_case_is_refused(runtime, policies) -> None:
    """A rule set that loads but contradicts counsel's cases never goes into force."""
    engine = runtime.policy
    remove_line(policies, CW_MH_COC_ALLOW)
    with capture_logs() as logs:
        result = _reloader(runtime, policies).reload("test")
    assert not result.accepted and runtime.policy is engine
    assert result.candidate_version not in (None, engine.version)
    assert any("child-welfare-worker/mental-health/COC/[mdt-member] (spotlight.yaml): expected allow" in e
               for e in result.errors), result.errors
    assert {e["error_type"] for e in logs if e["event"] == "policy_reload_refused"} == {"PolicyCaseFailed"}
    with runtime.sessions() as s:
        assert s.get(PolicyVersion, result.candidate_version) is None


def test_same_edit_is_accepted_without_cases(runtime, policies) -> None:
    """run_cases=False is the only way past the cases (so the refusal above is the cases' doing)."""
    remove_line(policies, CW_MH_COC_ALLOW)
    result = PolicyReloader(runtime, policy_dir=policies, run_cases=False).reload("test")
    assert result.accepted and runtime.policy.version == result.version


def test_lint_error_is_refused(runtime, policies) -> None:
    """An allow that a new deny always overrides is a lint error: refused with the lint's file:line."""
    engine = runtime.policy
    line = append_line(policies, 'p, mental-health-clinician, general-health, *, *, deny, "County Res. 1"')
    result = _reloader(runtime, policies).reload("test")
    assert not result.accepted and runtime.policy is engine
    assert any("policy.csv:" in e for e in result.errors), result.errors
    assert str(line) in " ".join(result.errors)


def test_vocabulary_change_needs_a_restart(runtime, policies) -> None:
    """Categories and labels also shape classification, so a vocabulary edit is refused at reload."""
    engine = runtime.policy
    vocab = policies / "vocabulary.yaml"
    vocab.write_text(vocab.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    result = _reloader(runtime, policies).reload("test")
    assert not result.accepted and runtime.policy is engine
    assert result.errors == ["vocabulary.yaml: changed; the vocabulary and value sets take effect only on restart"]


async def test_sighup_triggers_a_reload(runtime, policies) -> None:
    """SIGHUP sent to this very process reloads the edited files."""
    old = runtime.policy.version
    reloader = _reloader(runtime, policies)
    uninstall = install_sighup(reloader, asyncio.get_running_loop())
    try:
        remove_line(policies, MH_TREAT_ALLOW)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: runtime.policy.version != old)
    finally:
        uninstall()
    assert not runtime.policy.decide(**MH_TREAT).allowed


async def test_watcher_notices_a_change_and_skips_a_refused_one(runtime, policies) -> None:
    """The poller reloads on a content change; a refused version is not retried until it changes again."""
    old = runtime.policy.version
    reloader = _reloader(runtime, policies)
    calls: list[str] = []
    original = reloader.reload

    def counting(reason: str):  # type: ignore[no-untyped-def]
        calls.append(reason)
        return original(reason)

    reloader.reload = counting  # type: ignore[method-assign]
    task = asyncio.create_task(watch(reloader, interval=0.02))
    try:
        await asyncio.sleep(0.2)
        assert calls == [], "nothing changed: nothing to reload"
        remove_line(policies, MH_TREAT_ALLOW)
        await _until(lambda: runtime.policy.version != old)
        good = runtime.policy.version
        append_line(policies, UNKNOWN_ROLE_LINE)
        await _until(lambda: len(calls) == 2)
        await asyncio.sleep(0.2)
        assert calls == ["watch", "watch"] and runtime.policy.version == good
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_admin_route_reloads_and_refuses_other_roles(tmp_path, policies) -> None:
    """POST /policy/reload: 403 for line staff, the ReloadResult for a registry admin; both audited."""
    from broker.api import policy_admin

    url = f"sqlite:///{tmp_path / 'broker.sqlite'}"
    keys = {a: BrokerKey.from_pem(write_key(tmp_path / f"{a}.pem").read_bytes()) for a in AGENCIES}
    seed(url, keys)
    rt = build_runtime(make_settings(tmp_path, url, "http://127.0.0.1:1", policy_dir=policies, sources=[]))
    app = create_app(runtime=rt)
    app.include_router(policy_admin.router)
    b = Broker(runtime=rt, client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL),
               keys=keys)
    try:
        old = rt.policy.version
        remove_line(policies, MH_TREAT_ALLOW)
        staff = await b.client.post("/policy/reload", headers={"Authorization": f"Bearer {await b.token('cw')}"})
        assert staff.status_code == 403 and rt.policy.version == old
        assert (await b.client.post("/policy/reload")).status_code == 401
        admin = {"Authorization": f"Bearer {await b.token('admin')}"}
        ok = await b.client.post("/policy/reload", headers=admin)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"accepted": True, "version": rt.policy.version, "errors": [],
                             "candidate_version": rt.policy.version}
        assert rt.policy.version != old
        append_line(policies, UNKNOWN_ROLE_LINE)
        refused = await b.client.post("/policy/reload", headers=admin)
        assert refused.status_code == 422 and refused.json()["accepted"] is False
        assert refused.json()["version"] == rt.policy.version and "unknown role" in refused.json()["errors"][0]
        from broker.audit.verify import verify_chain

        assert verify_chain(rt.sessions).ok
        with rt.sessions() as s:
            from sqlalchemy import select

            from broker.store.models import AuditEventRow

            outcomes = [(r.action, r.outcome) for r in s.scalars(select(AuditEventRow).order_by(AuditEventRow.seq))
                        if r.action == "policy.reload"]
        assert outcomes == [("policy.reload", 403), ("policy.reload", 401), ("policy.reload", 200),
                            ("policy.reload", 422)]
    finally:
        await b.aclose()


async def _until(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for a condition the event loop makes true, or fail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
