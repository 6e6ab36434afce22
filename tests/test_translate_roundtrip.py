"""Property tests of the request translators: what both APIs have survives there and back.

A conversation is generated in a neutral form (:class:`Conversation`: system texts, the
user's text, images and tool results, the assistant's text and tool calls, tools, the
output limit, sampling, stop sequences, ``tool_choice`` and parallel calls), written out
as a Chat Completions, an Anthropic Messages or a Responses request (in any of the
spellings each API allows), and translated with the translators' own request phases:

* Chat → Anthropic → Chat (:mod:`.chat_to_anthropic`, then :mod:`.anthropic_to_chat`);
* Anthropic → Chat → Anthropic (the same two, the other way round);
* Responses → Anthropic → Chat, and Responses → Chat (:mod:`.responses_to_anthropic`,
  :mod:`.responses_to_chat`): Responses has no translator back, so the Anthropic body is
  read back through the Chat one and both must match the conversation, as must the body
  ``responses_to_chat`` makes directly.

Each body on the way is read back into the neutral form, which must equal the one
generated: a field both APIs have is never lost or changed, and nothing is noted as
dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_translate_chat_anthropic import json_values, names
from tvgate.translate import anthropic_to_chat, chat_to_anthropic
from tvgate.translate import responses_to_anthropic as r2a
from tvgate.translate import responses_to_chat as r2c

JSON = dict[str, Any]
MODEL = "route-model"
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYAAAAAMAASsJTYQAAAAASUVORK5CYII="
USER: JSON = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
IMAGES = [PNG, "data:image/jpeg;base64,/9j/4AAQ", "https://x.test/a.png"]


@dataclass
class Turn:
    """One exchange: the results of the calls before it, the user's parts, the answer."""

    results: list[tuple[str, list[str]]]
    user: list[tuple[str, str]]  # ("text", text) or ("image", url)
    text: str | None
    calls: list[tuple[str, str, JSON]]


@dataclass
class Conversation:
    system: list[str]
    turns: list[Turn]
    max_tokens: int
    tools: list[tuple[str, str | None, JSON]] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    #: None (auto), "none", "any" or ("tool", name).
    tool_choice: object = None
    parallel: bool = True

    def neutral(self) -> JSON:
        """The form :func:`from_chat` and :func:`from_anthropic` read bodies back into."""
        items: list[tuple[Any, ...]] = []
        for turn in self.turns:
            items += [("user", "result", call_id, texts) for call_id, texts in turn.results]
            items += [("user", kind, value) for kind, value in turn.user]
            if turn.text is not None:
                items.append(("assistant", "text", turn.text))
            items += [("assistant", "call", *call) for call in turn.calls]
        return normal(
            {
                "system": self.system,
                "items": items,
                "tools": self.tools,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "stop": self.stop,
                "tool_choice": self.tool_choice,
                "parallel": self.parallel,
            }
        )


def normal(form: JSON) -> JSON:
    """Parallel calls matter only where a tool may be called; JSON values as JSON."""
    if not form["tools"] or form["tool_choice"] == "none":
        form["parallel"] = True
    out: JSON = orjson.loads(orjson.dumps(form))
    return out


# --- generating a conversation ------------------------------------------------------

# Texts that are not blank: Anthropic and the translators skip empty text parts.
texts = st.text(min_size=1, max_size=10).filter(str.strip)
user_parts = st.lists(
    st.tuples(st.just("text"), texts) | st.tuples(st.just("image"), st.sampled_from(IMAGES)),
    min_size=1,
    max_size=3,
)


@st.composite
def conversations(draw: st.DrawFn, stop: bool = True) -> Conversation:
    turns: list[Turn] = []
    pending: list[str] = []
    count = draw(st.integers(1, 4))
    for n in range(count):
        results = [(call_id, draw(st.lists(texts, min_size=1, max_size=2))) for call_id in pending]
        user = draw(user_parts) if not pending or draw(st.booleans()) else []
        last = n == count - 1
        calls = [
            (f"call_{n}_{k}", draw(names), draw(st.dictionaries(names, json_values, max_size=3)))
            for k in range(0 if last else draw(st.integers(0, 2)))
        ]
        text = draw(texts) if not calls or draw(st.booleans()) else None
        if last and draw(st.booleans()):
            text = None  # the request ends on the user's turn
        turns.append(Turn(results, user, text, calls))
        pending = [call[0] for call in calls]
    tools = draw(
        st.lists(
            st.tuples(
                names,
                st.none() | texts,
                st.builds(
                    lambda props: {"type": "object", "properties": props},
                    st.dictionaries(names, st.just({"type": "string"}), max_size=2),
                ),
            ),
            max_size=3,
            unique_by=lambda t: t[0],
        )
    )
    choices: list[object] = [None, "none", "any"] + [("tool", t[0]) for t in tools]
    return Conversation(
        system=draw(st.lists(texts, max_size=2)),
        turns=turns,
        max_tokens=draw(st.integers(1, 64000)),
        tools=tools,
        temperature=draw(st.none() | st.floats(0, 1)),
        top_p=draw(st.none() | st.floats(0, 1)),
        stop=draw(st.none() | st.lists(texts, min_size=1, max_size=3)) if stop else None,
        tool_choice=draw(st.sampled_from(choices)) if tools else None,
        parallel=draw(st.booleans()),
    )


