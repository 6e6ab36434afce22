"""Run the real coding tools (Claude Code, Codex CLI) against a gateway, as a user would.

The binaries are the ones ``make clients`` installs into ``.clients/`` from the npm registry
(versions pinned in ``tests/npm/package-lock.json``). Each run gets a home and config
folder of its own under the caller's temporary directory, a clean environment (nothing
of the test process's leaks in: no proxy settings, no real credentials), telemetry,
error reporting and update checks off, and the gateway as its only provider. A run is
bounded by a timeout; its JSON event stream is parsed and returned with its exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENTS_DIR = Path(os.environ.get("TVGATE_TEST_CLIENTS_DIR", ROOT / ".clients"))
BIN = CLIENTS_DIR / "node_modules" / ".bin"
CLAUDE = BIN / "claude"
CODEX = BIN / "codex"
DEFAULT_TIMEOUT = 120.0


@dataclass
class Setup:
    """Where a tool runs: the gateway, the user's token, the route, and a folder of its own
    (``work/``, the tool's working directory, and ``home/``, its home and config)."""

    base_url: str
    token: str
    model: str
    folder: Path
    #: Extra request headers the tool is configured to send.
    headers: dict[str, str] = field(default_factory=dict)
    #: Extra environment for the tool (a feature switch such as model discovery).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        path = self.folder / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def home(self) -> Path:
        path = self.folder / "home"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class ClientRun:
    """What a tool did: its exit status, its JSON events (one per output line), stderr."""

    returncode: int
    events: list[dict[str, Any]]
    stdout: str
    stderr: str

    def describe(self) -> str:
        """The run's output, for an assertion message."""
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def require(binary: Path) -> None:
    """Fail (not skip) when the tools are missing: ``make test`` installs them."""
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{binary} is missing: run `make clients` (npm) first")


def _base_env(home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
    }


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> ClientRun:
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out, err = _text(exc.stdout), _text(exc.stderr)
        message = f"{argv[0]} ran over {timeout} s\nstdout:\n{out}\nstderr:\n{err}"
        raise AssertionError(message) from None
    events = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            # A plain-text line that happens to start with a brace is not an event.
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return ClientRun(done.returncode, events, done.stdout, done.stderr)


def _text(output: str | bytes | None) -> str:
    """What a timed-out process had written (bytes or str, as the platform gives it)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def run_claude(
    setup: Setup,
    prompt: str,
    *,
    credential_env: str = "ANTHROPIC_AUTH_TOKEN",
    allowed_tools: str = "Bash",
    timeout: float = DEFAULT_TIMEOUT,
) -> ClientRun:
    """``claude -p PROMPT --output-format stream-json`` against the gateway (its base URL).

    The token goes in `credential_env`: ``ANTHROPIC_AUTH_TOKEN`` (sent as ``Authorization:
    Bearer``) or ``ANTHROPIC_API_KEY`` (sent as ``x-api-key``, as ``tracevault proxy info``
    sets it up), or nowhere ("": a cloud mode's run sends it in a header); the headers as
    ``ANTHROPIC_CUSTOM_HEADERS``. Every model alias (the
    small/fast model Claude Code uses for side tasks too) points at the route, so that no
    call asks for a model the gateway has no route for.
    """
    require(CLAUDE)
    home, model = setup.home, setup.model
    env = _base_env(home)
    env.update(
        {
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "ANTHROPIC_BASE_URL": setup.base_url,
            "ANTHROPIC_MODEL": model,
            "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
            "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
            "ANTHROPIC_SMALL_FAST_MODEL": model,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_BUG_COMMAND": "1",
            "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
        }
    )
    if credential_env:
        env[credential_env] = setup.token
    if setup.headers:
        env["ANTHROPIC_CUSTOM_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in setup.headers.items())
    env.update(setup.env)
    argv = [
        str(CLAUDE),
        "-p",
        prompt,
        "--model",
        model,
        "--output-format",
        "stream-json",
        "--verbose",
        "--allowedTools",
        allowed_tools,
    ]
    return _run(argv, env, setup.work, timeout)


def claude_result(run: ClientRun) -> dict[str, Any]:
    """The final ``result`` event of a Claude Code stream-json run."""
    results = [event for event in run.events if event.get("type") == "result"]
    assert len(results) == 1, run.describe()
    return results[0]


def claude_bash_session(
    run: ClientRun, setup: Setup, marker: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a Claude Code run of the fake provider's ``agent`` scenario: it ran the command
    writing ``marker`` with its Bash tool, and answered the command's output. Its result
    event and its one tool call."""
    assert run.returncode == 0, run.describe()
    result = claude_result(run)
    assert result["subtype"] == "success" and not result["is_error"], run.describe()
    # The Bash tool really ran here, and its output went back up through tvgate.
    assert (setup.work / "out.txt").read_text() == marker + "\n"
    # Signed in with a subscription, Claude Code adds a reminder of the tokens left to the
    # turn that carries the tool's result (which the fake says back after the result).
    assert result["result"].split(" <system-reminder>")[0] == f"Tool said: {marker}"
    assert result["num_turns"] == 2
    tool_uses = [
        block
        for event in run.events
        if event.get("type") == "assistant"
        for block in event["message"]["content"]
        if block.get("type") == "tool_use"
    ]
    assert [block["name"] for block in tool_uses] == ["Bash"], run.describe()
    return result, tool_uses[0]


def run_codex(
    setup: Setup, prompt: str, *, websockets: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> ClientRun:
    """``codex exec --json PROMPT`` with the gateway as a custom Responses-API provider.

    With `websockets` the provider says ``supports_websockets = true``: Codex then opens
    ``GET /v1/responses`` with ``Upgrade: websocket`` and sends its turns on that socket
    (tvgate.proxy.websocket).

    The base URL is the gateway's OpenAI one (ending in ``/v1``); the token is read from
    the provider's ``env_key``; the headers go in the provider's ``http_headers``. The sandbox
    is off (the run's folder is a test's temporary one): Codex's bubblewrap sandbox needs
    user namespaces that a CI container may not have.
    """
    require(CODEX)
    env = _base_env(setup.home)
    codex_home = setup.home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    env.update({"CODEX_HOME": str(codex_home), "TVGATE_TOKEN": setup.token, **setup.env})
    http_headers = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in setup.headers.items())
    (codex_home / "config.toml").write_text(
        f"""model = {json.dumps(setup.model)}
model_provider = "tvgate"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[model_providers.tvgate]
name = "tvgate"
base_url = {json.dumps(setup.base_url)}
env_key = "TVGATE_TOKEN"
wire_api = "responses"
http_headers = {{ {http_headers} }}
request_max_retries = 0
stream_max_retries = 0
supports_websockets = {json.dumps(websockets)}
"""
    )
    argv = [
        str(CODEX),
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        prompt,
    ]
    return _run(argv, env, setup.work, timeout)


def codex_messages(run: ClientRun) -> list[str]:
    """The agent messages of a ``codex exec --json`` run, in order."""
    return [
        str(event["item"].get("text", ""))
        for event in run.events
        if event.get("type") == "item.completed" and event["item"].get("type") == "agent_message"
    ]
