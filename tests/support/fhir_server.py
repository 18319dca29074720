"""Start the Node FHIR R4 test server (tests/fhir_server) on a free loopback port."""

from __future__ import annotations

import os
import pathlib
import selectors
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from tests.support.ports import free_port

SERVER_DIR = pathlib.Path(__file__).resolve().parent.parent / "fhir_server"
START_TIMEOUT_S = 30.0
NPM_TIMEOUT_S = 300.0
_PORT_ATTEMPTS = 3


@dataclass
class RunningFhirServer:
    """A started server; ``stop()`` ends it with SIGTERM (SIGKILL after 5 s)."""

    base_url: str
    port: int
    process: subprocess.Popen = field(repr=False)
    _stderr: object = field(repr=False)

    def stop(self) -> None:
        """End the server process and close its log file."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout:
            self.process.stdout.close()
        self._stderr.close()


def ensure_node_modules() -> None:
    """Install the pinned packages from package-lock.json if they are not there yet."""
    if (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH; Node 20 is needed for the FHIR test server")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=SERVER_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm ci failed in {SERVER_DIR}:\n{result.stderr[-4000:]}")


def start_fhir_server(seed_files: list[pathlib.Path]) -> RunningFhirServer:
    """Start a seeded server and wait for its READY line; raise with its stderr on failure."""
    ensure_node_modules()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH; Node 20 is needed for the FHIR test server")
    seeds = [str(pathlib.Path(p).resolve()) for p in seed_files]
    last_error = ""
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        stderr = tempfile.TemporaryFile(mode="w+b")
        args = [node, "server.mjs", "--port", str(port)]
        for seed in seeds:
            args += ["--seed", seed]
        proc = subprocess.Popen(args, cwd=SERVER_DIR, stdout=subprocess.PIPE, stderr=stderr, env=os.environ.copy())
        if _wait_ready(proc, port):
            return RunningFhirServer(
                base_url=f"http://127.0.0.1:{port}/fhir/R4", port=port, process=proc, _stderr=stderr
            )
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        if proc.stdout:
            proc.stdout.close()
        stderr.seek(0)
        last_error = stderr.read().decode("utf-8", "replace")
        stderr.close()
        if "EADDRINUSE" not in last_error:  # only a lost port race is worth another try
            break
    raise RuntimeError(f"FHIR test server did not become ready within {START_TIMEOUT_S:g} s:\n{last_error}")


def _wait_ready(proc: subprocess.Popen, port: int) -> bool:
    """True once the process prints ``READY <port>``; False if it exits or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=min(0.2, max(0.0, deadline - time.monotonic()))):
                if proc.poll() is not None:
                    return False
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return False
            buffer += chunk
            if f"READY {port}\n".encode() in buffer:
                return True
    return False
