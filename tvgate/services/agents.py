"""A tool session as a tree of agents: the main agent, the subagents it started, theirs.

Claude Code names the agent of each call (``X-Claude-Code-Agent-Id``) and the agent that
started it (``X-Claude-Code-Parent-Agent-Id``); its main agent sends neither. Those are
the client's words, so a tree is built whatever they say: an agent whose parent never
called in the session, or whose parents lead round in a cycle, hangs under the main agent
(the cycle is cut at its agent seen first), and every agent appears once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tvgate.models import OUTCOME_OK

#: The usage figures an agent adds up, as a trace summary names them.
_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


@dataclass
class _Agent:
    agent_id: str
    #: The parent the agent's first call named ("" for none).
    declared_parent: str
    calls: int = 0
    errors: int = 0
    cost_usd: float = 0.0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_USAGE, 0))
    children: list[_Agent] = field(default_factory=list)

    def add(self, trace: dict[str, Any]) -> None:
        self.calls += 1
        self.errors += trace["outcome"] != OUTCOME_OK
        self.cost_usd += trace["cost_usd"] or 0.0
        for name in _USAGE:
            self.usage[name] += trace["usage"][name]


def agent_tree(traces: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The session's agents, main agent first, each followed by its subagents (depth-first,
    in the order they first called): per agent its id ("" for the main agent), the parent
    it hangs under (None for the main agent), the parent its calls named, its depth, its
    calls, errors, usage and cost."""
    main = _Agent("", "")
    agents: dict[str, _Agent] = {"": main}
    for trace in traces:
        agent_id = trace["agent_id"]
        agent = agents.get(agent_id)
        if agent is None:
            agent = agents[agent_id] = _Agent(agent_id, trace["parent_agent_id"])
        agent.add(trace)
    named: dict[str, list[_Agent]] = {}
    for agent in agents.values():
        if agent is not main:
            parent = agent.declared_parent if agent.declared_parent in agents else ""
            named.setdefault(parent, []).append(agent)
    placed: set[str] = set()

    def place(parent: _Agent) -> None:
        # Iterative: a hostile chain of thousands of agents must not exhaust the stack.
        pending = [parent]
        while pending:
            current = pending.pop()
            for child in named.get(current.agent_id, ()):
                if child.agent_id not in placed:
                    placed.add(child.agent_id)
                    current.children.append(child)
                    pending.append(child)

    placed.add("")
    place(main)
    for agent in agents.values():
        if agent.agent_id not in placed:
            # In a cycle (or below one): cut it here, under the main agent.
            placed.add(agent.agent_id)
            main.children.append(agent)
            place(agent)
    return _flatten(main)


def _flatten(main: _Agent) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pending: list[tuple[_Agent, _Agent | None, int]] = [(main, None, 0)]
    while pending:
        agent, parent, depth = pending.pop()
        rows.append(
            {
                "agent_id": agent.agent_id,
                "parent_agent_id": None if parent is None else parent.agent_id,
                "declared_parent_agent_id": agent.declared_parent,
                "depth": depth,
                "subagents": len(agent.children),
                "calls": agent.calls,
                "errors": agent.errors,
                "usage": agent.usage,
                "cost_usd": agent.cost_usd,
            }
        )
        pending.extend((child, agent, depth + 1) for child in reversed(agent.children))
    return rows
