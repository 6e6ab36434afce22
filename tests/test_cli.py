"""The ``tvgate`` command as an operator uses it, against a fresh data directory."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
from pathlib import Path

import anthropic
import pytest

from tests.conftest import ROOT, gateway_env, start_gateway, stop_gateway
from tests.fake_provider import FakeProvider
from tests.harness import run_cli

SECRET = "sk-ant-api03-cli-canary-0123456789abcdef"


def run(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, stdin=stdin, cwd=ROOT)


def add_key(
    env: dict[str, str], name: str, *options: str, provider: str = "openai", secret: str = SECRET
) -> subprocess.CompletedProcess[str]:
    """``tvgate keys add NAME --provider PROVIDER OPTIONS``, the secret typed in on stdin."""
    return run(env, "keys", "add", name, "--provider", provider, *options, stdin=secret + "\n")


@pytest.fixture
def fresh_env(tmp_path: Path) -> dict[str, str]:
    env = gateway_env(f"sqlite:///{tmp_path / 'data' / 'tvgate.db'}", tmp_path / "data", 0)
    # The embedded default: a master key file in the data directory, not the environment.
    del env["TVGATE_MASTER_KEY"]
    return env


def test_first_start_bootstraps_once_and_the_token_works(
    fresh_env: dict[str, str], tmp_path: Path, fake_provider: FakeProvider
) -> None:
    log = tmp_path / "serve.log"
    proc = start_gateway(fresh_env, log)
    accepted = fake_provider.accepted_keys
    try:
        output = log.read_text()
        token = re.search(r"admin proxy token \(shown once, keep it\): (tvg_\S+)", output)
        assert token is not None, output
        assert f"http://{fresh_env['TVGATE_LISTEN']}" in output
        key_file = tmp_path / "data" / "master.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        added = add_key(
            fresh_env, "org-anthropic-key", "--base-url", fake_provider.url, provider="anthropic"
        )
        assert added.returncode == 0, added.stderr
        assert (
            run(fresh_env, "routes", "add", "claude", "--key", "org-anthropic-key").returncode == 0
        )
        client = anthropic.Anthropic(
            base_url="http://" + fresh_env["TVGATE_LISTEN"], api_key=token.group(1), max_retries=0
        )
        fake_provider.accepted_keys = {SECRET}
        message = client.messages.create(
            model="claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.model == "claude"
        assert fake_provider.requests[-1].headers["x-api-key"] == SECRET
    finally:
        fake_provider.accepted_keys = accepted
        stop_gateway(proc)
    # A second start on the same data directory creates nothing and prints no token.
    second_log = tmp_path / "second.log"
    proc = start_gateway(fresh_env, second_log)
    stop_gateway(proc)
    assert "tvg_" not in second_log.read_text()


def test_users_tokens_keys_routes(fresh_env: dict[str, str], tmp_path: Path) -> None:
    assert run(fresh_env, "migrate").returncode == 0
    created = run(fresh_env, "users", "add", "Dev@Example.com", "--org", "acme")
    assert created.returncode == 0 and "dev@example.com" in created.stdout
    duplicate = run(fresh_env, "users", "add", "dev@example.com", "--org", "acme")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr

    issued = run(
        fresh_env, "tokens", "issue", "dev@example.com", "--org", "acme", "--name", "laptop"
    )
    assert issued.returncode == 0
    assert re.fullmatch(r"tvg_[A-Za-z0-9_\-]{43}\n", issued.stdout), issued.stdout
    assert run(fresh_env, "tokens", "issue", "nobody@example.com", "--org", "acme").returncode == 1

    added = add_key(
        fresh_env, "openai-main", "--org", "acme", "--base-url", "http://127.0.0.1:9/v1", "--json"
    )
    assert added.returncode == 0, added.stderr
    metadata = json.loads(added.stdout)
    assert metadata["name"] == "openai-main" and metadata["fingerprint"] == "…" + SECRET[-4:]
    assert SECRET not in added.stdout + added.stderr
    assert (
        run(fresh_env, "keys", "add", "empty", "--provider", "openai", "--org", "acme").returncode
        == 1
    )

    routed = run(fresh_env, "routes", "add", "gpt-4o", "--key", "openai-main", "--org", "acme")
    assert routed.returncode == 0 and "openai-main" in routed.stdout
    mapped = run(
        fresh_env,
        "routes",
        "add",
        "fast",
        "--key",
        "openai-main",
        "--model",
        "gpt-4o-mini",
        "--org",
        "acme",
    )
    assert mapped.returncode == 0 and "gpt-4o-mini" in mapped.stdout
    assert run(fresh_env, "routes", "add", "x", "--key", "missing", "--org", "acme").returncode == 1

    # Only the token's hash and the key's ciphertext are in the database file.
    with sqlite3.connect(tmp_path / "data" / "tvgate.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert SECRET not in dump
    assert issued.stdout.strip() not in dump


def test_private_upstreams_are_refused_unless_allowed(fresh_env: dict[str, str]) -> None:
    env = {**fresh_env, "TVGATE_ALLOW_PRIVATE_UPSTREAMS": "false"}
    assert run(env, "migrate").returncode == 0
    run(env, "users", "add", "a@example.com", "--org", "acme")
    for url in ("http://api.example.com", "https://127.0.0.1", "https://169.254.169.254/v1"):
        refused = add_key(env, "k", "--org", "acme", "--base-url", url, secret="sk-test-123456789")
        assert refused.returncode == 1, url
    accepted = add_key(env, "k", "--org", "acme", "--json", secret="sk-test-123456789")
    assert accepted.returncode == 0
    assert json.loads(accepted.stdout)["base_url"] == "https://api.openai.com/v1"


def test_bad_configuration_is_reported(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVGATE_")}
    env["TVGATE_KEYRING"] = "nonsense"
    result = run(env, "migrate")
    assert result.returncode == 2 and "keyring" in result.stderr


def test_governance_commands(fresh_env: dict[str, str]) -> None:
    """Budgets, rate limits, route fallbacks and key concurrency caps from the command line."""
    env = fresh_env
    assert run(env, "migrate").returncode == 0
    assert run(env, "users", "add", "dev@example.com", "--org", "acme").returncode == 0
    added = add_key(env, "main", "--org", "acme", "--max-concurrent", "2", "--json")
    assert added.returncode == 0 and json.loads(added.stdout)["max_concurrent"] == 2
    capped = run(env, "keys", "set", "main", "--org", "acme", "--max-concurrent", "5")
    assert capped.returncode == 0 and "at most 5 calls" in capped.stdout, capped.stderr
    bad_cap = run(env, "keys", "set", "main", "--org", "acme", "--max-concurrent", "-1")
    assert bad_cap.returncode == 1 and "max_concurrent" in bad_cap.stderr
    listed = json.loads(run(env, "keys", "list", "--org", "acme", "--json").stdout)
    assert [k["max_concurrent"] for k in listed] == [5]

    for name in ("spare", "other"):
        assert run(env, "routes", "add", name, "--key", "main", "--org", "acme").returncode == 0
    routed = run(
        env,
        "routes",
        "add",
        "gpt",
        "--key",
        "main",
        "--org",
        "acme",
        "--fallback",
        "spare",
        "--fallback",
        "other",
    )
    assert routed.returncode == 0 and "then spare, other" in routed.stdout, routed.stderr
    unknown = run(env, "routes", "add", "x", "--key", "main", "--org", "acme", "--fallback", "no")
    assert unknown.returncode == 1 and "no route named 'no'" in unknown.stderr
    updated = run(env, "routes", "update", "gpt", "--org", "acme", "--fallback", "other")
    assert updated.returncode == 0 and "then other" in updated.stdout, updated.stderr
    routes = run(env, "routes", "list", "--org", "acme").stdout
    assert re.search(r"^\d+ +gpt .* other$", routes, re.MULTILINE), routes
    cleared = run(env, "routes", "update", "gpt", "--org", "acme", "--no-fallbacks")
    assert cleared.returncode == 0 and "then" not in cleared.stdout

    org_budget = run(env, "budgets", "set", "--org", "acme", "--tokens-per-day", "1000000")
    assert org_budget.returncode == 0, org_budget.stderr
    assert "org, 1,000,000 tokens per day" in org_budget.stdout
    user_budget = run(
        env,
        "budgets",
        "set",
        "--org",
        "acme",
        "--user",
        "dev@example.com",
        "--usd-per-month",
        "25.5",
        "--warn-percent",
        "90",
    )
    assert "user dev@example.com, $25.50 per month (warn at 90%)" in user_budget.stdout
    assert (
        run(
            env, "budgets", "set", "--org", "acme", "--route", "gpt", "--tokens-per-month", "5"
        ).returncode
        == 0
    )
    assert (
        run(
            env, "budgets", "set", "--org", "acme", "--key", "main", "--usd-per-day", "3"
        ).returncode
        == 0
    )
    for args, message in (
        (("--user", "nobody@example.com", "--usd-per-day", "1"), "no user"),
        (("--route", "nope", "--usd-per-day", "1"), "no route named 'nope'"),
        (("--usd-per-day", "-1"), "amount"),
        (("--usd-per-day", "nan"), "finite"),
        (("--usd-per-day", "1", "--warn-percent", "150"), "warn_percent"),
    ):
        refused = run(env, "budgets", "set", "--org", "acme", *args)
        assert refused.returncode == 1 and message in refused.stderr, (args, refused.stderr)
    two_amounts = run(
        env, "budgets", "set", "--org", "acme", "--usd-per-day", "1", "--tokens-per-day", "2"
    )
    assert two_amounts.returncode == 2  # argparse: one amount per budget
    table = run(env, "budgets", "list", "--org", "acme")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "SCOPE", "SUBJECT"] and len(lines) == 5
    assert "dev@example.com" in lines[2] and "$25.50" in lines[2] and "0%" in lines[2]
    budgets = json.loads(run(env, "budgets", "list", "--org", "acme", "--json").stdout)
    assert [(b["scope"], b["subject"]) for b in budgets] == [
        ("org", ""),
        ("user", "dev@example.com"),
        ("route", "gpt"),
        ("key", "main"),
    ]
    assert run(env, "budgets", "delete", "--org", "other", str(budgets[1]["id"])).returncode == 1
    deleted = run(env, "budgets", "delete", "--org", "acme", str(budgets[1]["id"]))
    assert deleted.returncode == 0 and f"deleted budget {budgets[1]['id']}" in deleted.stdout
    assert len(json.loads(run(env, "budgets", "list", "--org", "acme", "--json").stdout)) == 3

    limited = run(env, "limits", "set", "--org", "acme", "--user", "dev@example.com", "--rpm", "60")
    assert limited.returncode == 0, limited.stderr
    assert "user dev@example.com, 60 requests and any number of tokens per minute" in (
        limited.stdout
    )
    assert run(env, "limits", "set", "--org", "acme", "--tpm", "100000").returncode == 0
    assert run(env, "limits", "set", "--org", "acme", "--route", "gpt").returncode == 1
    assert run(env, "limits", "set", "--org", "acme", "--rpm", "0").returncode == 1
    limits = json.loads(run(env, "limits", "list", "--org", "acme", "--json").stdout)
    assert [(r["scope"], r["rpm"], r["tpm"]) for r in limits] == [
        ("org", None, 100000),
        ("user", 60, None),
    ]
    assert "REQUESTS THIS MINUTE" in run(env, "limits", "list", "--org", "acme").stdout
    assert run(env, "limits", "delete", "--org", "acme", str(limits[0]["id"])).returncode == 0
    assert run(env, "limits", "delete", "--org", "acme", str(limits[0]["id"])).returncode == 1
