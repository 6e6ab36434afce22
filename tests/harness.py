"""What the tests and the bench start for real: PostgreSQL databases and ``tvgate serve``.

One place owns a scratch PostgreSQL database (created with a random name, its
backends ended and dropped afterwards: ``postgres_database``) and one owns the
gateway process (``start_gateway``: ``tvgate serve`` exactly as deployed, in a
subprocess configured by ``TVGATE_*`` variables, on port 0: it reports the port
it bound; ``launch_gateway`` and ``beside`` wrap it in a ``GatewayProcess``,
which ``with`` stops). tests/inprocess.py runs the same gateway inside the test
process. The pytest fixtures in
``tests/conftest.py`` and the bench's ``bench/gateway.py`` are built on these.

No pytest here: the bench imports this module too.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx2

from tvgate.db import open_database
from tvgate.models import Trace

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("TVGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
MASTER_KEY = b"k" * 32
MAX_BODY_BYTES = 2 * 1024 * 1024


# --- PostgreSQL ---


def pg_execute(sql: str, admin_dsn: str = PG_ADMIN_DSN) -> None:
    """One statement on the server's admin database, outside a transaction (CREATE DATABASE
    cannot run in one)."""
    import psycopg2  # the bench runs without the postgresql extra too

    conn = psycopg2.connect(admin_dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextmanager
def postgres_database(prefix: str = "tvgate_test_", admin_dsn: str = PG_ADMIN_DSN) -> Iterator[str]:
    """A new, empty PostgreSQL database: its URL; its connections ended and it dropped at the
    end. Raises psycopg2.OperationalError when the server cannot be reached. Under
    pytest-xdist the name carries the worker's id (``tvgate_test_gw1_…``), so that a
    database left behind by a cut-short run says which worker made it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    name = prefix + (f"{worker}_" if worker.isalnum() else "") + secrets.token_hex(6)
    pg_execute(f"CREATE DATABASE {name}", admin_dsn)
    try:
        yield f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        # The name is ours (hex), not input: formatting it in is safe.
        pg_execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",  # noqa: S608
            admin_dsn,
        )
        pg_execute(f"DROP DATABASE IF EXISTS {name}", admin_dsn)


# --- the gateway process ---


def free_port() -> int:
    """A port nothing listens on now, for fakes and servers that cannot bind port 0 and
    report it (another process may take it before they bind it: gateways start on port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(kw_only=True)
class RunningGateway:
    """A gateway the tests talk to (a process, or in this process: tests/inprocess.py) and
    what the tests set up in its database; ``with`` it to stop it at the end."""

    url: str
    database_url: str
    data_dir: Path
    env: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def bind(self) -> None:
        """Point this test process's models at the gateway's database."""
        open_database(self.database_url)

    def traces(self, **where: Any) -> list[Trace]:
        self.bind()
        query = Trace.select().order_by(Trace.received_at)
        for name, value in where.items():
            query = query.where(getattr(Trace, name) == value)
        return list(query)

    def dump_database(self) -> str:
        """Every row of every table, as text: what a stolen database dump would show."""
        self.bind()
        from tvgate.models import database

        rows = []
        for table in database.get_tables():
            # Table names come from the database itself, not from input.
            rows.extend(database.execute_sql(f"SELECT * FROM {table}").fetchall())  # noqa: S608
        return "\n".join(map(str, rows))

    def wait_traces(self, count: int, timeout: float = 10.0, **where: Any) -> list[Trace]:
        """The traces matching ``where`` once there are ``count`` of them (or fail)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.traces(**where)
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) == count, f"expected {count} traces for {where}, got {len(found)}"
                return found
            time.sleep(0.05)

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, stdin=stdin)


