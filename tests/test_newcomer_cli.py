"""A newcomer's first hour with the ``tvgate`` command (issue 22, items 2 and 10).

The real CLI (``python -m tvgate.cli``) in a subprocess, as a user runs it: from
another folder of a checkout, outside one, piped into ``head``; the route state
it shows is checked against a real ``tvgate serve``, its API and its proxy.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import anthropic
import httpx2
import pytest

from tests.conftest import ANTHROPIC_SECRET, ROOT, GatewayProcess, free_port, gateway_env
from tests.fake_provider import FakeProvider
from tests.harness import run_cli as tvgate

SECRET = "sk-ant-api03-newcomer-0123456789abcdef"
#: A log line of the gateway's JSON format: what a person should not find in a command's output.
JSON_LOG_LINE = re.compile(r'^\{"ts":', re.MULTILINE)


def sql(database: Path, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on a SQLite file (committed) and close it again."""
    with closing(sqlite3.connect(database)) as db, db:
        return db.execute(statement).fetchall()


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user who set nothing: no data directory, no database URL."""
    env = gateway_env("", Path(), free_port())
    del env["TVGATE_DATA_DIR"], env["TVGATE_DATABASE_URL"]
    return {**env, **extra}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder laid out like a tvgate checkout after ``make run``: setup.cfg naming
    tvgate, and the database in data/ that serve created there."""
    root = tmp_path / "tvgate"
    (root / "docs" / "notes").mkdir(parents=True)
    (root / "setup.cfg").write_text("[metadata]\nname = tvgate\nversion = 0\n")
    env = user_env()
    assert tvgate(env, "migrate", cwd=root).returncode == 0
    added = tvgate(env, "users", "add", "dev@example.com", "--org", "default", cwd=root)
    assert added.returncode == 0, added.stderr
    assert (root / "data" / "tvgate.db").is_file()
    return root


