"""A tool session as a tree of agents (issue 21.3): Claude Code's agent headers recorded on
each trace, and the sessions API giving each agent its parent, calls, usage and cost,
whatever the headers say (an unknown parent, a cycle, an agent its own parent, an
over-long id). The session page in a browser: tests/test_ui_browser.py."""

from __future__ import annotations

import uuid
from typing import Any

import httpx2
from peewee import chunked
from playhouse.shortcuts import model_to_dict

from tests.conftest import GatewayProcess, post_message
from tvgate.models import Trace, database
from tvgate.services.agents import agent_tree

AGENT, PARENT = "X-Claude-Code-Agent-Id", "X-Claude-Code-Parent-Agent-Id"


def _call(gateway: GatewayProcess, session: str, words: str, **headers: str) -> None:
    body = {
        # A route to a priced model: every call has a cost.
        "model": "claude-sonnet",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": words}],
    }
    response = post_message(gateway, body, session, **headers)
    assert response.status_code == 200, response.text


def _session(gateway: GatewayProcess, session: str, count: int) -> dict[str, Any]:
    gateway.wait_traces(count, session_id=session)
    response = httpx2.get(
        f"{gateway.url}/api/v1/sessions/{session}",
        headers={"Authorization": f"Bearer {gateway.tokens['dev@acme.test']}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    assert len(view["traces"]) == count
    return view


def _sums(traces: list[dict[str, Any]], agent: str) -> tuple[int, dict[str, int], float]:
    mine = [t for t in traces if t["agent_id"] == agent]
    usage = {name: sum(t["usage"][name] for t in mine) for name in mine[0]["usage"]}
    return len(mine), usage, sum(t["cost_usd"] for t in mine)


def test_a_session_is_a_tree_of_agents_each_with_its_usage_and_cost(
    gateway: GatewayProcess,
) -> None:
    session = "agents-" + uuid.uuid4().hex
    _call(gateway, session, "plan the work please")
    _call(gateway, session, "explore the code base now", **{AGENT: "explore-1"})
    _call(gateway, session, "read one file", **{AGENT: "explore-1"})
    _call(gateway, session, "check", **{AGENT: "check-2", PARENT: "explore-1"})
    _call(gateway, session, "and review all of it again", **{AGENT: "review-3"})
    view = _session(gateway, session, 5)
    traces = view["traces"]
    assert [(t["agent_id"], t["parent_agent_id"]) for t in traces] == [
        ("", ""),
        ("explore-1", ""),
        ("explore-1", ""),
        ("check-2", "explore-1"),
        ("review-3", ""),
    ]
    agents = view["agents"]
    # Depth-first, main agent first, subagents in the order they first called.
    assert [(a["agent_id"], a["parent_agent_id"], a["depth"], a["subagents"]) for a in agents] == [
        ("", None, 0, 2),
        ("explore-1", "", 1, 1),
        ("check-2", "explore-1", 2, 0),
        ("review-3", "", 1, 0),
    ]
    for agent in agents:
        calls, usage, cost = _sums(traces, agent["agent_id"])
        assert (agent["calls"], agent["usage"], agent["errors"]) == (calls, usage, 0)
        assert agent["cost_usd"] > 0 and abs(agent["cost_usd"] - cost) < 1e-9
    # Each agent's own figures, not the session's: they differ from agent to agent.
    assert len({a["usage"]["input_tokens"] for a in agents}) == len(agents)


def test_hostile_agent_headers_still_give_one_tree(gateway: GatewayProcess) -> None:
    session = "agents-hostile-" + uuid.uuid4().hex
    long_id = "a" * 300
    _call(gateway, session, "one", **{AGENT: "orphan", PARENT: "ghost"})
    _call(gateway, session, "two", **{AGENT: "d", PARENT: "e"})
    _call(gateway, session, "three", **{AGENT: "e", PARENT: "d"})
    _call(gateway, session, "four", **{AGENT: "self", PARENT: "self"})
    _call(gateway, session, "five", **{AGENT: long_id, PARENT: long_id + "b"})
    view = _session(gateway, session, 5)
    # Bounded like the session id: 200 characters; an agent is not its own parent.
    stored = {t["agent_id"]: t["parent_agent_id"] for t in view["traces"]}
    assert stored["self"] == "" and stored["a" * 200] == ""
    tree = [
        (a["agent_id"], a["parent_agent_id"], a["declared_parent_agent_id"], a["depth"])
        for a in view["agents"]
    ]
    # The unknown parent and the cycle hang under the main agent (which made no call
    # here); the cycle is cut at its agent seen first, and every agent is there once.
    assert tree == [
        ("", None, "", 0),
        ("orphan", "", "ghost", 1),
        ("self", "", "", 1),
        ("a" * 200, "", "", 1),
        ("d", "", "e", 1),
        ("e", "d", "d", 2),
    ]
    assert view["agents"][0]["calls"] == 0


def test_a_chain_of_thousands_of_agents_is_no_recursion() -> None:
    usage = dict.fromkeys(
        ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"), 1
    )
    traces = [
        {
            "agent_id": f"a{i}",
            "parent_agent_id": f"a{i - 1}" if i else "",
            "outcome": "ok",
            "cost_usd": 0.5,
            "usage": {**usage, "reasoning_tokens": 0},
        }
        for i in range(5000)
    ]
    agents = agent_tree(reversed(traces))
    assert len(agents) == 5001 and agents[-1]["depth"] == 5000
    assert [a["agent_id"] for a in agents[1:4]] == ["a0", "a1", "a2"]
    assert sum(a["calls"] for a in agents) == 5000


def test_a_session_of_ten_thousand_agents_is_one_bounded_page_that_says_so(
    gateway: GatewayProcess,
) -> None:
    """A hostile client names a new agent on each of 10,000 calls in one session: the
    session view is its first 5,000 calls (oldest first) and their agents, and says it is
    cut, so that no reader takes its sums for the session's."""
    session = "agents-many-" + uuid.uuid4().hex
    _call(gateway, session, "the main agent's call")
    (first,) = gateway.wait_traces(1, session_id=session)
    # The 10,000 calls' traces as the writer would store them: rows like the real one.
    row = model_to_dict(first, recurse=False)
    rows = [
        {
            **row,
            "id": uuid.uuid4().hex,
            "agent_id": f"agent-{i}",
            "received_at": first.received_at + i + 1,
        }
        for i in range(10_000)
    ]
    with database.atomic():
        for batch in chunked(rows, 100):
            Trace.insert_many(batch).execute()
    response = httpx2.get(
        f"{gateway.url}/api/v1/sessions/{session}",
        headers={"Authorization": f"Bearer {gateway.tokens['dev@acme.test']}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["truncated"], view["traces_limit"], len(view["traces"])) == (True, 5000, 5000)
    assert view["traces"][0]["id"] == first.id
    assert view["traces"][-1]["agent_id"] == "agent-4998"
    assert len(view["agents"]) == 5000  # the main agent and the 4,999 that called in the page
    # A session within the cap says it is whole.
    small = "agents-few-" + uuid.uuid4().hex
    _call(gateway, small, "one call")
    assert _session(gateway, small, 1)["truncated"] is False