@dataclass(kw_only=True)
class GatewayProcess(RunningGateway):
    """A running ``tvgate serve``."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        stop_process(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def run_cli(
    env: dict[str, str], *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``tvgate ARGS`` with ``env`` (its output captured as text; bounded to 60 s)."""
    return subprocess.run(
        [sys.executable, "-m", "tvgate.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def fake_scenario(name: str, session: str = "") -> dict[str, Any]:
    """An SDK call's keyword arguments that ask the fake provider for a scenario; a session
    tag lets a test find its own traces."""
    headers = {"x-fake-scenario": name}
    if session:
        headers["x-tvgate-session"] = session
    return {"extra_headers": headers}


def serve_env(
    database_url: str, data_dir: Path, port: int, master_key: bytes = MASTER_KEY, **extra: str
) -> dict[str, str]:
    """What every gateway the tests and the bench start has: this process's environment
    without its TVGATE_* variables, one worker on 127.0.0.1:``port`` (0: any free port),
    private upstreams allowed (the fakes listen on 127.0.0.1); then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVGATE_")}
    env.update(
        {
            "TVGATE_LISTEN": f"127.0.0.1:{port}",
            "TVGATE_DATA_DIR": str(data_dir),
            "TVGATE_DATABASE_URL": database_url,
            "TVGATE_MASTER_KEY": base64.b64encode(master_key).decode(),
            "TVGATE_ALLOW_PRIVATE_UPSTREAMS": "true",
            "TVGATE_LOG_LEVEL": "info",
            # One process, so that a test sees one cache and one set of metrics (and the
            # bench measures one process as the process it is).
            "TVGATE_WORKERS": "1",
        }
    )
    env.update(extra)
    return env


def gateway_env(database_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """The test gateway's settings: ``serve_env``, the suite's defaults, then ``extra``."""
    env = serve_env(
        database_url,
        data_dir,
        port,
        TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS="true",
        TVGATE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        TVGATE_CACHE_TTL="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    # A setting given as "" is left at its default (a test of what a deployment runs).
    return {k: v for k, v in env.items() if k not in extra or v}


def start_gateway(env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """``tvgate serve`` with ``env``, once it answers ``/healthz``; its output goes to
    ``log_path``. On port 0 the gateway binds a port of the kernel's choice and writes it
    to ``--port-file``: ``env["TVGATE_LISTEN"]`` is then set to that address (so that a
    restart with ``env`` comes back on the same port). ``cwd`` is where ``python -m`` finds
    tvgate first (another tree, for an A/B)."""
    host, _, port = env["TVGATE_LISTEN"].rpartition(":")
    port_file = log_path.with_name(log_path.name + ".port")
    port_file.unlink(missing_ok=True)
    args = ["--port-file", str(port_file)] if port == "0" else []
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvgate.cli", "serve", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    # Two minutes: a start waits for nothing but the process itself, and on a loaded machine
    # (the suite's own workers, other jobs) an interpreter's imports alone can take half that.
    deadline = time.monotonic() + 120
    while args and not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"tvgate reported no port:\n{log_path.read_text()}")
        time.sleep(0.02)
    if args:
        env["TVGATE_LISTEN"] = f"{host}:{port_file.read_text().strip()}"
    url = "http://" + env["TVGATE_LISTEN"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tvgate exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"tvgate did not come up:\n{log_path.read_text()}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a gateway drains), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


#: The name the tests use.
stop_gateway = stop_process


def gateway_process(env: dict[str, str], tokens: dict[str, str], log_path: Path) -> GatewayProcess:
    """``start_gateway(env, log_path)``, as a GatewayProcess over the env's database and data
    directory, with the tokens the test seeded there."""
    proc = start_gateway(env, log_path)
    return GatewayProcess(
        url="http://" + env["TVGATE_LISTEN"],
        database_url=env["TVGATE_DATABASE_URL"],
        data_dir=Path(env["TVGATE_DATA_DIR"]),
        env=env,
        proc=proc,
        log_path=log_path,
        tokens=tokens,
    )


def launch_gateway(
    database_url: str, data_dir: Path, tokens: dict[str, str], **extra_env: str
) -> GatewayProcess:
    """Start ``tvgate serve`` over an already seeded database, with ``extra_env`` on top of
    the suite's settings; its log is a file of its own in ``data_dir``."""
    env = gateway_env(database_url, data_dir, 0, **extra_env)
    return gateway_process(env, tokens, data_dir / f"tvgate-{secrets.token_hex(4)}.log")


def beside(gateway: RunningGateway, **extra_env: str) -> GatewayProcess:
    """Another gateway over ``gateway``'s database, data directory and tokens, with
    ``extra_env`` on top of the suite's settings (``with beside(…) as gw:`` stops it)."""
    return launch_gateway(gateway.database_url, gateway.data_dir, gateway.tokens, **extra_env)


#: Private and plain-http upstreams refused for every key (the defaults outside the tests).
PRIVATE_UPSTREAMS_OFF = {
    "TVGATE_ALLOW_PRIVATE_UPSTREAMS": "false",
    "TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS": "false",
}


def visdom_env(visdom_url: str) -> dict[str, str]:
    """Settings of a gateway that asks Visdom Trace (caching its answers briefly, so that the
    tests see a change soon)."""
    return {
        "TVGATE_VISDOM_URL": visdom_url,
        "TVGATE_VISDOM_CACHE_TTL": "1",
        "TVGATE_VISDOM_NEGATIVE_TTL": "0.5",
    }


def canned_http_client(
    status: int, body: bytes, content_type: str = "application/json"
) -> httpx2.Client:
    """An HTTP client for an SDK whose every request is answered with ``body``: a
    translated answer handed to the SDK's own parser, no server in between."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": content_type}, content=body)

    return httpx2.Client(transport=httpx2.MockTransport(handler))
