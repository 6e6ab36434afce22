"""The Ansible deployment, run for real against this machine with the test inventory.

In the order of docs/deploy.md, "A first VM, in order": a run of the PostgreSQL and
OpenBao plays; OpenBao initialised and unsealed the way an operator would (the keys in
this test's memory only); the whole playbook with the root token for that run only
(the tvgate play runs ``tvgate vault setup``); the root token revoked; the whole
playbook again, which must change nothing. The gateway it deployed then answers
``/readyz`` against PostgreSQL and OpenBao, encrypts a key added with the deployed
``tvgate`` command with Vault's transit engine, and streams a call from the fake
provider through nginx. ``ansible-lint`` passes on the roles and the unit files pass
``systemd-analyze verify``; a variable of the wrong type or choice is refused by the
role's ``meta/argument_specs.yml`` before any task runs, and every role documents and
specifies each of its variables. Everything the playbook started is stopped at the end
(and at the start, if an earlier run was cut short). It needs root (it installs
Debian packages and writes /etc and /opt).

PID 1 is not systemd here: the playbook runs with ``ansible/tests/bin`` first on PATH,
whose ``systemctl`` stands in for systemd's, so that the roles' own systemd tasks and
handlers run as they do on a VM (ansible/tests/README.md).
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
from subprocess import CompletedProcess
from typing import Any

import httpx2
import orjson
import psycopg2
import pytest
import yaml

from tests.conftest import ANTHROPIC_SECRET, ROOT
from tests.fake_provider import FakeProvider

ANSIBLE_DIR = ROOT / "ansible"
ROLES = ("postgresql", "openbao", "tvgate", "nginx")
BIN = Path(sys.executable).parent
# The stand-in for systemctl (ansible/tests/README.md) and where it keeps its state.
SYSTEMCTL = ANSIBLE_DIR / "tests" / "bin" / "systemctl"
SYSTEMCTL_STATE = Path("/run/tvgate-test-systemctl")
UNITS_STARTED = ("tvgate", "nginx", "openbao", "postgresql@15-tvgate_test")
# The ports and paths of ansible/inventories/test/group_vars/all.yml.
GATEWAY = "http://127.0.0.1:18480"
METRICS_PORTS = (18490, 18491)
NGINX = "https://127.0.0.1:18443"
NGINX_CERT = "/etc/nginx/tls/tvgate.crt"
OPENBAO = "https://127.0.0.1:18200"
OPENBAO_CERT = "/etc/openbao/tls/openbao.crt"
BAO = "/opt/openbao/venv/bin/bao"
# The test inventory's install prefix and operators' command (not the roles' defaults).
TVGATE_BIN = "/opt/tvgate-test/venv/bin/tvgate"
TVGATE_CLI = "/usr/local/bin/tvgate-test"
# Where the tvgate role keeps the AppRole credentials `tvgate vault setup` issued.
VAULT_ENV = Path("/etc/tvgate/vault.env")
#: The deployed gateway's output, where the test's systemctl (ansible/tests/bin/systemctl)
#: appends it in place of the journal, across runs.
DEPLOYED_LOG = Path("/var/log/tvgate/tvgate.log")
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
            "PATH": f"{SYSTEMCTL.parent}:{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return env


def ansible(command: str, *args: str, env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """Run an Ansible command in ansible/, its output captured."""
    return subprocess.run(
        [str(BIN / command), *args],
        cwd=ANSIBLE_DIR,
        env={**ansible_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def run_playbook(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[dict[str, int], float]:
    """Run site.yml with the test inventory; the recap counts and the run time."""
    started = time.monotonic()
    result = ansible("ansible-playbook", "-i", "inventories/test", "site.yml", *args, env=env)
    elapsed = time.monotonic() - started
    log.write_text(result.stdout + result.stderr)
    recap = re.search(r"^localhost\s+:\s+(.*)$", result.stdout, re.M)
    assert result.returncode == 0 and recap, f"playbook failed, see {log}:\n{result.stdout[-4000:]}"
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}
    return counts, elapsed


def stop_deployed() -> None:
    """Stop what the playbook started (test machine only): tvgate, nginx, OpenBao, PostgreSQL."""
    subprocess.run(
        [str(SYSTEMCTL), "stop", *UNITS_STARTED], env=ansible_env(), check=True, timeout=180
    )
    shutil.rmtree(SYSTEMCTL_STATE, ignore_errors=True)
    # The test's OpenBao was initialised with throw-away keys, and the AppRole credentials
    # belong to it: start the next run afresh.
    raft = Path("/var/lib/openbao/raft")
    if raft.is_dir():
        for child in raft.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    VAULT_ENV.unlink(missing_ok=True)
    # The next run's log starts empty: test_deployed_logs_are_json reads that run's lines,
    # not what an earlier run on this machine left (its code may have been older).
    DEPLOYED_LOG.unlink(missing_ok=True)


def bao(*args: str, token: str = "") -> str:
    """The deployed ``bao`` command, as an operator on this machine runs it."""
    env = {**ansible_env(), "BAO_ADDR": OPENBAO, "BAO_CACERT": OPENBAO_CERT}
    if token:
        env["BAO_TOKEN"] = token
    result = subprocess.run(
        [BAO, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"bao {args[:2]}: {result.stderr}"
    return result.stdout


def openbao_health() -> httpx2.Response:
    return httpx2.get(OPENBAO + "/v1/sys/health", verify=trusting(OPENBAO_CERT), timeout=10)


def initialise_openbao() -> str:
    """docs/deploy.md, "OpenBao": init and unseal; the root token (keys stay in memory)."""
    health = openbao_health()
    assert health.status_code == 501 and health.json()["initialized"] is False
    init = json.loads(bao("operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"))
    bao("operator", "unseal", init["unseal_keys_b64"][0])
    # Unsealed, the node first answers 429 (standby) until raft has elected it leader.
    deadline = time.monotonic() + 30
    while openbao_health().status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return str(init["root_token"])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    logs = tmp_path_factory.mktemp("ansible")
    stop_deployed()
    try:
        _, bao_time = run_playbook(logs / "openbao.log", "--tags", "postgresql,openbao")
        root_token = initialise_openbao()
        # The root token for this run only, from the environment (not on a command line).
        first, first_time = run_playbook(
            logs / "first.log",
            "-e",
            "tvgate_vault_operator_token={{ lookup('env', 'VAULT_TOKEN') }}",
            env={"VAULT_TOKEN": root_token},
        )
        # As the docs say: the root token goes once the gateway is set up.
        bao("token", "revoke", "-self", token=root_token)
        second, second_time = run_playbook(logs / "second.log")
        figures = {
            "openbao_run_s": round(bao_time, 1),
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
    result = ansible("ansible-lint")
    assert result.returncode == 0, result.stdout + result.stderr


def role_variables(role: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str]:
    """A role's defaults, the options of its argument_specs' main entry point, its README."""
    base = ANSIBLE_DIR / "roles" / role
    defaults = yaml.safe_load((base / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((base / "meta" / "argument_specs.yml").read_text())
    return defaults, specs["argument_specs"]["main"]["options"], (base / "README.md").read_text()


@pytest.mark.parametrize("role", ROLES)
def test_every_role_variable_is_specified_defaulted_and_documented(role: str) -> None:
    defaults, options, readme = role_variables(role)
    # Every default is specified; what has none must be given (required).
    assert set(defaults) <= set(options)
    assert {name for name in options if name not in defaults} == {
        name for name, option in options.items() if option.get("required")
    }
    for name, option in options.items():
        # A default written in the spec is the one defaults/main.yml gives.
        if "default" in option:
            assert option["default"] == defaults[name], name
        assert f"`{name}`" in readme, f"{role}/README.md does not name {name}"
        assert option.get("description"), name
    assert "## Example Playbook" in readme


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        # A choice, in the tvgate play.
        (
            "tvgate_keyring=sideways",
            "value of tvgate_keyring must be one of: local, vault, got: sideways",
        ),
        # A type, in the first play.
        ("postgresql_port=fifty", "argument 'postgresql_port' is of type str"),
        ("nginx_listen_ipv6=perhaps", "argument 'nginx_listen_ipv6' is of type str"),
    ],
)
def test_an_invalid_variable_is_refused_before_any_task(setting: str, refusal: str) -> None:
    role = setting.split("_", 1)[0]
    # With the role's tag, the plays before it run their argument checks (tagged always).
    result = ansible(
        "ansible-playbook", "-i", "inventories/test", "site.yml", "--tags", role, "-e", setting
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "Validation of arguments failed" in output and refusal in output, output[-4000:]
    # Argument checks were all that ran, the refusing role's the last.
    tasks = re.findall(r"^TASK \[(\w+) : (.*?)\]", result.stdout, re.M)
    assert tasks and tasks[-1][0] == role, tasks
    assert all(name.startswith("Validating arguments against arg spec 'main'") for _, name in tasks)


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


def test_the_install_prefix_and_the_command_path_come_from_the_inventory(
    deployed: dict[str, float],
) -> None:
    # The unit and the operators' command run the virtual environment the inventory
    # placed (the test's deployed_cli runs that command, and the role ran migrate with it).
    unit = Path(UNITS[0]).read_text()
    assert f"ExecStart={TVGATE_BIN} --config /etc/tvgate/tvgate.toml serve\n" in unit
    assert Path(TVGATE_CLI).read_text().count(f" {TVGATE_BIN} --config ") == 2
    # Nothing of the role but its defaults names either place.
    role = ANSIBLE_DIR / "roles" / "tvgate"
    for path in [*role.glob("tasks/*.yml"), *role.glob("templates/*"), *role.glob("*/main.yml")]:
        if path.parent.name != "defaults":
            text = path.read_text()
            assert "/usr/local/bin" not in text and "/opt/" not in text, path


def test_deployed_files_are_private(deployed: dict[str, float]) -> None:
    config = Path("/etc/tvgate/tvgate.toml").stat()
    assert (config.st_mode & 0o777, config.st_uid) == (0o640, 0)
    # What `tvgate vault setup` issued: root's only.
    credentials = VAULT_ENV.stat()
    assert (credentials.st_mode & 0o777, credentials.st_uid) == (0o600, 0)


def test_gateway_is_ready_against_postgresql_and_openbao(deployed: dict[str, float]) -> None:
    ready = httpx2.get(GATEWAY + "/readyz", timeout=10).json()
    assert ready["ready"] is True
    # With the vault keyring, "keyring": "ok" means a probe encryption by OpenBao worked.
    assert ready["checks"] == {"database": "ok", "keyring": "ok", "identity": "ok"}
    settings = Path("/etc/tvgate/tvgate.toml").read_text()
    assert 'database_url = "postgresql://' in settings
    assert 'keyring = "vault"' in settings and f'vault_addr = "{OPENBAO}"' in settings
    assert 'vault_ca_cert = "/etc/tvgate/vault-ca.crt"' in settings
    credentials = dict(line.split("=", 1) for line in VAULT_ENV.read_text().splitlines())
    assert f'vault_role_id = "{credentials["TVGATE_VAULT_ROLE_ID"]}"' in settings
    assert f'vault_secret_id = "{credentials["TVGATE_VAULT_SECRET_ID"]}"' in settings
    # The same through nginx, over TLS.
    via_nginx = httpx2.get(NGINX + "/readyz", verify=trusting(NGINX_CERT), timeout=10)
    assert via_nginx.status_code == 200 and via_nginx.json()["ready"] is True


def test_openbao_runs_with_tls_initialised_and_unsealed(deployed: dict[str, float]) -> None:
    health = openbao_health()
    assert health.status_code == 200
    assert health.json()["initialized"] is True and health.json()["sealed"] is False


def deployed_cli(*args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [TVGATE_CLI, *args],
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
    # Encrypted by OpenBao's transit engine, not the local keyring.
    with psycopg2.connect(PG_DSN) as conn, conn.cursor() as cur:
        cur.execute("SELECT ciphertext FROM provider_key WHERE name = %s", (key,))
        (ciphertext,) = cur.fetchone() or ("",)
    assert ciphertext.startswith("vault:v"), ciphertext[:12]
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
    lines = DEPLOYED_LOG.read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "msg"} <= entry.keys()
    assert ANTHROPIC_SECRET not in "\n".join(lines)