# --- writing it out in each API -----------------------------------------------------


def chat_body(c: Conversation, draw: st.DrawFn) -> JSON:
    messages: list[JSON] = [
        {"role": draw(st.sampled_from(["system", "developer"])), "content": _text(t, draw)}
        for t in c.system
    ]
    for turn in c.turns:
        for call_id, result in turn.results:
            content: object = result[0] if len(result) == 1 else _text_parts(result)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        if turn.user:
            parts = [
                {"type": "text", "text": v}
                if k == "text"
                else {"type": "image_url", "image_url": {"url": v}}
                for k, v in turn.user
            ]
            if len(parts) == 1 and parts[0]["type"] == "text" and draw(st.booleans()):
                messages.append({"role": "user", "content": parts[0]["text"]})
            else:
                messages.append({"role": "user", "content": parts})
        if turn.text is not None or turn.calls:
            text = None if turn.text is None else _text(turn.text, draw)
            message: JSON = {"role": "assistant", "content": text}
            if turn.calls:
                message["tool_calls"] = [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": orjson.dumps(args).decode()},
                    }
                    for call_id, name, args in turn.calls
                ]
            messages.append(message)
    limit = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body: JSON = {"model": "gpt-route", "messages": messages, limit: c.max_tokens}
    _sampling(c, body)
    if c.stop is not None:
        body["stop"] = c.stop[0] if len(c.stop) == 1 and draw(st.booleans()) else c.stop
    if c.tools:
        body["tools"] = [
            {"type": "function", "function": _function(name, desc, schema, "parameters")}
            for name, desc, schema in c.tools
        ]
    return _with_tool_options(body, _openai_choice(c.tool_choice), c)


def anthropic_body(c: Conversation, draw: st.DrawFn) -> JSON:
    body: JSON = {"model": "claude-route", "max_tokens": c.max_tokens, "messages": []}
    if c.system:
        if len(c.system) == 1 and draw(st.booleans()):
            body["system"] = c.system[0]
        else:
            body["system"] = _text_parts(c.system)
    for turn in c.turns:
        blocks: list[JSON] = [
            {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": result[0] if len(result) == 1 else _text_parts(result),
            }
            for call_id, result in turn.results
        ]
        blocks += [
            {"type": "text", "text": v} if k == "text" else {"type": "image", "source": _source(v)}
            for k, v in turn.user
        ]
        if blocks:
            body["messages"].append({"role": "user", "content": blocks})
        answer: list[JSON] = [{"type": "text", "text": turn.text}] if turn.text else []
        answer += [
            {"type": "tool_use", "id": call_id, "name": name, "input": args}
            for call_id, name, args in turn.calls
        ]
        if answer:
            if len(answer) == 1 and turn.text is not None and draw(st.booleans()):
                body["messages"].append({"role": "assistant", "content": turn.text})
            else:
                body["messages"].append({"role": "assistant", "content": answer})
    _sampling(c, body)
    if c.stop is not None:
        body["stop_sequences"] = c.stop
    if c.tools:
        body["tools"] = [_function(n, d, s, "input_schema") for n, d, s in c.tools]
    choice: JSON | None = None
    if c.tool_choice is not None:
        kind = c.tool_choice if isinstance(c.tool_choice, str) else "tool"
        choice = {"type": kind}
        if isinstance(c.tool_choice, tuple):
            choice["name"] = c.tool_choice[1]
    if not c.parallel and c.tool_choice != "none":
        choice = {"type": "auto", **(choice or {}), "disable_parallel_tool_use": True}
    if choice is not None:
        body["tool_choice"] = choice
    return body


