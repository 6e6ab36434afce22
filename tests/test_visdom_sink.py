"""Traces reach Visdom Trace (issue 18): a real ``tvgate serve`` connected with
``tvgate visdom connect`` pushes tool sessions to the strict ingestion stand-in
(tests/fake_visdom_ingest.py), on SQLite and PostgreSQL: a Claude-Code-shaped tool
session and a Codex (Responses) one, each one session with its lines, tool events and
usage; the stand-in away and back; a 422 parked, shown and retried after a reconnect;
two gateways over one database; body capture off; then the real Claude Code and Codex.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.clients import Setup, claude_bash_session, run_claude, run_codex
from tests.conftest import ANTHROPIC_SECRET, scrape
from tests.fake_visdom_ingest import FakeVisdomIngest, Session
from tests.harness import GatewayProcess, beside, gateway_env, launch_gateway, run_cli
from tests.outages import outage
from tvgate import services

INGEST_KEY = "tvk_" + secrets.token_hex(32)
REPO = "8f14e45f-ceea-467f-a0e6-6f1b0c0d2a11"
PUSH = {"TVGATE_VISDOM_PUSH_INTERVAL": "0.2", "TVGATE_VISDOM_IDLE_TIMEOUT": "5"}
BASH = {
    "name": "Bash",
    "description": "run a command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
}
SHELL = {
    "type": "function",
    "name": "shell",
    "parameters": {"type": "object", "properties": {"command": {"type": "array"}}},
}


@pytest.fixture
def ingest() -> Iterator[FakeVisdomIngest]:
    fake = FakeVisdomIngest(INGEST_KEY).start()
    yield fake
    fake.stop()


def connect(gw: GatewayProcess, ingest: FakeVisdomIngest, *extra: str) -> str:
    done = gw.cli(
        "visdom", "connect", "--org", "acme", "--url", ingest.url, *extra, "--key-stdin",
        stdin=INGEST_KEY + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert INGEST_KEY not in done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def gateway(
    seeded: tuple[str, Path, dict[str, str]], ingest: FakeVisdomIngest
) -> Iterator[GatewayProcess]:
    url, data_dir, tokens = seeded
    with launch_gateway(url, data_dir, tokens, **PUSH) as gw:
        connect(gw, ingest, "--project", "proj-1")
        yield gw


def agent_call(gw: GatewayProcess, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """One call of dev@acme.test that the fake provider answers as a coding agent."""
    response = httpx2.post(
        gw.url + path,
        content=orjson.dumps(body),
        headers={"x-fake-scenario": "agent", **headers},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def claude_call(gw: GatewayProcess, session: str, messages: list[Any], **headers: str) -> Any:
    body = {"model": "claude-test", "max_tokens": 64, "messages": messages, "tools": [BASH]}
    return agent_call(
        gw,
        "/v1/messages",
        body,
        {
            "x-api-key": gw.tokens["dev@acme.test"],
            "anthropic-version": "2023-06-01",
            "user-agent": "claude-cli/2.0.14 (external, cli)",
            "x-claude-code-session-id": session,
            **headers,
        },
    )


def claude_session(gw: GatewayProcess, session: str, prompt: str, **headers: str) -> list[Any]:
    """A Claude Code turn: the prompt, a Bash tool call, its result, the final answer."""
    ask = {"role": "user", "content": [{"type": "text", "text": prompt}]}
    first = claude_call(gw, session, [ask], **headers)
    (use,) = [b for b in first["content"] if b["type"] == "tool_use"]
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "tvgate-ok"}],
    }
    assistant = {"role": "assistant", "content": first["content"]}
    second = claude_call(gw, session, [ask, assistant, result], **headers)
    return [first, second]


def codex_call(gw: GatewayProcess, session: str, items: list[Any]) -> Any:
    body = {"model": "gpt-test", "input": items, "tools": [SHELL]}
    return agent_call(
        gw,
        "/v1/responses",
        body,
        {
            "authorization": "Bearer " + gw.tokens["dev@acme.test"],
            "user-agent": "codex_cli_rs/0.46.0 (Linux; x86_64)",
            "session-id": session,
        },
    )


def codex_session(gw: GatewayProcess, session: str) -> list[Any]:
    env = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "<environment_context><cwd>/work/app</cwd>"}],
    }
    ask = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]}
    first = codex_call(gw, session, [env, ask])
    (call,) = [i for i in first["output"] if i["type"] == "function_call"]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "tvgate-ok"}
    second = codex_call(gw, session, [env, ask, call, output])
    return [first, second]


def wait_for(what: Callable[[], bool], timeout: float, say: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, say()
        time.sleep(0.1)


def ended(ingest: FakeVisdomIngest, *sessions: str) -> Callable[[], bool]:
    def check() -> bool:
        with ingest.lock:
            done = {sid for (_scope, sid), s in ingest.sessions.items() if s.ended}
        return set(sessions) <= done

    return check


def status(gw: GatewayProcess) -> dict[str, Any]:
    done = gw.cli("visdom", "status", "--org", "acme", "--json")
    assert done.returncode in (0, 1), done.stderr
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def assert_clean(ingest: FakeVisdomIngest) -> None:
    assert ingest.problems == []
    assert ingest.gaps() == []
    uuids = [e["event_uuid"] for _path, _headers, e in ingest.received if "event_uuid" in e]
    assert len(uuids) == len(set(uuids)), "an event was delivered twice"


def assert_claude_session(session: Session, answers: list[Any], prompt: str) -> None:
    lines = session.lines()
    assert [line["type"] for line in lines] == ["user", "assistant", "user", "assistant"]
    assert lines[0]["message"]["content"] == [{"type": "text", "text": prompt}]
    assert [lines[1]["message"]["id"], lines[3]["message"]["id"]] == [a["id"] for a in answers]
    for line, answer in ((lines[1], answers[0]), (lines[3], answers[1])):
        usage = line["message"]["usage"]
        assert usage["output_tokens"] == answer["usage"]["output_tokens"]
        assert usage["input_tokens"] == answer["usage"]["input_tokens"]
    (use,) = [b for b in answers[0]["content"] if b["type"] == "tool_use"]
    tools = [
        (e["hook_event_name"], e["tool_use_id"], e["tool_name"]) for e in session.tool_events()
    ]
    assert tools == [("PreToolUse", use["id"], "Bash"), ("PostToolUse", use["id"], "Bash")]
    post = session.tool_events()[1]
    assert post["tool_response"] == "tvgate-ok" and post["tool_is_error"] is False
    assert session.tool == "claude-code"
    stats = session.final_stats
    assert stats is not None
    assert stats["assistant_messages"] == 2 and stats["user_messages"] == 1
    assert stats["total_tool_calls"] == 1
    assert stats["output_tokens"] == sum(a["usage"]["output_tokens"] for a in answers)


def test_a_claude_code_and_a_codex_session_arrive_as_one_session_each(
    gateway: GatewayProcess, ingest: FakeVisdomIngest
) -> None:
    prompt = "run the tests; my key is " + ANTHROPIC_SECRET
    answers = claude_session(
        gateway, "cc-1", prompt, **{"x-tracevault-repo": REPO, "x-tracevault-branch": "main"}
    )
    codex = codex_session(gateway, "codex-1")
    wait_for(
        ended(ingest, "cc-1", "codex-1"), 60, lambda: f"{list(ingest.sessions)} {ingest.problems}"
    )
    assert_clean(ingest)
    claude = ingest.session("cc-1")
    assert claude.key == (f"repos:{REPO}", "cc-1")
    # Redacted exactly as the stored body is: the org's own key never leaves.
    trace = gateway.traces(session_id="cc-1")[0]
    stored = services.get_trace(trace.id, org_name="acme")
    stored_prompt = stored["request"]["messages"][0]["content"][0]["text"]
    assert ANTHROPIC_SECRET not in stored_prompt
    assert_claude_session(claude, answers, stored_prompt)
    assert claude.lines()[0]["gitBranch"] == "main"
    for _path, headers, event in ingest.received:
        assert headers["Authorization"] == f"Bearer {INGEST_KEY}"
        assert ANTHROPIC_SECRET not in orjson.dumps(event).decode()

    session = ingest.session("codex-1")
    assert session.key == ("projects:proj-1", "codex-1")
    assert session.tool == "codex"
    lines = session.lines()
    assert [line["type"] for line in lines] == ["user", "user", "assistant", "user", "assistant"]
    assert [lines[2]["message"]["id"], lines[4]["message"]["id"]] == [a["id"] for a in codex]
    assert lines[2]["message"]["content"][-1]["type"] == "tool_use"
    assert lines[3]["message"]["content"][0]["type"] == "tool_result"
    assert all(e["cwd"] == "/work/app" for e in session.events)
    hooks = [e["hook_event_name"] for e in session.tool_events()]
    assert hooks == ["PreToolUse", "PostToolUse"]

    shown = status(gateway)
    assert shown["pending"] == 0 and shown["parked_count"] == 0
    assert shown["sent"] == len(ingest.received)
    assert INGEST_KEY not in orjson.dumps(shown).decode()
    metrics = scrape(gateway.url)
    assert metrics['tvgate_visdom_events_total{outcome="sent"}'] == len(ingest.received)
    assert metrics['tvgate_visdom_events_total{outcome="parked"}'] == 0
    assert INGEST_KEY not in gateway.dump_database() + gateway.log_text()


def test_a_refused_event_is_parked_shown_and_sent_after_a_reconnect(
    gateway: GatewayProcess, ingest: FakeVisdomIngest
) -> None:
    ingest.refuse = lambda e: 422 if e.get("hook_event_name") == "PreToolUse" else None
    answers = claude_session(gateway, "cc-park", "park me", **{"x-tracevault-repo": REPO})
    wait_for(lambda: status(gateway)["parked_count"] == 1, 60, lambda: str(status(gateway)))
    shown = status(gateway)
    (parked,) = shown["parked"]
    assert parked["event_type"] == "tool_use" and parked["session_id"] == "cc-park"
    assert "422" in parked["error"] and "refused by the test" in parked["error"]
    text = gateway.cli("visdom", "status", "--org", "acme")
    assert text.returncode == 1 and "parked event" in text.stdout
    # The session's later events wait behind it, in order.
    session = ingest.session("cc-park")
    assert [line["type"] for line in session.lines()] == ["user", "assistant"]
    assert session.tool_events() == []
    assert scrape(gateway.url)['tvgate_visdom_events_total{outcome="parked"}'] == 1

    ingest.refuse = None
    connect(gateway, ingest, "--project", "proj-1")
    wait_for(ended(ingest, "cc-park"), 60, lambda: str(status(gateway)))
    assert_clean(ingest)
    assert_claude_session(ingest.session("cc-park"), answers, "park me")
    assert status(gateway)["parked_count"] == 0


@pytest.mark.slow
def test_visdom_away_for_a_minute_loses_and_duplicates_nothing(
    gateway: GatewayProcess, ingest: FakeVisdomIngest
) -> None:
    ingest.stop()
    answers = claude_session(gateway, "cc-away", "while away", **{"x-tracevault-repo": REPO})
    codex_session(gateway, "codex-away")
    wait_for(
        lambda: scrape(gateway.url)['tvgate_visdom_events_total{outcome="retried"}'] >= 1,
        30,
        lambda: str(status(gateway)),
    )
    time.sleep(outage(60))
    shown = status(gateway)
    assert "unreachable" in shown["last_error"] and shown["pending"] > 0
    assert shown["parked_count"] == 0
    ingest.start()
    wait_for(ended(ingest, "cc-away", "codex-away"), 90, lambda: str(status(gateway)))
    assert_clean(ingest)
    assert_claude_session(ingest.session("cc-away"), answers, "while away")
    assert status(gateway)["pending"] == 0


def test_two_gateways_push_each_event_once(
    seeded: tuple[str, Path, dict[str, str]], ingest: FakeVisdomIngest
) -> None:
    url, data_dir, tokens = seeded
    with launch_gateway(url, data_dir, tokens, **PUSH) as first, beside(first, **PUSH) as second:
        connect(first, ingest)
        sessions = [f"cc-two-{i}" for i in range(4)]
        answers = {
            sid: claude_session(
                (first, second)[i % 2], sid, f"prompt {i}", **{"x-tracevault-repo": REPO}
            )
            for i, sid in enumerate(sessions)
        }
        wait_for(ended(ingest, *sessions), 60, lambda: str(status(first)))
        assert_clean(ingest)
        for sid in sessions:
            assert_claude_session(
                ingest.session(sid), answers[sid], f"prompt {sessions.index(sid)}"
            )
        sent = sum(
            scrape(gw.url)['tvgate_visdom_events_total{outcome="sent"}'] for gw in (first, second)
        )
        assert sent == len(ingest.received)


def test_two_workers_of_one_gateway_push_each_event_exactly_once(
    seeded: tuple[str, Path, dict[str, str]], ingest: FakeVisdomIngest
) -> None:
    """``TVGATE_WORKERS=2``: both worker processes run a pusher over the one outbox (the
    lease decides which pushes); calls on connections of their own spread over both."""
    url, data_dir, tokens = seeded
    with launch_gateway(url, data_dir, tokens, TVGATE_WORKERS="2", **PUSH) as gw:
        connect(gw, ingest)
        sessions = [f"cc-workers-{i}" for i in range(6)]
        answers = {
            sid: claude_session(gw, sid, f"prompt {i}", **{"x-tracevault-repo": REPO})
            for i, sid in enumerate(sessions)
        }
        wait_for(ended(ingest, *sessions), 60, lambda: str(status(gw)))
        wait_for(lambda: status(gw)["pending"] == 0, 60, lambda: str(status(gw)))
    assert_clean(ingest)
    with ingest.lock:
        bodies = [orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for _p, _h, e in ingest.received]
    assert len(bodies) == len(set(bodies)), "an event was delivered twice"
    for i, sid in enumerate(sessions):
        assert_claude_session(ingest.session(sid), answers[sid], f"prompt {i}")
        assert sorted(ingest.session(sid).chunks) == [0, 1, 2, 3]


def test_without_body_capture_lines_carry_ids_models_and_usage_only(
    seeded: tuple[str, Path, dict[str, str]], ingest: FakeVisdomIngest
) -> None:
    url, data_dir, tokens = seeded
    off = run_cli(
        gateway_env(url, data_dir, 0), "policy", "set", "--org", "acme", "--capture-bodies", "off"
    )
    assert off.returncode == 0, off.stderr
    with launch_gateway(url, data_dir, tokens, **PUSH) as gw:
        connect(gw, ingest, "--legacy-org-slug", "acme-slug")
        answers = claude_session(gw, "cc-off", "a secret plan", **{"x-tracevault-repo": REPO})
        wait_for(ended(ingest, "cc-off"), 60, lambda: str(status(gw)))
    assert_clean(ingest)
    session = ingest.session("cc-off")
    assert {path for path, _h, _e in ingest.received} == {
        f"/api/v1/orgs/acme-slug/repos/{REPO}/stream"
    }
    lines = session.lines()
    assert [line["type"] for line in lines] == ["assistant", "assistant"]
    assert [line["message"]["id"] for line in lines] == [a["id"] for a in answers]
    assert all(line["message"]["content"] == [] for line in lines)
    assert lines[0]["message"]["usage"]["output_tokens"] == answers[0]["usage"]["output_tokens"]
    assert session.tool_events() == []
    for _path, _headers, event in ingest.received:
        assert "secret plan" not in orjson.dumps(event).decode()


def _xsrf(page: str, form_id: str = "") -> str:
    if form_id:
        found_form = re.search(rf'<form[^>]*id="{form_id}".*?</form>', page, re.S)
        assert found_form is not None, page
        page = found_form.group(0)
    found = re.search(r'name="_xsrf" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


def test_the_api_and_the_ui_connect_show_parked_events_and_never_the_key(
    gateway: GatewayProcess, ingest: FakeVisdomIngest
) -> None:
    api = gateway.url + "/api/v1/visdom"
    admin = {"authorization": "Bearer " + gateway.tokens["admin@acme.test"]}
    member = {"authorization": "Bearer " + gateway.tokens["dev@acme.test"]}
    assert httpx2.get(api, headers=member).status_code == 403
    refused = httpx2.put(api, headers=member, json={"url": ingest.url, "key": INGEST_KEY})
    assert refused.status_code == 403
    bad = httpx2.put(api, headers=admin, json={"url": ingest.url, "key": "sk-not-an-org-key"})
    assert bad.status_code == 400 and "tvk_" in bad.json()["error"]["message"]
    unknown = httpx2.put(api, headers=admin, json={"url": ingest.url, "key": INGEST_KEY, "x": 1})
    assert unknown.status_code == 400
    ok = httpx2.put(api, headers=admin, json={"url": ingest.url, "key": INGEST_KEY})
    assert ok.status_code == 200, ok.text
    assert ok.json()["connected"] and ok.json()["project"] == ""
    assert INGEST_KEY not in ok.text and ok.json()["key"] == "…" + INGEST_KEY[-4:]

    # No repo and no project: parked with its reason; the session id is the client's.
    hostile = "<i>s1</i>"
    claude_session(gateway, hostile, "no repo here")
    wait_for(lambda: status(gateway)["parked_count"] >= 1, 60, lambda: str(status(gateway)))
    shown = httpx2.get(api, headers=admin).json()
    assert (
        "no repo" in shown["parked"][0]["error"] and INGEST_KEY not in orjson.dumps(shown).decode()
    )

    with httpx2.Client(base_url=gateway.url, timeout=30) as browser:
        form = {
            "_xsrf": _xsrf(browser.get("/ui/login").text),
            "token": gateway.tokens["admin@acme.test"],
        }
        assert browser.post("/ui/login", data=form).status_code == 302
        page = browser.get("/ui/visdom")
        assert page.status_code == 200
        assert "&lt;i&gt;s1&lt;/i&gt;" in page.text and hostile not in page.text
        assert "no repo" in page.text and INGEST_KEY not in page.text
        without = browser.post("/ui/visdom", data={"url": ingest.url, "key": INGEST_KEY})
        assert without.status_code == 403
        # Reconnect with a project: the parked event is released and the session goes out.
        form = {
            "_xsrf": _xsrf(page.text, "visdom-connect"),
            "url": ingest.url,
            "project": "proj-ui",
            "key": INGEST_KEY,
        }
        saved = browser.post("/ui/visdom", data=form)
        assert saved.status_code == 302, saved.text
        wait_for(ended(ingest, hostile), 60, lambda: str(status(gateway)))
        assert ingest.session(hostile).key == ("projects:proj-ui", hostile)
        assert_clean(ingest)
        assert 'id="parked-count">0<' in browser.get("/ui/visdom").text
    with httpx2.Client(base_url=gateway.url, timeout=30) as browser:
        form = {
            "_xsrf": _xsrf(browser.get("/ui/login").text),
            "token": gateway.tokens["dev@acme.test"],
        }
        assert browser.post("/ui/login", data=form).status_code == 302
        assert browser.get("/ui/visdom").status_code == 403

    gone = httpx2.delete(api, headers=admin)
    assert gone.status_code == 200 and gone.json()["disconnected"]
    assert httpx2.get(api, headers=admin).json()["connected"] is False


# --- the real tools (the npm releases make clients installs: tests/clients.py) ---


def _agent(base_url: str, gw: GatewayProcess, model: str, folder: Path) -> tuple[Setup, str]:
    marker = "tvgate-ok-" + uuid.uuid4().hex[:8]
    headers = {
        "x-fake-scenario": "agent",
        "x-fake-command": f"echo {marker} > out.txt && cat out.txt",
        "x-tracevault-repo": REPO,
    }
    return Setup(base_url, gw.tokens["dev@acme.test"], model, folder, headers), marker


def _arrived(gw: GatewayProcess, fake: FakeVisdomIngest, session_id: str) -> Session:
    """The session once sealed, checked against the gateway's traces of it."""
    wait_for(ended(fake, session_id), 120, lambda: str(status(gw)))
    assert_clean(fake)
    session = fake.session(session_id)
    assert session.key == (f"repos:{REPO}", session_id)
    answered = [line for line in session.lines() if line["type"] == "assistant"]
    traces = gw.traces(session_id=session_id)
    assert sorted(line["message"]["id"] for line in answered) == sorted(
        t.message_id for t in traces
    )
    for line in answered:
        trace = next(t for t in traces if t.message_id == line["message"]["id"])
        assert line["message"]["usage"]["output_tokens"] == trace.output_tokens
    return session


