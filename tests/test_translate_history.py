"""Tests of tvgate.translate.history: a request translated from the previous call's
translated history is the request translated whole, byte for byte, note for note."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import chat_payloads, payloads
from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI
from tvgate.providers import ANTHROPIC_MESSAGES, OPENAI_CHAT, api_for
from tvgate.translate import history, pairs
from tvgate.translate.pairs import Pair, Untranslatable

OWNER = (1, 1)


def _pair(client: str, route: str) -> Pair:
    pair = pairs.pair_for(api_for(client), route)
    assert pair is not None
    return pair


CHAT_ON_ANTHROPIC = _pair(OPENAI_CHAT, PROVIDER_ANTHROPIC)
ANTHROPIC_ON_CHAT = _pair(ANTHROPIC_MESSAGES, PROVIDER_OPENAI)


@pytest.fixture(autouse=True)
def fresh_histories(monkeypatch: pytest.MonkeyPatch) -> Iterator[history.Histories]:
    kept = history.Histories()
    monkeypatch.setattr(pairs, "HISTORIES", kept)
    # Small bodies are kept too, so that short conversations show every case.
    monkeypatch.setattr(history, "MIN_BODY", 0)
    yield kept


def whole(pair: Pair, raw: bytes) -> tuple[bytes, list[str]] | str:
    """The translation of ``raw`` with nothing kept: its body and notes, or its refusal."""
    kept = pairs.HISTORIES
    pairs.HISTORIES = history.Histories()
    try:
        return outcome(pair, raw)
    finally:
        pairs.HISTORIES = kept


def outcome(pair: Pair, raw: bytes) -> tuple[bytes, list[str]] | str:
    try:
        translation = pair.start(raw, "upstream-model", OWNER)
    except Untranslatable as exc:
        return f"refused: {exc}"
    return translation.body, list(translation.notes)


def check_session(pair: Pair, bodies: list[bytes]) -> int:
    """Every body translated in turn as one caller's equals it translated whole; the
    number translated from a kept history. The first body is sent twice: a body is
    scanned and kept once its caller sent one like it before."""
    kept = pairs.HISTORIES
    for raw in bodies[:1] + bodies:
        expected = whole(pair, raw)
        assert outcome(pair, raw) == expected
    return kept.resumed


@pytest.mark.parametrize(
    ("pair", "make"),
    [
        (CHAT_ON_ANTHROPIC, chat_payloads.large_chat_request),
        (ANTHROPIC_ON_CHAT, payloads.large_request),
    ],
    ids=["chat-on-anthropic", "anthropic-on-chat"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bench_bodies_continue_from_the_last(pair: Pair, make: Any, stream: bool) -> None:
    template = make("bench-route", stream)
    bodies = [template.replace(payloads.SEQUENCE_MARK, b"%010d" % n) for n in range(5)]
    assert check_session(pair, bodies) == 4  # all but the first (sent twice)
    # The same body again: its last message is translated again, the rest reused.
    assert check_session(pair, [bodies[-1]]) == 6


def test_a_one_off_body_is_not_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large body unlike any its caller sent before is translated whole and kept
    unscanned; a small one is not kept at all."""
    monkeypatch.setattr(history, "MIN_BODY", 16 * 1024)
    kept = pairs.HISTORIES
    large = chat_payloads.large_chat_request("r", False)
    small = chat_payloads.small_chat_request("r", False)
    scans: list[bytes] = []
    real_split = history.split_body

    def counting(raw: bytes) -> Any:
        scans.append(raw)
        return real_split(raw)

    monkeypatch.setattr(history, "split_body", counting)
    outcome(CHAT_ON_ANTHROPIC, small)
    assert kept.recent.size == 0
    outcome(CHAT_ON_ANTHROPIC, large)
    assert scans == [] and kept.recent.size == len(large)
    outcome(CHAT_ON_ANTHROPIC, large.replace(payloads.SEQUENCE_MARK, b"0000000001"))
    assert len(scans) == 1 and kept.resumed == 0
    outcome(CHAT_ON_ANTHROPIC, large.replace(payloads.SEQUENCE_MARK, b"0000000002"))
    assert len(scans) == 1 and kept.resumed == 1


