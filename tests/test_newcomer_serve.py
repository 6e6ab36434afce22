"""A newcomer's mistakes with ``tvgate serve`` and its settings (issue 22, items 1 and 8).

A second ``serve`` on a taken address must fail with one line naming the process that
holds it, before it creates a database or prints a first admin's token; misspelled
``TVGATE_`` variables are warned about; a bad log level or port is a one-line error;
the private-upstream refusal names the setting that allows it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    ROOT,
    GatewayProcess,
    free_port,
    gateway_env,
    gateway_process,
    seed,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tvgate import services


def launch(data_dir: Path, fake: FakeProvider, **extra_env: str) -> GatewayProcess:
    """A seeded SQLite gateway of this test's own on a free port."""
    database_url = f"sqlite:///{data_dir / 'tvgate.db'}"
    tokens = seed(database_url, data_dir, fake)
    env = gateway_env(database_url, data_dir, 0, **extra_env)
    return gateway_process(env, tokens, data_dir / "tvgate.log")


def fresh_env(data_dir: Path, listen: str, **extra: str) -> dict[str, str]:
    """The environment of a first start on an empty data directory (a new admin's token
    would be printed), on ``listen``."""
    env = gateway_env(f"sqlite:///{data_dir / 'tvgate.db'}", data_dir, 0)
    env["TVGATE_LISTEN"] = listen
    del env["TVGATE_MASTER_KEY"]
    return {**env, **extra}


def serve(env: dict[str, str], *args: str) -> tuple[int | None, str, str]:
    """Run ``tvgate serve``; its exit code (None: it was still serving after 30 s, and was
    stopped), stdout and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvgate.cli", "serve", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=30)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        return None, stdout, stderr


def serving_pids(url: str, connections: int = 30) -> set[int]:
    """The pids that answered ``/healthz`` on that many new connections."""
    return {httpx2.get(url + "/healthz", timeout=5).json()["pid"] for _ in range(connections)}


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize(("first_workers", "second_workers"), [("2", "2"), ("2", "1"), ("1", "2")])
def test_a_second_serve_on_a_taken_port_fails_with_one_line_and_prints_no_token(
    tmp_path: Path, fake_provider: FakeProvider, first_workers: str, second_workers: str
) -> None:
    first = launch(tmp_path / "first", fake_provider, TVGATE_WORKERS=first_workers)
    try:
        listen = first.env["TVGATE_LISTEN"]
        second_dir = tmp_path / "second"
        code, stdout, stderr = serve(fresh_env(second_dir, listen), "--workers", second_workers)
        assert code == 1, f"second serve: exit {code}\nstdout: {stdout}\nstderr: {stderr}"
        assert stderr.splitlines() == [
            f"tvgate: {listen} is already in use (pid {first.proc.pid}: tvgate serve); "
            "stop it or set TVGATE_LISTEN"
        ]
        assert "Traceback" not in stdout + stderr
        # It stopped before creating a database and a first admin for its data directory.
        assert "tvg_" not in stdout + stderr
        assert not (second_dir / "tvgate.db").exists()
        # Every connection still reaches the first gateway, and only it.
        pids = serving_pids(first.url)
        assert all(pid == first.proc.pid or parent_of(pid) == first.proc.pid for pid in pids)
    finally:
        stop_gateway(first.proc)


def test_a_port_held_by_another_program_names_it_without_its_arguments(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        listen = f"127.0.0.1:{other.getsockname()[1]}"
        code, stdout, stderr = serve(fresh_env(tmp_path / "data", listen), "--workers", "2")
    program = Path("/proc/self/comm").read_text().strip()
    assert code == 1, f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert stderr.splitlines() == [
        f"tvgate: {listen} is already in use (pid {os.getpid()}: {program}); "
        "stop it or set TVGATE_LISTEN"
    ]
    assert "tvg_" not in stdout


@pytest.fixture(scope="module")
def strict_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProvider
) -> Iterator[GatewayProcess]:
    """A gateway with both private-upstream switches off, started with a misspelled
    setting and with the project's own TVGATE_ variables that are not settings."""
    gw = launch(
        tmp_path_factory.mktemp("strict"),
        fake_provider,
        TVGATE_ALLOW_PRIVATE_UPSTREAMS="false",
        TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS="false",
        TVGATE_LISTN="127.0.0.1:8081",
        TVGATE_TOKEN="tvg_placeholder",  # what users export for their tools
        TVGATE_TEST_PG_DSN="postgresql://postgres@127.0.0.1:5432/postgres",
    )
    yield gw
    stop_gateway(gw.proc)


def test_an_unknown_tvgate_variable_is_warned_about_at_start(
    strict_gateway: GatewayProcess,
) -> None:
    lines = strict_gateway.log_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    warnings = [e["msg"] for e in entries if e["level"] == "warning"]
    assert "ignoring TVGATE_LISTN: no such setting (did you mean TVGATE_LISTEN?)" in warnings
    # The project's own non-setting variables are not mistakes.
    assert not [w for w in warnings if "TVGATE_TOKEN" in w or "TVGATE_TEST_PG_DSN" in w]


def test_the_private_upstream_refusal_names_the_setting(strict_gateway: GatewayProcess) -> None:
    strict_gateway.bind()
    services.set_policy("acme", allow_user_keys=True)
    cases = [
        ("admin@acme.test", "https://127.0.0.1", "TVGATE_ALLOW_PRIVATE_UPSTREAMS"),
        ("admin@acme.test", "http://api.example.com", "TVGATE_ALLOW_PRIVATE_UPSTREAMS"),
        ("dev@acme.test", "https://10.0.0.1", "TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS"),
    ]
    for index, (who, base_url, setting) in enumerate(cases):
        response = httpx2.post(
            strict_gateway.url + "/api/v1/keys",
            headers={"Authorization": f"Bearer {strict_gateway.tokens[who]}"},
            json={
                "name": f"private-{index}",
                "provider": "anthropic",
                "secret": ANTHROPIC_SECRET,
                "base_url": base_url,
            },
            timeout=30,
        )
        assert response.status_code == 400, response.text
        assert f"({setting} is off)" in response.json()["error"]["message"], response.text


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "TVGATE_LOG_LEVEL",
            "verbose",
            "log_level must be one of debug, info, warning, error, not 'verbose'",
        ),
        (
            "TVGATE_LISTEN",
            "127.0.0.1:80800",
            "listen must be host:port with a port from 0 to 65535, not '127.0.0.1:80800'",
        ),
        (
            "TVGATE_METRICS_LISTEN",
            "127.0.0.1:70000",
            "metrics_listen must be host:port with a port from 1 to 65535, not '127.0.0.1:70000'",
        ),
    ],
)
def test_a_bad_setting_is_a_one_line_error(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = fresh_env(tmp_path / "data", f"127.0.0.1:{free_port()}", **{variable: value})
    code, stdout, stderr = serve(env)
    assert code == 2, f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert stderr.splitlines() == [f"tvgate: configuration: {message}"]
    assert "tvg_" not in stdout
