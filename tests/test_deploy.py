"""The Ansible deployment, run for real against this machine with the test inventory.

The playbook runs twice (the second run must change nothing); then the gateway
it deployed answers ``/readyz`` against PostgreSQL, and streams a call from the
fake provider through nginx with a user, token, key and route made with the
deployed ``tvgate`` command. OpenBao is initialised and unsealed the way an
operator would. ``ansible-lint`` passes on the roles and the unit files pass
``systemd-analyze verify``. Everything the playbook started is stopped at the
end. It needs root (it installs Debian packages and writes /etc and /opt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import psycopg2
import pytest

from tests.conftest import ANTHROPIC_SECRET, ROOT
from tests.fake_provider import FakeProvider

ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent
# The ports and paths of ansible/inventories/test/group_vars/all.yml.
GATEWAY = "http://127.0.0.1:18480"
METRICS_PORTS = (18490, 18491)
NGINX = "https://127.0.0.1:18443"
NGINX_CERT = "/etc/nginx/tls/tvgate.crt"
OPENBAO = "https://127.0.0.1:18200"
OPENBAO_CERT = "/etc/openbao/tls/openbao.crt"
PG_DSN = (
    "host=127.0.0.1 port=55433 user=tvgate dbname=tvgate password=test-only-password-not-secret"
)
UNITS = ("/etc/systemd/system/tvgate.service", "/etc/systemd/system/openbao.service")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="deploys to this machine: needs root")


def trusting(cafile: str) -> ssl.SSLContext:
    """A TLS context that trusts one of the self-signed certificates the roles generated."""
    return ssl.create_default_context(cafile=cafile)


def ansible_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVGATE_", "VAULT_", "BAO_"))}
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "PY_COLORS": "0",
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return env


def run_playbook(log: Path) -> tuple[dict[str, int], float]:
    """Run site.yml with the test inventory; the recap counts and the run time."""
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "inventories/test", "site.yml"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    elapsed = time.monotonic() - started
    log.write_text(result.stdout + result.stderr)
    recap = re.search(r"^localhost\s+:\s+(.*)$", result.stdout, re.M)
    assert result.returncode == 0 and recap, f"playbook failed, see {log}:\n{result.stdout[-4000:]}"
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}
    return counts, elapsed


def stop_deployed() -> None:
    """Stop what the playbook started (test machine only): tvgate, nginx, OpenBao, PostgreSQL."""
    ssd = shutil.which("start-stop-daemon") or "/usr/sbin/start-stop-daemon"
    for pidfile, schedule in (
        ("/run/tvgate.pid", "TERM/30/KILL/5"),
        ("/run/nginx.pid", "QUIT/10/TERM/5/KILL/5"),
        ("/run/openbao.pid", "INT/30/KILL/5"),
    ):
        if Path(pidfile).exists():
            subprocess.run(
                [
                    ssd,
                    "--stop",
                    "--quiet",
                    "--pidfile",
                    pidfile,
                    "--remove-pidfile",
                    "--retry",
                    schedule,
                ],
                check=False,
                timeout=60,
            )
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "tvgate_test", "stop"],
        check=False,
        capture_output=True,
        timeout=60,
    )
    # The test's OpenBao was initialised with throw-away keys: start the next run afresh.
    raft = Path("/var/lib/openbao/raft")
    if raft.is_dir():
        for child in raft.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    logs = tmp_path_factory.mktemp("ansible")
    try:
        first, first_time = run_playbook(logs / "first.log")
        second, second_time = run_playbook(logs / "second.log")
        figures = {
            "first_run_s": round(first_time, 1),
            "first_changed": first["changed"],
            "second_run_s": round(second_time, 1),
            "second_changed": second["changed"],
            "second_failed": second["failed"],
        }
        print(f"\ndeploy figures: {json.dumps(figures)}")
        yield figures
    finally:
        stop_deployed()


def test_the_second_run_changes_nothing(deployed: dict[str, float]) -> None:
    assert deployed["second_failed"] == 0
    assert deployed["second_changed"] == 0


def test_ansible_lint_passes() -> None:
    result = subprocess.run(
        [str(BIN / "ansible-lint")],
        cwd=ANSIBLE_DIR,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_files_pass_systemd_analyze_verify(deployed: dict[str, float]) -> None:
    for unit in UNITS:
        result = subprocess.run(
            ["systemd-analyze", "verify", unit], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{unit}: {result.stdout}{result.stderr}"
        text = Path(unit).read_text()
        for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes"):
            assert hardening in text, (unit, hardening)
    assert "ReadWritePaths=/var/lib/tvgate\n" in Path(UNITS[0]).read_text()


def test_deployed_files_are_private(deployed: dict[str, float]) -> None:
    config = Path("/etc/tvgate/tvgate.toml")
    assert config.stat().st_mode & 0o777 == 0o640
    assert oct(Path("/var/lib/tvgate/master.key").stat().st_mode & 0o777) == "0o600"


def test_gateway_is_ready_against_postgresql(deployed: dict[str, float]) -> None:
    ready = httpx2.get(GATEWAY + "/readyz", timeout=10).json()
    assert ready["ready"] is True
    assert ready["checks"] == {"database": "ok", "keyring": "ok", "identity": "ok"}
    assert 'database_url = "postgresql://' in Path("/etc/tvgate/tvgate.toml").read_text()
    # The same through nginx, over TLS.
    via_nginx = httpx2.get(NGINX + "/readyz", verify=trusting(NGINX_CERT), timeout=10)
    assert via_nginx.status_code == 200 and via_nginx.json()["ready"] is True


def test_openbao_runs_with_tls_and_the_operator_initialises_it(deployed: dict[str, float]) -> None:
    env = {
        **ansible_env(),
        "BAO_ADDR": OPENBAO,
        "BAO_CACERT": OPENBAO_CERT,
    }
    health = httpx2.get(OPENBAO + "/v1/sys/health", verify=trusting(OPENBAO_CERT), timeout=10)
    assert health.status_code == 501 and health.json()["initialized"] is False
    # docs/deploy.md, "OpenBao": init and unseal from the operator's machine. Here the
    # keys live in this test's memory only.
    bao = "/opt/openbao/venv/bin/bao"
    init = subprocess.run(
        [bao, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    unseal_key = json.loads(init.stdout)["unseal_keys_b64"][0]
    subprocess.run(
        [bao, "operator", "unseal", unseal_key],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    # Unsealed, the node first answers 429 (standby) until raft has elected it leader.
    deadline = time.monotonic() + 30
    while True:
        health = httpx2.get(OPENBAO + "/v1/sys/health", verify=trusting(OPENBAO_CERT), timeout=10)
        if health.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert health.status_code == 200 and health.json()["sealed"] is False


def deployed_cli(*args: str, stdin: str = "") -> str:
    result = subprocess.run(
        ["/usr/local/bin/tvgate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TVGATE_")},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_stream_through_nginx_from_the_deployed_gateway(
    deployed: dict[str, float], fake_provider: FakeProvider
) -> None:
    suffix = uuid.uuid4().hex[:8]
    email, key, route = f"dev-{suffix}@deploy.test", f"fake-{suffix}", f"claude-{suffix}"
    deployed_cli("users", "add", email, "--org", "default")
    token = deployed_cli("tokens", "issue", email, "--org", "default").strip()
    added = deployed_cli(
        "keys",
        "add",
        key,
        "--provider",
        "anthropic",
        "--org",
        "default",
        "--base-url",
        fake_provider.url,
        stdin=ANTHROPIC_SECRET + "\n",
    )
    assert ANTHROPIC_SECRET not in added
    deployed_cli(
        "routes", "add", route, "--key", key, "--model", "claude-upstream-1", "--org", "default"
    )

    session = str(uuid.uuid4())
    body = {
        "model": route,
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
    }
    headers = {
        "x-api-key": token,
        "anthropic-version": "2023-06-01",
        "x-fake-scenario": "drip",
        "x-fake-interval": "0.3",
        "x-fake-events": "5",
        "X-Claude-Code-Session-Id": session,
    }
    deltas: list[float] = []
    lines: list[str] = []
    with (
        httpx2.Client(base_url=NGINX, verify=trusting(NGINX_CERT), timeout=60) as client,
        client.stream(
            "POST", "/v1/messages", content=orjson.dumps(body), headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: content_block_delta"):
                deltas.append(time.monotonic())
            lines.append(line)
    assert len(deltas) == 5 and "event: message_stop" in lines
    # nginx relays each event as it comes (proxy_buffering off): the five deltas, sent
    # 0.3 s apart, do not arrive together at the end.
    assert deltas[-1] - deltas[0] > 0.6

    # The call is traced in PostgreSQL, and counted by the worker that served it.
    deadline = time.monotonic() + 15
    while True:
        with psycopg2.connect(PG_DSN) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT outcome, output_tokens FROM trace WHERE session_id = %s", (session,)
            )
            rows = cur.fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows == [("ok", 5)]
    counted = 0.0
    for port in METRICS_PORTS:
        text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        match = re.search(
            rf'^tvgate_requests_total\{{route="{route}",status="200",outcome="ok"\}} (\S+)$',
            text,
            re.M,
        )
        counted += float(match.group(1)) if match else 0.0
    assert counted == 1
    # /metrics is not public through nginx... except from the monitoring networks, which
    # in the test inventory is this machine.
    assert httpx2.get(NGINX + "/metrics", verify=trusting(NGINX_CERT), timeout=5).status_code == 200


def test_deployed_logs_are_json(deployed: dict[str, float]) -> None:
    lines = Path("/var/log/tvgate/tvgate.log").read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "msg"} <= entry.keys()
    assert ANTHROPIC_SECRET not in "\n".join(lines)