def _tool_pair(session: Session, marker: str) -> None:
    pre = [e for e in session.tool_events() if e["hook_event_name"] == "PreToolUse"]
    post = [e for e in session.tool_events() if e["hook_event_name"] == "PostToolUse"]
    assert len(pre) == len(post) == 1, session.tool_events()
    assert pre[0]["tool_use_id"] == post[0]["tool_use_id"]
    assert marker in json.dumps(pre[0]["tool_input"])
    assert marker in json.dumps(post[0]["tool_response"])
    assert session.final_stats is not None and session.final_stats["total_tool_calls"] == 1


def test_a_real_claude_code_session_arrives_as_one_session(
    gateway: GatewayProcess, ingest: FakeVisdomIngest, tmp_path: Path
) -> None:
    setup, marker = _agent(gateway.url, gateway, "claude-test", tmp_path)
    run = run_claude(setup, "Write the marker file with the Bash tool.")
    result, tool_use = claude_bash_session(run, setup, marker)
    session = _arrived(gateway, ingest, result["session_id"])
    assert session.tool == "claude-code"
    _tool_pair(session, marker)
    assert session.tool_events()[0]["tool_use_id"] == tool_use["id"]
    assert session.tool_events()[0]["tool_name"] == "Bash"
    # Known from the system prompt of its main conversation; a side call before it (the
    # title of the session) does not say it.
    cwds = [e.get("cwd") for e in session.events]
    assert set(cwds) <= {str(setup.work), None} and cwds[-1] == str(setup.work), cwds


def test_a_real_codex_session_arrives_as_one_session(
    gateway: GatewayProcess, ingest: FakeVisdomIngest, tmp_path: Path
) -> None:
    setup, marker = _agent(gateway.openai_url, gateway, "gpt-test", tmp_path)
    run = run_codex(setup, "Write the marker file with a shell command.")
    assert run.returncode == 0, run.describe()
    assert (setup.work / "out.txt").read_text() == marker + "\n"
    # Its two calls (the shell call, then the answer to its output), once written.
    wait_for(lambda: len(gateway.traces(tool="codex")) == 2, 30, lambda: str(status(gateway)))
    (session_id,) = {t.session_id for t in gateway.traces(tool="codex")}
    assert session_id
    session = _arrived(gateway, ingest, session_id)
    assert session.tool == "codex"
    _tool_pair(session, marker)
    assert all(e.get("cwd") == str(setup.work) for e in session.events)
