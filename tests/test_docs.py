"""The README keeps its promises: the two set-up commands first, every setting documented
once, a Contents that lists every section, and its shell blocks, walked top to bottom
against a fresh gateway, doing what they say."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import ROOT, free_port, stop_gateway
from tests.fake_provider import FakeProvider
from tvgate.config import Settings

README = ROOT / "README.md"


def test_readme_opens_with_the_two_commands() -> None:
    opening = README.read_text().splitlines()[:20]
    commands = [line.split("#")[0].strip() for line in opening if line.startswith("make ")]
    assert commands == ["make run", "make test"]


def test_every_setting_is_in_the_readme() -> None:
    readme = README.read_text()
    for field in dataclasses.fields(Settings):
        assert f"`TVGATE_{field.name.upper()}`" in readme, field.name


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_contents_lists_every_section_and_every_link_has_a_target() -> None:
    readme = README.read_text()
    sections = [h for h in re.findall(r"^## (.+)$", readme, re.M) if h != "Contents"]
    contents = readme.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", contents, re.M)
    assert [title for title, _ in listed] == sections
    anchors = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", readme, re.M)}
    for target in re.findall(r"\]\(#([^)]+)\)", readme):
        assert target in anchors, target


def test_readme_lists_each_setting_and_endpoint_once() -> None:
    lines = README.read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("|")]
    settings = Counter(cell for cell in rows if cell.startswith("`TVGATE_"))
    assert [name for name, count in settings.items() if count > 1] == []
    endpoints = Counter(cell for cell in rows if re.match(r"`(GET|POST|HEAD) ", cell))
    assert [path for path, count in endpoints.items() if count > 1] == []


# --- the README walked top to bottom ---

#: Shell blocks the walk does not run, by their first line, and why. Every other shell
#: block of the README is run; a new block must be run or listed here.
NOT_RUN = {
    "make run": "the walk starts what `make run` runs, `tvgate serve`, on a free port",
    "export VAULT_ADDR=": "needs a Vault and an operator token (tests/test_vault_*.py)",
    "tvgate vault rotate": "needs a Vault and an operator token (tests/test_vault_*.py)",
    "export ANTHROPIC_BASE_URL=": "starts Claude Code; its variables are checked against the "
    "UI's Connect block (tests/test_newcomer_docs.py)",
    "make test": "the test suite itself",
    "tvgate visdom connect": "needs a Visdom Trace: run against the ingestion stand-in "
    "(tests/test_visdom_sink.py)",
    "tvgate keys add gcp-claude --provider vertex": "needs a Google service account's key "
    "file; keys add --provider vertex runs on the fake Vertex AI's (tests/test_cloud_vertex.py)",
    "export CLAUDE_CODE_USE_VERTEX=1": "starts Claude Code in its Vertex AI mode, as "
    "tests/test_real_clients.py does against the fake Vertex AI",
    "# an IAM user's access key": "needs AWS; tests/test_cloud_bedrock.py adds such keys (CLI "
    "flags and secrets as written here) on the fake Bedrock",
    "export CLAUDE_CODE_USE_BEDROCK=": "starts Claude Code in Bedrock mode, which "
    "tests/test_cloud_bedrock.py runs with these variables",
    "tvgate keys rotate gcp-claude --region": "needs cloud keys; keys rotate and PATCH "
    "/api/v1/keys with cloud settings run on the fake clouds (tests/test_cloud_key_settings.py)",
}

PLACEHOLDER_URL = "https://gate.example.com"
PLACEHOLDER_TOKEN = "tvg_…"


def shell_blocks(text: str) -> list[list[str]]:
    """The README's ```sh blocks, in order, each as its commands (continuations joined)."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        joined = body.replace("\\\n", " ")
        blocks.append([line for line in joined.splitlines() if line.strip()])
    return blocks


@dataclasses.dataclass
class Walk:
    """A fresh folder, a fresh data directory and a gateway started there; the README's
    placeholders filled in as a reader would."""

    cwd: Path
    env: dict[str, str]
    fake: FakeProvider
    secrets: dict[str, str]
    url: str = ""
    token: str = ""
    #: What a reader's shell keeps from one command to the next (``. .venv/bin/activate``).
    session: list[str] = dataclasses.field(default_factory=list)

    def substitute(self, command: str) -> str:
        # A reader fills in their gateway's URL and token; the provider's address is the
        # fake provider's, since the walk has no real provider keys.
        command = command.replace(PLACEHOLDER_URL, self.url)
        command = command.replace(PLACEHOLDER_TOKEN, self.token)
        command = command.replace(
            "--provider anthropic", f"--provider anthropic --base-url {self.fake.url}"
        )
        return command.replace(
            "--provider openai", f"--provider openai --base-url {self.fake.openai_url}"
        )

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        script = "\n".join([*self.session, command])
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        shown = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}\n{shown}"
        assert "Traceback" not in shown, f"{command}\n{shown}"
        for secret in self.secrets.values():
            assert secret not in shown, f"{command} showed a provider key"
        return done