def test_a_command_run_from_another_folder_of_the_checkout_uses_its_database(
    checkout: Path,
) -> None:
    elsewhere = checkout / "docs" / "notes"
    listed = tvgate(user_env(), "users", "list", "--org", "default", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert "dev@example.com" in listed.stdout
    added = tvgate(user_env(), "users", "add", "ops@example.com", "--org", "default", cwd=elsewhere)
    assert added.returncode == 0, added.stderr
    assert not (elsewhere / "data").exists()
    # The user added from docs/notes is in the checkout's one database.
    database = checkout / "data" / "tvgate.db"
    emails = {row[0] for row in sql(database, "SELECT email FROM user")}
    orgs = [row[0] for row in sql(database, "SELECT name FROM org")]
    assert emails == {"dev@example.com", "ops@example.com"} and orgs == ["default"]


def _stops_without_a_database(cwd: Path, *args: str) -> None:
    """``tvgate ARGS`` run in ``cwd`` finds no database: it says where it looked, in one
    line that names --data-dir, and stops."""
    refused = tvgate(user_env(), *args, cwd=cwd)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    (line,) = refused.stderr.splitlines()
    assert str(cwd / "data" / "tvgate.db") in line and "--data-dir" in line, line
    assert "Traceback" not in refused.stderr and refused.stdout == ""


def _refused_as_without_a_database(cwd: Path, planted: Path) -> None:
    """A command run in ``cwd`` does not use the database ``planted`` in a parent folder:
    it stops as when there is none, and writes nothing anywhere."""
    before = sql(planted, "SELECT email FROM user")
    _stops_without_a_database(cwd, "users", "list", "--org", "default")
    _stops_without_a_database(cwd, "users", "add", "mallory@example.com", "--org", "default")
    assert sql(planted, "SELECT email FROM user") == before
    assert not (cwd / "data").exists()


def test_a_command_that_finds_no_database_says_where_it_looked_and_stops(
    checkout: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _stops_without_a_database(outside, "routes", "list", "--org", "default")
    _stops_without_a_database(outside, "users", "add", "a@b.test", "--org", "x")
    assert not (outside / "data").exists()
    # A database URL naming a file that is not there is refused the same way.
    missing = outside / "typo" / "tvgate.db"
    refused = tvgate(
        user_env(TVGATE_DATABASE_URL=f"sqlite:///{missing}"), "orgs", "list", cwd=outside
    )
    assert refused.returncode == 1 and str(missing) in refused.stderr
    assert "TVGATE_DATABASE_URL" in refused.stderr
    assert not missing.parent.exists()
    # --data-dir, before or after the command, names the right one.
    data = str(checkout / "data")
    for args in (
        ("--data-dir", data, "users", "list", "--org", "default"),
        ("users", "list", "--org", "default", "--data-dir", data),
    ):
        listed = tvgate(user_env(), *args, cwd=outside)
        assert listed.returncode == 0 and "dev@example.com" in listed.stdout, listed.stderr
    # migrate still creates a new database where it is told to.
    created = tvgate(user_env(), "migrate", cwd=outside)
    assert created.returncode == 0 and (outside / "data" / "tvgate.db").is_file()


def test_a_database_planted_in_a_parent_folder_is_not_picked_up(
    checkout: Path, tmp_path: Path
) -> None:
    database = checkout / "data" / "tvgate.db"
    inside = checkout / "docs" / "notes"
    # A folder that is no tvgate checkout (no setup.cfg naming tvgate), say /tmp, with a
    # data/tvgate.db someone left there.
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "project").mkdir()
    planted = shared / "data" / "tvgate.db"
    planted.write_bytes(database.read_bytes())
    planted.chmod(0o600)
    _refused_as_without_a_database(shared / "project", planted)
    # In a checkout: a database that others may write, or in a folder others may write.
    for path, mode in ((database, 0o666), (database, 0o620), (database.parent, 0o777)):
        original = path.stat().st_mode & 0o777
        path.chmod(mode)
        try:
            _refused_as_without_a_database(inside, database)
        finally:
            path.chmod(original)
    # One owned by another user (the test runs as root in CI: it can give it away).
    if os.geteuid() == 0:
        for path in (database, database.parent):
            os.chown(path, 65534, 65534)
            try:
                _refused_as_without_a_database(inside, database)
            finally:
                os.chown(path, 0, 0)
    # Put right again, it is the checkout's database once more.
    listed = tvgate(user_env(), "users", "list", "--org", "default", cwd=inside)
    assert listed.returncode == 0 and "dev@example.com" in listed.stdout, listed.stderr


def test_commands_log_no_json_lines_among_their_output(checkout: Path) -> None:
    env = user_env(TVGATE_LOG_LEVEL="info")
    # A tvgate upgrade with a migration the database has not seen: the first command
    # applies it, and says nothing about it. (Migration 14 only adds what is missing, so
    # it can be applied again.)
    database = checkout / "data" / "tvgate.db"
    sql(database, "DELETE FROM schema_version WHERE version = 14")
    listed = tvgate(env, "routes", "list", "--org", "default", cwd=checkout)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == "", listed.stderr
    assert sql(database, "SELECT version FROM schema_version WHERE version = 14") == [(14,)]
    key = ("k", "--provider", "anthropic", "--org", "default")
    assert tvgate(env, "keys", "add", *key, cwd=checkout, stdin=SECRET + "\n").returncode == 0
    assert tvgate(env, "routes", "add", "claude", "--key", "k", cwd=checkout).returncode == 0
    for args in (("keys", "rotate", "k"), ("keys", "delete", "k", "--force")):
        done = tvgate(env, *args, cwd=checkout, stdin=SECRET + "-2\n")
        assert done.returncode == 0, done.stderr
        assert not JSON_LOG_LINE.search(done.stderr), done.stderr


def test_keys_add_prints_readable_metadata(checkout: Path) -> None:
    env = user_env()
    added = tvgate(
        env, "keys", "add", "main", "--provider", "anthropic", cwd=checkout, stdin=SECRET + "\n"
    )
    assert added.returncode == 0, added.stderr
    assert "\\u" not in added.stdout and "…" + SECRET[-4:] in added.stdout, added.stdout
    assert re.search(r"\b\d{4}-\d\d-\d\d \d\d:\d\d\b", added.stdout), added.stdout
    assert not re.search(r"\b\d{10}\.\d+", added.stdout), added.stdout
    assert SECRET not in added.stdout + added.stderr
    # Scripts ask for JSON, which keeps the characters as they are.
    rotated = tvgate(env, "keys", "rotate", "main", "--json", cwd=checkout, stdin=SECRET + "x\n")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["fingerprint"] == "…" + (SECRET + "x")[-4:]
    assert "\\u" not in rotated.stdout


def test_list_commands_print_a_header_row_with_the_id_update_takes(checkout: Path) -> None:
    env = user_env()
    assert (
        tvgate(
            env, "keys", "add", "k", "--provider", "openai", cwd=checkout, stdin=SECRET + "\n"
        ).returncode
        == 0
    )
    for args in (
        ("routes", "add", "gpt"),
        ("routes", "add", "gpt", "--for-user", "dev@example.com"),
    ):
        made = tvgate(env, *args, "--key", "k", cwd=checkout)
        assert made.returncode == 0, made.stderr

    users = tvgate(env, "users", "list", "--org", "default", cwd=checkout).stdout.splitlines()
    assert users[0].split() == ["EMAIL", "ROLE", "STATE"], users
    assert users[1].split() == ["dev@example.com", "member", "active"], users

    routes = tvgate(env, "routes", "list", cwd=checkout).stdout.splitlines()
    header = routes[0].split()
    assert header == ["ID", "NAME", "SCOPE", "USER", "KEY", "MODEL", "STATE", "FALLBACKS"]
    # Two routes named gpt: update needs an id, which the listing labels.
    ambiguous = tvgate(env, "routes", "update", "gpt", "--description", "x", cwd=checkout)
    assert ambiguous.returncode == 1 and "give the id" in ambiguous.stderr
    (row,) = [line for line in routes[1:] if "dev@example.com" in line]
    route_id = row.split()[header.index("ID")]
    updated = tvgate(env, "routes", "update", route_id, "--enabled", "off", cwd=checkout)
    assert updated.returncode == 0 and "for dev@example.com" in updated.stdout, updated.stderr
    assert "(disabled)" in updated.stdout


def test_traces_export_into_head_ends_without_a_traceback(
    gateway: GatewayProcess, member_token: str
) -> None:
    session = uuid.uuid4().hex
    started = time.time() - 1
    sdk = anthropic.Anthropic(
        base_url=gateway.url,
        api_key=member_token,
        max_retries=0,
        default_headers={"x-tvgate-session": session},
    )
    # Several pipe buffers of JSON lines, so that the export is still writing when head
    # has read its line and gone.
    prompt = "lorem ipsum " * 4000
    for _ in range(8):
        sdk.messages.create(
            model="claude-test", max_tokens=8, messages=[{"role": "user", "content": prompt}]
        )
    gateway.wait_traces(8, session_id=session)
    command = (
        f"{sys.executable} -m tvgate.cli traces export --org acme --since {started} --bodies"
        " | head -n 1"
    )
    piped = subprocess.run(
        ["/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        env=gateway.env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr
    (line,) = piped.stdout.splitlines()
    assert json.loads(line)["received_at"] >= started


def test_a_users_route_shows_as_disabled_by_the_org_while_its_switch_is_off(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    org = "newcomer-" + uuid.uuid4().hex[:8]
    admin, dev = f"admin@{org}.test", f"dev@{org}.test"

    def cli(*args: str, stdin: str = "") -> str:
        done = gateway.cli(*args, stdin=stdin)
        assert done.returncode == 0, f"tvgate {' '.join(args)}: {done.stderr}"
        return done.stdout

    cli("users", "add", admin, "--org", org, "--admin")
    cli("users", "add", dev, "--org", org)
    cli("policy", "set", "--org", org, "--user-routes", "on")
    cli(
        "keys", "add", "k", "--provider", "anthropic", "--org", org,
        "--base-url", fake_provider.url, stdin=ANTHROPIC_SECRET + "\n",
    )  # fmt: skip
    cli("routes", "add", "mine", "--key", "k", "--owner", dev, "--org", org)
    cli("policy", "set", "--org", org, "--user-routes", "off")
    admin_token = cli("tokens", "issue", admin, "--org", org).strip()
    dev_token = cli("tokens", "issue", dev, "--org", org).strip()

    (row,) = [line for line in cli("routes", "list", "--org", org).splitlines() if "mine" in line]
    assert "disabled by org policy" in row, row
    listed = httpx2.get(
        gateway.url + "/api/v1/routes",
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    (route,) = listed.json()["routes"]
    assert route["state"] == "disabled by org policy" and route["enabled"] is True
    for token, page in ((admin_token, "/ui/routes"), (dev_token, "/ui/me")):
        with httpx2.Client(base_url=gateway.url, follow_redirects=False, timeout=30) as browser:
            login = browser.get("/ui/login")
            xsrf = re.search(r'name="_xsrf" value="([^"]+)"', login.text)
            assert xsrf is not None, login.text
            signed_in = browser.post("/ui/login", data={"_xsrf": xsrf.group(1), "token": token})
            assert signed_in.status_code == 302, signed_in.text
            shown = browser.get(page)
            assert shown.status_code == 200 and "disabled by org policy" in shown.text, page
    # It is the state the proxy acts on.
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=dev_token, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(
            model="mine", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )

    cli("policy", "set", "--org", org, "--user-routes", "on")
    (row,) = [line for line in cli("routes", "list", "--org", org).splitlines() if "mine" in line]
    assert row.split()[-2] == "enabled", row
