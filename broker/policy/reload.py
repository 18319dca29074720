"""Versioned safe reload: a new policy goes into force only after it loads, lints and passes its cases.

``PolicyReloader.reload`` builds a candidate engine from the files on disk, lints it
(``broker.policy.lint``), runs the YAML policy cases of ``<policy_dir>/tests/`` against it
(``broker.policy.cases``), records its ``PolicyVersion`` row, and only then replaces ``runtime.policy``.
Anything wrong keeps the last good engine in force and logs the refusal with the file and
line to fix. Reloads are serialized by a lock; the swap itself runs on the serving event loop
(when one is bound) so that no request can mix decisions from two versions.

Triggers: ``install_sighup`` (SIGHUP), ``watch`` (polls the policy files) and the admin route
``POST /policy/reload`` (broker/api/policy_admin.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.exc import IntegrityError

from broker.policy.engine import MODEL_FILE, POLICY_FILE, VALUESET_DIR, CasbinPolicyEngine
from broker.policy.errors import PolicyError
from broker.policy.layers import OVERRIDE_PREFIX
from broker.store.models import PolicyVersion
from broker.vocabulary import VOCABULARY_FILE

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = structlog.get_logger("broker.policy.reload")

CASES_DIR = "tests"
LOCATION_KEY = "policy_location"
"""Log key carrying ``file:line`` of a refusal (must be in broker.observability.LOG_KEYS)."""
MAX_LOGGED_PROBLEMS = 20
SWAP_TIMEOUT = 30.0


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``version`` is the one in force afterwards (the old one when refused)."""

    accepted: bool
    version: str
    errors: list[str] = field(default_factory=list)
    candidate_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON body for the admin route."""
        return {"accepted": self.accepted, "version": self.version, "errors": list(self.errors),
                "candidate_version": self.candidate_version}


@dataclass(frozen=True)
class Problem:
    """One reason to refuse a candidate, with the file:line counsel must fix when known."""

    error_type: str
    message: str
    location: str | None = None

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class PolicyReloader:
    """Swaps ``runtime.policy`` for a verified candidate; thread-safe (one reload at a time)."""

    def __init__(self, runtime: Runtime, *, policy_dir: Path, override: Path | None = None,
                 run_cases: bool = True, cases_dir: Path | None = None) -> None:
        self.runtime = runtime
        self.policy_dir = Path(policy_dir)
        self.override = Path(override) if override is not None else None
        self.run_cases = run_cases
        self.cases_dir = Path(cases_dir) if cases_dir is not None else self.policy_dir / CASES_DIR
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Swap on this loop's thread from now on, so a request never sees two engines."""
        self._loop = loop

    def watched_files(self) -> dict[str, Path]:
        """Name (as in ``engine.files()``) → path of every file the policy version covers."""
        files = {name: self.policy_dir / name for name in (MODEL_FILE, POLICY_FILE, VOCABULARY_FILE)}
        valuesets = self.policy_dir / VALUESET_DIR
        if valuesets.is_dir():
            for path in sorted(valuesets.glob("*.yaml")):
                files[path.relative_to(self.policy_dir).as_posix()] = path
        if self.override is not None:
            files[OVERRIDE_PREFIX + self.override.name] = self.override
        return files

    async def areload(self, reason: str) -> ReloadResult:
        """``reload`` in a worker thread, swapping on the calling loop."""
        self.bind_loop(asyncio.get_running_loop())
        return await asyncio.to_thread(self.reload, reason)

    def reload(self, reason: str) -> ReloadResult:
        """Load, lint and test a candidate; swap it in only if all pass, else keep the last good one."""
        with self._lock:
            current = self.runtime.policy
            try:
                candidate = CasbinPolicyEngine.load(self.policy_dir, None, override=self.override)
            except PolicyError as err:
                return self._refuse(reason, current.version, None, [_from_policy_error(err)])
            except Exception as err:  # any surprise is a refusal, never a half-loaded policy
                return self._refuse(reason, current.version, None, [Problem(type(err).__name__, "load failed")])
            if candidate.version == current.version:
                return ReloadResult(accepted=True, version=current.version, candidate_version=candidate.version)
            problems = _restart_only_changes(current.files(), candidate.files())
            try:
                problems += self._lint()
                if self.run_cases and not problems:
                    problems += run_policy_cases(candidate, self.cases_dir)
            except Exception as err:  # a checker that cannot run has not passed the candidate
                problems.append(Problem(type(err).__name__, "the policy checks could not run"))
            if problems:
                return self._refuse(reason, current.version, candidate.version, problems)
            try:
                record_version(self.runtime, candidate)
                self._swap(candidate)
            except Exception as err:
                return self._refuse(reason, current.version, candidate.version,
                                    [Problem(type(err).__name__, "could not record or install the version")])
            log.info("policy_reloaded", source=reason, policy_version=candidate.version)
            return ReloadResult(accepted=True, version=candidate.version, candidate_version=candidate.version)

    def _lint(self) -> list[Problem]:
        """The colleague's linter when installed; the loader's PolicyError covers the rest."""
        try:
            from broker.policy.lint import lint
        except ModuleNotFoundError as err:
            if err.name in ("broker.policy.lint",):
                return []
            raise
        report = lint(self.policy_dir, override=self.override)
        return [_from_lint(item) for item in getattr(report, "errors", ())]

    def _swap(self, candidate: CasbinPolicyEngine) -> None:
        """Assign ``runtime.policy`` on the serving loop's thread (atomic for every request)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or _on_loop_thread(loop):
            self.runtime.policy = candidate
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def swap() -> None:
            self.runtime.policy = candidate
            done.set_result(None)

        loop.call_soon_threadsafe(swap)
        done.result(timeout=SWAP_TIMEOUT)

    def _refuse(self, reason: str, version: str, candidate: str | None, problems: list[Problem]) -> ReloadResult:
        """Keep the version in force; log each problem with its file:line (allow-listed keys only)."""
        for problem in problems[:MAX_LOGGED_PROBLEMS]:
            log.warning("policy_reload_refused", source=reason, policy_version=version,
                        error_type=problem.error_type, **{LOCATION_KEY: problem.location})
        return ReloadResult(accepted=False, version=version, errors=[str(p) for p in problems],
                            candidate_version=candidate)


def record_version(runtime: Runtime, engine: CasbinPolicyEngine) -> None:
    """A PolicyVersion row for every version that goes into force (idempotent across processes)."""
    with runtime.sessions() as session:
        if session.get(PolicyVersion, engine.version) is not None:
            return
        session.add(PolicyVersion(hash=engine.version, loaded_at=datetime.now(timezone.utc), files=engine.files()))
        try:
            session.commit()
        except IntegrityError:  # another broker process recorded it first
            session.rollback()


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _from_policy_error(err: PolicyError) -> Problem:
    location = err.file if err.line is None else f"{err.file}:{err.line}"
    return Problem("PolicyError", err.message, location)


def _from_lint(item: Any) -> Problem:
    """A lint finding, whatever its shape: prefer its own file and line."""
    file, line = getattr(item, "file", None), getattr(item, "line", None)
    message = getattr(item, "message", None) or str(item)
    location = None if file is None else (str(file) if line is None else f"{file}:{line}")
    return Problem("LintError", str(message), location)


def _restart_only_changes(current: dict[str, str], candidate: dict[str, str]) -> list[Problem]:
    """The vocabulary and value sets also shape classification and labels: they need a restart."""
    problems = []
    for name in sorted(set(current) | set(candidate)):
        restart_only = name == VOCABULARY_FILE or name.startswith(VALUESET_DIR + "/")
        if restart_only and current.get(name) != candidate.get(name):
            problems.append(Problem("RestartRequired", "changed; the vocabulary and value sets take effect "
                                                       "only on restart", name))
    return problems


# ---- policy cases ---------------------------------------------------------------------------------

def run_policy_cases(engine: CasbinPolicyEngine, case_dir: Path) -> list[Problem]:
    """Every YAML case of ``case_dir`` (broker.policy.cases) against ``engine``; no cases is a refusal."""
    from broker.policy import cases

    case_dir = Path(case_dir)
    if not case_dir.is_dir() or not any(case_dir.glob("*.yaml")):
        return [Problem("PolicyCaseFailed", "no policy cases to prove the candidate", str(case_dir))]
    try:
        tables = cases.load_tables(case_dir, engine.vocabulary)
    except (cases.SpecError, KeyError, TypeError, OSError) as err:
        return [Problem("PolicyCaseSpecError", f"malformed case table ({type(err).__name__}: {err})", str(case_dir))]
    locations = {tuple(r.fields): _rule_location(r) for r in engine.rules if r.ptype == "p"}
    problems = []
    for failure in cases.run(engine, tables.all):
        rule = failure.decision.rule
        where = locations.get(tuple(rule)) if rule else None
        problems.append(Problem("PolicyCaseFailed", failure.message,
                                where or f"{CASES_DIR}/{failure.case.source}"))
    return problems


def _rule_location(rule: Any) -> str:
    """``file:line`` of a rule (override rules name their own file)."""
    location = getattr(rule, "location", None)
    return location or f"{POLICY_FILE}:{rule.line}"


# ---- triggers -------------------------------------------------------------------------------------

def install_sighup(reloader: PolicyReloader, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Reload on SIGHUP (the Unix convention for "re-read your configuration"); returns the uninstaller."""
    reloader.bind_loop(loop)
    tasks: set[asyncio.Task[ReloadResult]] = set()

    def on_hup() -> None:
        task = loop.create_task(reloader.areload("sighup"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


async def watch(reloader: PolicyReloader, interval: float = 1.0) -> None:
    """Poll the policy files (mtime, size, then sha256) and reload when their content changes; runs until cancelled."""
    reloader.bind_loop(asyncio.get_running_loop())
    stats: dict[str, tuple[int, int, str]] = {}
    attempted: dict[str, str] | None = None
    while True:
        try:
            digests = await asyncio.to_thread(_fingerprint, reloader.watched_files(), stats)
            if digests != reloader.runtime.policy.files() and digests != attempted:
                attempted = digests
                await reloader.areload("watch")
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a watcher that dies silently is worse than one that logs and retries
            log.warning("policy_watch_failed", error_type=type(err).__name__)
        await asyncio.sleep(interval)


def _fingerprint(files: dict[str, Path], stats: dict[str, tuple[int, int, str]]) -> dict[str, str]:
    """sha256 per file, rehashing only files whose mtime or size moved (``stats`` is the cache)."""
    digests: dict[str, str] = {}
    for name, path in files.items():
        try:
            st = path.stat()
        except OSError:
            stats.pop(name, None)
            digests[name] = "missing"
            continue
        cached = stats.get(name)
        if cached is None or cached[:2] != (st.st_mtime_ns, st.st_size):
            cached = (st.st_mtime_ns, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            stats[name] = cached
        digests[name] = cached[2]
    return digests