def responses_body(c: Conversation, draw: st.DrawFn) -> JSON:
    items: list[JSON] = []
    body: JSON = {"model": "gpt-route", "max_output_tokens": c.max_tokens}
    system = list(c.system)
    instructions: bool = draw(st.booleans())
    if system and instructions:
        # The first system text as instructions, the rest as system/developer messages.
        body["instructions"] = system.pop(0)
    for t in system:
        role = draw(st.sampled_from(["system", "developer"]))
        items.append({"type": "message", "role": role, "content": _input_text([t], draw)})
    for turn in c.turns:
        for call_id, result in turn.results:
            output: object = _input_text(result, draw)
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        if turn.user:
            parts = [
                {"type": "input_text", "text": v}
                if k == "text"
                else {"type": "input_image", "image_url": v}
                for k, v in turn.user
            ]
            message: JSON = {"role": "user", "content": parts}
            if draw(st.booleans()):
                message["type"] = "message"
            items.append(message)
        if turn.text is not None:
            content: object = [{"type": "output_text", "text": turn.text}]
            if draw(st.booleans()):
                content = turn.text
            items.append({"type": "message", "role": "assistant", "content": content})
        items += [
            {
                "type": "function_call",
                "call_id": call_id,
                "name": name,
                "arguments": orjson.dumps(args).decode(),
            }
            for call_id, name, args in turn.calls
        ]
    body["input"] = items
    _sampling(c, body)
    if c.tools:
        body["tools"] = [
            {"type": "function", **_function(n, d, s, "parameters")} for n, d, s in c.tools
        ]
    choice = _openai_choice(c.tool_choice)
    if isinstance(choice, dict):
        choice = {"type": "function", "name": choice["function"]["name"]}
    return _with_tool_options(body, choice, c)


def _with_tool_options(body: JSON, choice: object, c: Conversation) -> JSON:
    """``body`` with the tool choice, when there is one, and ``parallel_tool_calls`` false
    when the conversation wants one call at a time: as both OpenAI APIs write them."""
    if choice is not None:
        body["tool_choice"] = choice
    if not c.parallel:
        body["parallel_tool_calls"] = False
    return body


def _text(value: str, draw: st.DrawFn) -> object:
    """A Chat message's text: a string, or one text part."""
    return value if draw(st.booleans()) else [{"type": "text", "text": value}]


def _text_parts(values: list[str]) -> list[JSON]:
    return [{"type": "text", "text": t} for t in values]


def _input_text(values: list[str], draw: st.DrawFn) -> object:
    if len(values) == 1 and draw(st.booleans()):
        return values[0]
    return [{"type": "input_text", "text": t} for t in values]


def _sampling(c: Conversation, body: JSON) -> None:
    for key in ("temperature", "top_p"):
        if getattr(c, key) is not None:
            body[key] = getattr(c, key)


def _function(name: str, desc: str | None, schema: JSON, schema_key: str) -> JSON:
    out: JSON = {"name": name, schema_key: schema}
    if desc is not None:
        out["description"] = desc
    return out


def _openai_choice(choice: object) -> object:
    if isinstance(choice, tuple):
        return {"type": "function", "function": {"name": choice[1]}}
    return {"any": "required"}.get(choice, choice) if isinstance(choice, str) else None


def _source(url: str) -> JSON:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        return {"type": "base64", "media_type": head[5:-7], "data": data}
    return {"type": "url", "url": url}


# --- reading a body back ------------------------------------------------------------


def _texts(content: Any) -> list[str]:
    """The texts of a string or a list of text parts (or blocks)."""
    if isinstance(content, str):
        return [content] if content else []
    return [part["text"] for part in content or ()]


def from_chat(body: JSON) -> JSON:
    system: list[str] = []
    items: list[tuple[Any, ...]] = []
    for m in body["messages"]:
        role, content = m["role"], m.get("content")
        if role in ("system", "developer"):
            system += _texts(content)
        elif role == "tool":
            items.append(("user", "result", m["tool_call_id"], _texts(content)))
        elif role == "user" and isinstance(content, list):
            for part in content:
                if part["type"] == "text":
                    items.append(("user", "text", part["text"]))
                else:
                    items.append(("user", "image", part["image_url"]["url"]))
        else:
            items += [(role, "text", t) for t in _texts(content)]
            for call in m.get("tool_calls", ()):
                fn = call["function"]
                args = orjson.loads(fn["arguments"])
                items.append(("assistant", "call", call["id"], fn["name"], args))
    stop = body.get("stop")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = ("tool", choice["function"]["name"])
    return normal(
        {
            "system": system,
            "items": items,
            "tools": [
                (
                    t["function"]["name"],
                    t["function"].get("description"),
                    t["function"]["parameters"],
                )
                for t in body.get("tools", ())
            ],
            "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "stop": [stop] if isinstance(stop, str) else stop,
            "tool_choice": {"auto": None, "required": "any"}.get(choice, choice)
            if isinstance(choice, str)
            else choice,
            "parallel": body.get("parallel_tool_calls") is not False,
        }
    )