def anthropic_session(turns: int, seed: int) -> list[bytes]:
    """Claude Code's successive bodies: each the one before plus a tool call and its
    result, the cache_control marker moved to the newest message."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Fix the test."}]
    bodies = []
    # Some clients send the system prompt before the conversation.
    system_first = rng.random() < 0.5
    for n in range(turns):
        for message in messages:
            if isinstance(message["content"], list):
                message["content"][-1].pop("cache_control", None)
        doc: dict[str, Any] = {"model": "r", "messages": messages, "max_tokens": 4096}
        if system_first:
            doc = {"system": [{"type": "text", "text": "You are an agent."}], **doc}
        if rng.random() < 0.3:
            doc["thinking"] = {"type": "enabled", "budget_tokens": 2048}
        bodies.append(orjson.dumps(doc))
        tool_id = f"toolu_{n:04d}"
        blocks: list[dict[str, Any]] = [{"type": "text", "text": f"Reading {n}."}]
        if rng.random() < 0.3:
            blocks.insert(0, {"type": "thinking", "thinking": "hm", "signature": "sig"})
        blocks.append({"type": "tool_use", "id": tool_id, "name": "read", "input": {"n": n}})
        result: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": tool_id,
            "content": "x" * rng.choice([10, 2000]),
            "cache_control": {"type": "ephemeral"},
        }
        messages = [*messages, {"role": "assistant", "content": blocks}]
        messages.append({"role": "user", "content": [result]})
    return bodies


def chat_session(turns: int, seed: int) -> list[bytes]:
    """An OpenAI SDK agent's successive bodies: parallel tool calls, a system message
    now and then in the conversation, reasoning effort on some calls."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Fix the test."},
    ]
    bodies = []
    for n in range(turns):
        doc: dict[str, Any] = {"model": "r", "messages": messages, "max_completion_tokens": 4096}
        if rng.random() < 0.4:
            doc["reasoning_effort"] = "low"
        bodies.append(orjson.dumps(doc))
        calls = [
            {
                "id": f"call_{n}_{k}",
                "type": "function",
                "function": {"name": "read", "arguments": orjson.dumps({"k": k}).decode()},
            }
            for k in range(rng.randint(1, 3))
        ]
        messages = [*messages, {"role": "assistant", "content": f"Step {n}.", "tool_calls": calls}]
        messages += [
            {"role": "tool", "tool_call_id": call["id"], "content": "y" * rng.choice([5, 1500])}
            for call in calls
        ]
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": f"Note {n}."})
        if rng.random() < 0.5:
            messages.append({"role": "user", "content": "Go on."})
    return bodies


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_a_growing_claude_code_session_is_translated_as_whole(turns: int, seed: int) -> None:
    pairs.HISTORIES = history.Histories()
    assert check_session(ANTHROPIC_ON_CHAT, anthropic_session(turns, seed)) >= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turns=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_a_growing_chat_session_is_translated_as_whole(turns: int, seed: int) -> None:
    pairs.HISTORIES = history.Histories()
    assert check_session(CHAT_ON_ANTHROPIC, chat_session(turns, seed)) >= 1


def test_a_message_that_merges_into_a_kept_turn() -> None:
    """Chat to Anthropic merges a user message into the tool results before it: a body
    whose message after the mark has the kept turn's role is translated whole."""
    base = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    first = orjson.dumps({"model": "r", "messages": base})
    # The mark before "c" is kept; the next body has an assistant message there instead,
    # which joins the assistant turn before it.
    second = orjson.dumps(
        {"model": "r", "messages": [*base[:2], {"role": "assistant", "content": "d"}]}
    )
    check_session(CHAT_ON_ANTHROPIC, [first, second])


def test_thinking_off_for_a_tool_loop_in_the_kept_history() -> None:
    """The last assistant turn (a tool call without thinking) is in the reused history:
    thinking is still turned off and noted, as for the whole body."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]
    bodies = [
        orjson.dumps({"model": "r", "messages": messages + extra, "reasoning_effort": "high"})
        for extra in ([], [{"role": "user", "content": "more"}])
    ]
    assert check_session(CHAT_ON_ANTHROPIC, bodies) == 1
    notes = outcome(CHAT_ON_ANTHROPIC, bodies[1])[1]
    assert "reasoning_effort: thinking off, the last tool call has no thinking block" in notes


@pytest.mark.parametrize(
    "tail",
    [
        # A second `messages` after the first: a parser takes the last.
        b',"messages":[{"role":"user","content":"other"}]}',
        # The same key written with an escape.
        b',"me\\u0073sages":[{"role":"user","content":"other"}]}',
    ],
    ids=["repeated", "escaped"],
)
def test_a_body_whose_keys_a_parser_reads_otherwise(tail: bytes) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    first = orjson.dumps({"model": "r", "messages": messages})
    second = first[:-1] + tail
    assert check_session(ANTHROPIC_ON_CHAT, [first, second]) == 0
    assert check_session(CHAT_ON_ANTHROPIC, [first, second]) == 0


def test_a_refusal_in_the_new_messages_is_the_whole_body_refusal() -> None:
    messages: list[Any] = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    first = orjson.dumps({"model": "r", "messages": [*messages, {"role": "user", "content": "c"}]})
    for bad in ({"role": "robot", "content": "c"}, "not a message", {"role": "user"}):
        second = orjson.dumps({"model": "r", "messages": [*messages, bad]})
        for pair in (CHAT_ON_ANTHROPIC, ANTHROPIC_ON_CHAT):
            check_session(pair, [first, second])
            assert isinstance(whole(pair, second), str) or bad == {"role": "user"}


def test_memory_is_bounded() -> None:
    kept = history.Histories(budget=2_000_000)
    template = chat_payloads.large_chat_request("r", False)

    def translate(document: dict[str, Any], prefix: history.Prefix | None) -> Any:
        from tvgate.translate import chat_to_anthropic

        done = chat_to_anthropic.translate_request(document, "m", prefix=prefix)
        return done, done.body, done.output

    for owner in range(20):
        for n in range(3 * history.PER_OWNER):
            # Each owner's bodies in several conversations, each continued.
            raw = template.replace(b"You are", b"You are %d" % (n % 3), 1)
            kept.translate(owner, raw.replace(payloads.SEQUENCE_MARK, b"%010d" % n), translate)
            assert kept.recent.size <= kept.recent.budget
    assert kept.resumed > 0 and kept.recent.size > kept.recent.budget // 2