def _venv_with_tvgate(cwd: Path) -> None:
    """``.venv/bin`` in the walk's folder, as ``make run`` leaves it: ``activate`` puts it
    on PATH, and its ``tvgate`` runs this checkout's code."""
    bin_dir = cwd / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    tvgate = bin_dir / "tvgate"
    tvgate.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tvgate.cli "$@"\n')
    tvgate.chmod(0o755)


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    keys = {
        "ANTHROPIC_API_KEY": "sk-ant-api03-walk-" + secrets.token_hex(16),
        "OPENAI_API_KEY": "sk-proj-walk-" + secrets.token_hex(16),
        "NEW_KEY": "sk-ant-api03-walk-" + secrets.token_hex(16),
    }
    fake = FakeProvider(accepted_keys=set(keys.values())).start()
    _venv_with_tvgate(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVGATE_")}
    env.update(keys)
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "TVGATE_DATA_DIR": str(tmp_path / "data"),
            "TVGATE_LISTEN": f"127.0.0.1:{free_port()}",
            # The fake provider listens on loopback over http.
            "TVGATE_ALLOW_PRIVATE_UPSTREAMS": "true",
            "TVGATE_CACHE_TTL": "1",
            "TVGATE_WORKERS": "1",
        }
    )
    yield Walk(tmp_path, env, fake, keys)
    fake.stop()


def _first_start(walk: Walk) -> subprocess.Popen[bytes]:
    """``tvgate serve`` on an empty data directory; returns once it serves."""
    log = walk.cwd / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(walk.cwd / ".venv/bin/tvgate"), "serve"],
            cwd=walk.cwd,
            env=walk.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    walk.url = "http://" + walk.env["TVGATE_LISTEN"]
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx2.get(walk.url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx2.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    first = log.read_text()
    # What the README says the first start prints: the base URL, and once, a token of the
    # bootstrap admin, with the command that mints another.
    assert f"base URL: {walk.url}" in first, first
    assert re.search(r"admin proxy token .*: tvg_\S+", first), first
    assert "admin admin@localhost" in first, first
    assert "tvgate tokens issue admin@localhost" in first, first
    readme = README.read_text()
    assert "`admin@localhost`" in readme
    assert "`tvgate tokens issue admin@localhost`" in readme
    return proc


def _check_output(walk: Walk, command: str, out: str) -> None:
    """The output each kind of command documents."""
    words = command.split("|")[-1].split()
    verb = " ".join(words[1:3]) if words[0] == "tvgate" else words[0]
    if verb == "tokens issue":
        found = re.search(r"tvg_[A-Za-z0-9_\-]+", out)
        assert found is not None, out
        walk.token = found.group(0)
    elif verb in ("keys add", "keys rotate"):
        # The key's metadata, with the secret's last four characters only.
        variable = re.search(r"\$(\w+)", command)
        assert variable is not None
        assert words[3] in out and walk.secrets[variable.group(1)][-4:] in out, out
    elif verb in (
        "users add",
        "routes add",
        "keys set",
        "keys disable",
        "keys enable",
        "keys delete",
    ):
        assert words[3] in out, out
    elif verb == "keys list":
        assert "org-anthropic-key" in out and "org-openai-key" in out, out
    elif verb == "policy set":
        assert json.loads(out)["subscription_passthrough"] is True, out
    elif "/v1/messages" in command:
        assert json.loads(out)["type"] == "message", out
    elif "/v1/models" in command:
        answer = json.loads(out)
        assert answer["object"] == "list", out
        assert "claude-sonnet" in {model["id"] for model in answer["data"]}, out
    else:
        assert verb == ".", f"no documented output to check for {command!r}"


def _wait_for_route(walk: Walk, name: str) -> None:
    """Routes added by the CLI are in force in the gateway within TVGATE_CACHE_TTL."""
    deadline = time.monotonic() + 30
    while True:
        models = httpx2.get(walk.url + "/v1/models", headers={"x-api-key": walk.token}, timeout=10)
        if models.status_code == 200 and name in {m["id"] for m in models.json()["data"]}:
            return
        assert time.monotonic() < deadline, models.text
        time.sleep(0.2)


def test_readme_shell_blocks_run_top_to_bottom(walk: Walk) -> None:
    blocks = shell_blocks(README.read_text())
    for first in NOT_RUN:
        assert any(block[0].startswith(first) for block in blocks), f"no block {first!r}"
    ran: list[str] = []
    proc = _first_start(walk)
    try:
        for block in blocks:
            skip = next((why for first, why in NOT_RUN.items() if block[0].startswith(first)), "")
            if skip:
                continue
            for line in block:
                command = walk.substitute(line)
                if command.lstrip().startswith("curl"):
                    _wait_for_route(walk, "claude-sonnet")
                done = walk.run(command)
                if command.startswith(". "):
                    walk.session.append(command)
                _check_output(walk, command, done.stdout)
                ran.append(line)
        # The troubleshooting check, with a token that is not one: tvgate's 401 says why.
        check = next(line for line in ran if "/v1/models" in line)
        refused = walk.run(
            check.replace(PLACEHOLDER_URL, walk.url).replace(PLACEHOLDER_TOKEN, "tvg_wrong")
        )
        assert "invalid credential" in json.loads(refused.stdout)["error"]["message"]
    finally:
        stop_gateway(proc)
    assert any(" tokens issue " in line for line in ran)
    assert any("/v1/messages" in line for line in ran)
    assert any("/v1/models" in line for line in ran)