def from_anthropic(body: JSON) -> JSON:
    items: list[tuple[Any, ...]] = []
    for turn in body["messages"]:
        role, content = turn["role"], turn["content"]
        if isinstance(content, str):
            items.append((role, "text", content))
            continue
        for b in content:
            if b["type"] == "text":
                items.append((role, "text", b["text"]))
            elif b["type"] == "image":
                src = b["source"]
                url = src.get("url") or f"data:{src['media_type']};base64,{src['data']}"
                items.append((role, "image", url))
            elif b["type"] == "tool_use":
                items.append((role, "call", b["id"], b["name"], b["input"]))
            else:
                items.append((role, "result", b["tool_use_id"], _texts(b["content"])))
    choice = dict(body.get("tool_choice") or {"type": "auto"})
    kind = choice["type"]
    return normal(
        {
            "system": _texts(body.get("system")),
            "items": items,
            "tools": [
                (t["name"], t.get("description"), t["input_schema"]) for t in body.get("tools", ())
            ],
            "max_tokens": body["max_tokens"],
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "stop": body.get("stop_sequences"),
            "tool_choice": ("tool", choice["name"])
            if kind == "tool"
            else {"auto": None}.get(kind, kind),
            "parallel": not choice.get("disable_parallel_tool_use"),
        }
    )


# --- the properties -----------------------------------------------------------------

#: A note that is no loss: Anthropic→Chat says a final assistant turn is history.
_FINAL_ASSISTANT = "messages[-1]: a final assistant turn is sent as history, not continued"


def lossless(
    translated: Any, read: Callable[[JSON], object], c: Conversation, *harmless: str
) -> JSON:
    """The body of a translation that lost nothing of ``c``: it notes nothing but the
    ``harmless`` notes, and ``read`` finds the conversation in it again."""
    assert [n for n in translated.dropped if n not in harmless] == []
    assert read(translated.body) == c.neutral()
    body: JSON = translated.body
    return body


@st.composite
def written(draw: st.DrawFn, api: str) -> tuple[Conversation, JSON]:
    c = draw(conversations(stop=api != "responses"))
    writer = {"chat": chat_body, "anthropic": anthropic_body, "responses": responses_body}[api]
    return c, writer(c, draw)


@settings(max_examples=200, deadline=None)
@given(written("chat"))
def test_chat_to_anthropic_and_back(case: tuple[Conversation, JSON]) -> None:
    c, body = case
    there = lossless(chat_to_anthropic.translate_request(body, MODEL), from_anthropic, c)
    lossless(
        anthropic_to_chat.translate_request(there, model=MODEL), from_chat, c, _FINAL_ASSISTANT
    )


@settings(max_examples=200, deadline=None)
@given(written("anthropic"))
def test_anthropic_to_chat_and_back(case: tuple[Conversation, JSON]) -> None:
    c, body = case
    there = lossless(
        anthropic_to_chat.translate_request(body, model=MODEL), from_chat, c, _FINAL_ASSISTANT
    )
    lossless(chat_to_anthropic.translate_request(there, MODEL), from_anthropic, c)


@settings(max_examples=200, deadline=None)
@given(written("responses"))
def test_responses_to_anthropic_to_chat_and_to_chat(case: tuple[Conversation, JSON]) -> None:
    c, body = case
    there = lossless(r2a.translate_request(body, MODEL), from_anthropic, c)
    on = anthropic_to_chat.translate_request(there, model=MODEL)
    assert from_chat(on.body) == c.neutral()
    lossless(r2c.translate_request(body, MODEL), from_chat, c)


@pytest.mark.parametrize("effort", ["low", "medium", "high", "xhigh"])
def test_reasoning_effort_there_and_back(effort: str) -> None:
    """An effort comes back as itself where the output limit leaves its whole budget."""
    chat = {**USER, "max_completion_tokens": 64000, "reasoning_effort": effort}
    there = chat_to_anthropic.translate_request(chat, MODEL)
    assert (
        anthropic_to_chat.translate_request(there.body, model=MODEL).body["reasoning_effort"]
        == effort
    )
    responses = {"input": "hi", "max_output_tokens": 64000, "reasoning": {"effort": effort}}
    via = r2a.translate_request(responses, MODEL)
    assert (
        anthropic_to_chat.translate_request(via.body, model=MODEL).body["reasoning_effort"]
        == effort
    )
    assert r2c.translate_request(responses, MODEL).body["reasoning_effort"] == effort


def test_json_schema_output_there_and_back() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = {**USER, "max_tokens": 100, "response_format": {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}}  # fmt: skip
    there = chat_to_anthropic.translate_request(chat, MODEL).body
    assert there["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    back = anthropic_to_chat.translate_request(there, model=MODEL).body
    assert back["response_format"] == chat["response_format"]
    responses = {
        "input": "hi",
        "text": {
            "format": {"type": "json_schema", "name": "output", "schema": schema, "strict": True}
        },
    }
    assert r2a.translate_request(responses, MODEL).body["output_config"] == there["output_config"]
    assert (
        r2c.translate_request(responses, MODEL).body["response_format"] == chat["response_format"]
    )
