"""Who and what made a call: the tool from its User-Agent, the client's session and agent,
repo and branch."""

from __future__ import annotations

import functools
import re

from tornado.httputil import HTTPHeaders

from tvgate.headers import header

# Order matters: the first pattern that matches names the tool. Tools built on an
# SDK send the SDK's User-Agent with their own name in front.
_TOOLS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        # claude-cli/ on its model calls, claude-code/ on its gateway model discovery.
        ("claude-code", r"claude-(?:cli|code)/([\w.\-]+)"),
        ("codex", r"codex[_\w-]*/([\w.\-]+)"),
        ("cursor", r"cursor/([\w.\-]+)"),
        ("gsd2", r"gsd2?/([\w.\-]+)"),
        ("aider", r"aider/([\w.\-]+)"),
        ("continue", r"continue/([\w.\-]+)"),
        ("cline", r"cline/([\w.\-]+)"),
        ("opencode", r"opencode/([\w.\-]+)"),
        ("anthropic-sdk", r"anthropic/(?:python|js|ts)?\s*([\w.\-]+)"),
        ("openai-sdk", r"openai/(?:python|js|ts)?\s*([\w.\-]+)"),
    )
)

#: Attribution headers, accepted under both prefixes, never forwarded upstream.
ATTRIBUTION_PREFIXES = ("x-tvgate-", "x-tracevault-")


@functools.lru_cache(maxsize=1024)
def detect_tool(user_agent: str) -> tuple[str, str]:
    """(tool, version) named by a User-Agent; ("other", "") when none matches.

    Cached: a team sends a handful of User-Agents, so the patterns run once per string,
    not once per request.
    """
    for name, pattern in _TOOLS:
        match = pattern.search(user_agent)
        if match:
            return name, match.group(1)[:64]
    return "other", ""


def attribution_header(headers: HTTPHeaders, name: str) -> str:
    for prefix in ATTRIBUTION_PREFIXES:
        value = header(headers, prefix + name)
        if value:
            return value[:200]
    return ""


#: The longest client id kept (a session's, an agent's): the trace column's size.
CLIENT_ID_LENGTH = 200


def _client_id(value: str | None) -> str:
    """A client-chosen id as a trace keeps it: stripped, at most ``CLIENT_ID_LENGTH``."""
    return value.strip()[:CLIENT_ID_LENGTH] if value else ""


def session_id(headers: HTTPHeaders) -> str:
    """The client's own session id: Claude Code's, Codex's, or one the user set."""
    return _client_id(
        header(headers, "X-Claude-Code-Session-Id")
        or header(headers, "Session-Id")
        or attribution_header(headers, "session")
    )


def agent_ids(headers: HTTPHeaders) -> tuple[str, str]:
    """(agent, parent agent) of the call within its session: Claude Code sends them for a
    subagent's calls (``X-Claude-Code-Agent-Id``, ``X-Claude-Code-Parent-Agent-Id``), none
    for its main agent's. An agent named as its own parent has none."""
    agent = _client_id(header(headers, "X-Claude-Code-Agent-Id"))
    parent = _client_id(header(headers, "X-Claude-Code-Parent-Agent-Id"))
    return agent, ("" if parent == agent else parent)
