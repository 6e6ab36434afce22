"""Who and what made a call: the tool from its User-Agent, the client's session, repo and branch."""

from __future__ import annotations

import functools
import re

from tornado.httputil import HTTPHeaders

# Order matters: the first pattern that matches names the tool. Tools built on an
# SDK send the SDK's User-Agent with their own name in front.
_TOOLS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("claude-code", r"claude-cli/([\w.\-]+)"),
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
        value = headers.get(prefix + name)
        if value:
            return value[:200]
    return ""


def session_id(headers: HTTPHeaders) -> str:
    """The client's own session id: Claude Code's, Codex's, or one the user set."""
    value = (
        headers.get("X-Claude-Code-Session-Id")
        or headers.get("Session-Id")
        or attribution_header(headers, "session")
    )
    return value[:200] if value else ""
