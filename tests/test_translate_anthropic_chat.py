"""Tests of tvgate.translate.anthropic_to_chat: an Anthropic Messages client on a Chat route.

Requests are shaped like what Claude Code sends (see /work/shared/wire/); upstream answers
come from ``tests/fake_provider.py`` (the real Chat Completions wire format) or are written
out as vLLM and OpenAI send them. The translated output is parsed by the ``anthropic`` SDK
itself, served through an ``httpx2.MockTransport`` (the SDK is the client here).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import anthropic
import httpx2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import OPENAI_SECRET
from tests.fake_provider import TOOL_INPUT, FakeProvider
from tests.sdks import canned_anthropic as sdk
from tests.shapes import JSON, chat_tool_call, text_block, tool_use
from tvgate.traces.sse import SSEParser
from tvgate.translate.anthropic_to_chat import (
    StreamTranslator,
    TranslationError,
    translate_error,
    translate_request,
    translate_response,
)

ROUTE_MODEL = "gpt-4o-2024-08-06"

BASH_TOOL = {
    "name": "Bash",
    "description": "Executes a given bash command in a persistent shell session.",
    "input_schema": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "The command to execute"},
            "description": {"type": "string"},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}

# The body fields claude-cli/2.1.197 sends (/work/shared/wire/real-client-requests.json),
# with a second turn after a Bash tool call.
CLAUDE_CODE_REQUEST: JSON = {
    "model": "claude-sonnet-4-6",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
                {"type": "text", "text": "list the files", "cache_control": {"type": "ephemeral"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should run ls.", "signature": "EqQBCkYIBxgC"},
                {"type": "text", "text": "I'll list them."},
                tool_use(
                    "toolu_01A09q90qw90lq917835lq9",
                    "Bash",
                    {"command": "ls", "description": "List files"},
                ),
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                    "content": "README.md\nsetup.cfg",
                    "is_error": False,
                }
            ],
        },
    ],
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
        {
            "type": "text",
            "text": "You are Claude Code, Anthropic's official CLI for Claude.",
            "cache_control": {"type": "ephemeral"},
        },
    ],
    "tools": [{**BASH_TOOL, "cache_control": {"type": "ephemeral"}}],
    "metadata": {"user_id": "user_3f2a_account__session_8f91d5c2"},
    "max_tokens": 32000,
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "stream": True,
}


def chat(body: JSON, **options: Any) -> JSON:
    return translate_request(body, model=ROUTE_MODEL, **options).body


def user(content: Any) -> JSON:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": content}],
    }


# --------------------------------------------------------------------------- request


def test_claude_code_request_maps_every_field() -> None:
    result = translate_request(CLAUDE_CODE_REQUEST, model=ROUTE_MODEL)
    assert result.stream is True
    assert result.body == {
        "model": ROUTE_MODEL,
        "messages": [
            {
                "role": "system",
                "content": [
                    text_block("x-anthropic-billing-header: cc_version=2.1.197;"),
                    text_block("You are Claude Code, Anthropic's official CLI for Claude."),
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
                    {"type": "text", "text": "list the files"},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "I'll list them."}],
                "tool_calls": [
                    chat_tool_call(
                        "toolu_01A09q90qw90lq917835lq9",
                        "Bash",
                        '{"command":"ls","description":"List files"}',
                    )
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "toolu_01A09q90qw90lq917835lq9",
                "content": "README.md\nsetup.cfg",
            },
        ],
        "max_completion_tokens": 32000,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "Bash",
                    "description": BASH_TOOL["description"],
                    "parameters": BASH_TOOL["input_schema"],
                },
            }
        ],
        "reasoning_effort": "high",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert result.dropped == [
        "metadata",
        "context_management",
        "cache_control",
        "messages[1].content[0]: thinking block (its signature cannot be checked upstream)",
        "tools.cache_control",
    ]


def test_system_string_and_sampling_fields() -> None:
    body = {
        **user("hi"),
        "system": "Be terse.",
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["\n\nHuman:", "END"],
    }
    assert chat(body) == {
        "model": ROUTE_MODEL,
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 100,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\nHuman:", "END"],
    }


def test_a_system_message_within_the_conversation_stays_in_place() -> None:
    # Claude Code 2.1.332 sends its environment as a system message after the first turn:
    # its content a string in one request, text blocks in another.
    reminder = {"role": "system", "content": "# Environment\n - Shell: bash"}
    blocks = {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}
    body = user("hi")
    body["messages"] += [reminder, blocks, {"role": "system", "content": ""}]
    assert chat(body)["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "# Environment\n - Shell: bash"},
        {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
    ]


def test_max_tokens_field_is_the_upstreams() -> None:
    body = chat(user("hi"), max_tokens_field="max_tokens")
    assert body["max_tokens"] == 100 and "max_completion_tokens" not in body


def test_images_and_documents_become_content_parts() -> None:
    body = chat(
        user(
            [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                {
                    "type": "document",
                    "title": "spec.pdf",
                    "source": {
                        "type": "base64",
                        "media_type": "application/pdf",
                        "data": "JVBERi0x",
                    },
                },
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "notes"},
                },
                {"type": "text", "text": "what are these?"},
            ]
        )
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                {
                    "type": "file",
                    "file": {
                        "filename": "spec.pdf",
                        "file_data": "data:application/pdf;base64,JVBERi0x",
                    },
                },
                {"type": "text", "text": "notes"},
                {"type": "text", "text": "what are these?"},
            ],
        }
    ]


def test_parallel_tool_calls_and_results_with_an_image() -> None:
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "read both"},
            {
                "role": "assistant",
                "content": [
                    tool_use("toolu_1", "Read", {"path": "a"}),
                    tool_use("toolu_2", "Read", {"path": "b.png"}),
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "A"}],
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "an image"},
                            {
                                "type": "image",
                                "source": {"type": "url", "url": "https://x.test/b.png"},
                            },
                        ],
                    },
                    {"type": "text", "text": "now compare"},
                ],
            },
        ],
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    result = translate_request(body, model=ROUTE_MODEL)
    assert result.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                chat_tool_call("toolu_1", "Read", '{"path":"a"}'),
                chat_tool_call("toolu_2", "Read", '{"path":"b.png"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": [{"type": "text", "text": "A"}]},
        {
            "role": "tool",
            "tool_call_id": "toolu_2",
            "content": [{"type": "text", "text": "an image"}],
        },
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://x.test/b.png"}},
                {"type": "text", "text": "now compare"},
            ],
        },
    ]
    assert result.body["tool_choice"] == "required"
    assert result.body["parallel_tool_calls"] is False
    assert result.dropped == [
        "messages[2].content[1].is_error",
        "messages[2].content[1].content[1]: sent in a user message after the tool results",
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "Read"}, {"type": "function", "function": {"name": "Read"}}),
    ],
)
def test_tool_choice(choice: JSON, expected: Any) -> None:
    body = {
        **user("hi"),
        "tools": [{"name": "Read", "input_schema": {"type": "object"}, "strict": True}],
    }
    out = chat({**body, "tool_choice": choice})
    assert out["tool_choice"] == expected
    assert out["tools"][0]["function"]["strict"] is True
    assert "parallel_tool_calls" not in out


@pytest.mark.parametrize(
    ("thinking", "output_config", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, {}, "low"),
        ({"type": "enabled", "budget_tokens": 8000}, {}, "medium"),
        ({"type": "enabled", "budget_tokens": 32000}, {}, "high"),
        ({"type": "adaptive"}, {"effort": "low"}, "low"),
        ({"type": "adaptive"}, {"effort": "max"}, "xhigh"),
        ({"type": "adaptive"}, {}, None),
        ({"type": "disabled"}, {}, None),
    ],
)
def test_thinking_becomes_reasoning_effort(
    thinking: JSON, output_config: JSON, effort: str | None
) -> None:
    body = {**user("hi"), "thinking": thinking, "output_config": output_config}
    assert chat(body).get("reasoning_effort") == effort


def test_reasoning_effort_off_for_the_route_is_noted() -> None:
    result = translate_request(
        {**user("hi"), "thinking": {"type": "enabled", "budget_tokens": 2048}},
        model=ROUTE_MODEL,
        reasoning_effort=False,
    )
    assert "reasoning_effort" not in result.body
    assert result.dropped == ["thinking: the upstream model takes no reasoning effort"]


def test_structured_output_becomes_response_format() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    body = chat(
        {**user("count"), "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    )
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"top_k": 5}, "top_k"),
        ({"mcp_servers": [{"type": "url", "url": "https://mcp.test", "name": "m"}]}, "mcp_servers"),
        ({"container": "container_1"}, "container"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        (
            {"tools": [{"name": "X", "input_schema": {"type": "object"}, "frobnicate": 1}]},
            "tools[0].frobnicate",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "messages[0].content[0].source.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "search_result", "source": "s", "title": "t", "content": []}
                        ],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "server_tool_use",
                                "id": "s",
                                "name": "web_search",
                                "input": {},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image"}]}]},
            "messages[0].content[0].type",
        ),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": {"task_budget": 5}}, "output_config.task_budget"),
        ({"output_config": {"format": {"type": "grammar"}}}, "output_config.format.type"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ],
)
def test_fields_the_route_cannot_express_are_refused(change: JSON, field: str) -> None:
    with pytest.raises(TranslationError) as caught:
        translate_request({**user("hi"), **change}, model=ROUTE_MODEL)
    assert caught.value.status == 400
    assert caught.value.field == field
    envelope = orjson.loads(caught.value.body())
    assert envelope["type"] == "error"
    assert envelope["error"]["type"] == "invalid_request_error"
    assert envelope["error"]["message"].startswith(field + ":")


def test_a_final_assistant_turn_is_noted() -> None:
    body = {**user("hi")}
    body["messages"] = [*body["messages"], {"role": "assistant", "content": "The answer is"}]
    result = translate_request(body, model=ROUTE_MODEL)
    assert result.body["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert result.dropped == [
        "messages[-1]: a final assistant turn is sent as history, not continued"
    ]


# ---- there and back: a reverse mapping, as a test helper


def chat_to_anthropic(body: JSON) -> JSON:
    """A Chat Completions request as an Anthropic one (the reverse of the module's)."""
    out: JSON = {"model": body["model"], "max_tokens": body["max_completion_tokens"]}
    messages: list[JSON] = []
    for message in body["messages"]:
        role = message["role"]
        if role == "system":
            content = message["content"]
            out["system"] = content if isinstance(content, str) else [_block(p) for p in content]
        elif role == "tool":
            block = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
            content = message["content"]
            block["content"] = content if isinstance(content, str) else [_block(p) for p in content]
            if (
                messages
                and messages[-1]["role"] == "user"
                and isinstance(messages[-1]["content"], list)
            ):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
        elif role == "user":
            content = message["content"]
            blocks = content if isinstance(content, str) else [_block(p) for p in content]
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "user" and _only_results(previous):
                previous["content"].extend(
                    blocks if isinstance(blocks, list) else [{"type": "text", "text": blocks}]
                )
            else:
                messages.append({"role": "user", "content": blocks})
        else:
            content = message["content"]
            if isinstance(content, str) and "tool_calls" not in message:
                messages.append({"role": "assistant", "content": content})
                continue
            blocks = [_block(p) for p in content or []]
            for call in message.get("tool_calls") or []:
                function = call["function"]
                blocks.append(
                    tool_use(call["id"], function["name"], orjson.loads(function["arguments"]))
                )
            messages.append({"role": "assistant", "content": blocks})
    out["messages"] = messages
    for key in ("temperature", "top_p"):
        if key in body:
            out[key] = body[key]
    if "stop" in body:
        out["stop_sequences"] = body["stop"]
    if "tools" in body:
        out["tools"] = [
            {
                k: v
                for k, v in (
                    ("name", t["function"]["name"]),
                    ("description", t["function"].get("description")),
                    ("input_schema", t["function"]["parameters"]),
                )
                if v is not None
            }
            for t in body["tools"]
        ]
    if "tool_choice" in body:
        choice = body["tool_choice"]
        out["tool_choice"] = (
            {"type": "tool", "name": choice["function"]["name"]}
            if isinstance(choice, dict)
            else {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
        )
        if body.get("parallel_tool_calls") is False:
            out["tool_choice"]["disable_parallel_tool_use"] = True
    if "response_format" in body:
        out["output_config"] = {
            "format": {
                "type": "json_schema",
                "schema": body["response_format"]["json_schema"]["schema"],
            }
        }
    if body.get("stream"):
        out["stream"] = True
    return out


def _only_results(message: JSON) -> bool:
    return isinstance(message["content"], list) and all(
        b["type"] == "tool_result" for b in message["content"]
    )


def _block(part: JSON) -> JSON:
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    url = part["image_url"]["url"]
    if url.startswith("data:"):
        media_type, data = url[5:].split(";base64,", 1)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _shared(body: JSON) -> JSON:
    """``body`` without what only Anthropic has (cache_control, metadata, thinking blocks
    and config, is_error); the model is the route's."""
    body = copy.deepcopy(body)
    body.pop("metadata", None)
    body.pop("thinking", None)
    body["model"] = ROUTE_MODEL

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in ("cache_control", "is_error")}
        if isinstance(value, list):
            return [
                clean(v) for v in value if not (isinstance(v, dict) and v.get("type") == "thinking")
            ]
        return value

    return clean(body)


_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_text = st.text(
    st.characters(codec="utf-8", exclude_categories=_SURROGATES), min_size=1, max_size=12
)
_cache = st.sampled_from([{}, {"cache_control": {"type": "ephemeral"}}])
_text_block = st.builds(lambda t, c: {"type": "text", "text": t, **c}, _text, _cache)
_image = st.one_of(
    st.builds(
        lambda d: {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": d},
        },
        st.from_regex(r"[A-Za-z0-9+/]{4,12}", fullmatch=True),
    ),
    st.builds(
        lambda u: {"type": "image", "source": {"type": "url", "url": "https://x.test/" + u}},
        st.from_regex(r"[a-z]{1,8}\.png", fullmatch=True),
    ),
)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_tool_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True)
_ids = st.from_regex(r"toolu_[A-Za-z0-9]{4,10}", fullmatch=True)


@st.composite
def anthropic_requests(draw: st.DrawFn) -> JSON:
    turns = draw(st.integers(1, 5))
    messages: list[JSON] = []
    pending: list[str] = []
    for turn in range(turns):
        if turn % 2 == 0:
            results = [
                {
                    "type": "tool_result",
                    "tool_use_id": call_id,
                    "content": draw(
                        st.one_of(_text, st.lists(_text_block, min_size=1, max_size=2))
                    ),
                    **draw(st.sampled_from([{}, {"is_error": True}])),
                }
                for call_id in pending
            ]
            rest = draw(
                st.lists(st.one_of(_text_block, _image), max_size=3, min_size=0 if results else 1)
            )
            content: Any = results + rest
            if not results and draw(st.booleans()):
                content = draw(_text)
            messages.append({"role": "user", "content": content})
            pending = []
        else:
            blocks: list[JSON] = draw(st.lists(_text_block, max_size=2))
            if draw(st.booleans()):
                blocks.insert(0, {"type": "thinking", "thinking": draw(_text), "signature": "sig"})
            pending = draw(st.lists(_ids, max_size=3, unique=True))
            blocks += [
                tool_use(
                    i, draw(_tool_names), draw(st.dictionaries(_text, _json_value, max_size=3))
                )
                for i in pending
            ]
            if not blocks:
                blocks = [{"type": "text", "text": draw(_text)}]
            messages.append(
                {
                    "role": "assistant",
                    "content": draw(st.just(blocks))
                    if pending or len(blocks) != 1 or draw(st.booleans())
                    else blocks[0].get("text", blocks),
                }
            )
    body: JSON = {
        "model": "claude-sonnet-4-6",
        "max_tokens": draw(st.integers(1, 64000)),
        "messages": messages,
    }
    optional = {
        "system": st.one_of(_text, st.lists(_text_block, min_size=1, max_size=2)),
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1),
        "stop_sequences": st.lists(_text, min_size=1, max_size=4),
        "metadata": st.just({"user_id": "u"}),
        "thinking": st.just({"type": "enabled", "budget_tokens": 2048}),
        "stream": st.just(True),
        "output_config": st.just({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
        "tools": st.lists(
            st.builds(
                lambda n, d: {"name": n, "input_schema": {"type": "object", "properties": {}}, **d},
                _tool_names,
                st.sampled_from([{}, {"description": "does it"}]),
            ),
            min_size=1,
            max_size=3,
        ),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if "tools" in body and draw(st.booleans()):
        choice = draw(
            st.sampled_from(
                [
                    {"type": "auto"},
                    {"type": "any"},
                    {"type": "none"},
                    {"type": "tool", "name": body["tools"][0]["name"]},
                ]
            )
        )
        if draw(st.booleans()):
            choice["disable_parallel_tool_use"] = True
        body["tool_choice"] = choice
    return body


@settings(max_examples=300, deadline=None)
@given(anthropic_requests())
def test_there_and_back_keeps_every_shared_field(body: JSON) -> None:
    result = translate_request(body, model=ROUTE_MODEL)
    back = chat_to_anthropic(result.body)
    if "output_config" in body:
        assert (
            result.body["response_format"]["json_schema"]["schema"]
            == body["output_config"]["format"]["schema"]
        )
    assert back == _shared(body)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "text"}],
        [{"type": "image", "source": "x"}],
        [{"type": "tool_use", "id": "t"}],
        ["text"],
    ],
)
def test_a_malformed_request_is_a_400(content: Any) -> None:
    role = "assistant" if content[0] != "text" and content[0].get("type") == "tool_use" else "user"
    with pytest.raises(TranslationError) as caught:
        translate_request(
            {**user("hi"), "messages": [{"role": role, "content": content}]}, model=ROUTE_MODEL
        )
    assert caught.value.field == "body"


# --------------------------------------------------------------------------- response


def upstream(fake: FakeProvider, body: JSON, scenario: str = "normal") -> httpx2.Response:
    """The fake provider's Chat Completions answer to ``body``."""
    return httpx2.post(
        fake.openai_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {OPENAI_SECRET}", "x-fake-scenario": scenario},
        timeout=30,
    )


def text_of(block: anthropic.types.ContentBlock) -> str:
    """The text of a block that must be a text block."""
    assert isinstance(block, anthropic.types.TextBlock), block
    return block.text


def tool_uses(message: anthropic.types.Message) -> list[anthropic.types.ToolUseBlock]:
    """The blocks of a message that must hold tool calls only."""
    blocks = [b for b in message.content if isinstance(b, anthropic.types.ToolUseBlock)]
    assert len(blocks) == len(message.content), message.content
    return blocks


READ_TOOL = {
    "name": "Read",
    "description": "Reads a file",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
}


def sdk_create(answer: JSON) -> anthropic.types.Message:
    client = sdk(200, orjson.dumps(answer))
    return client.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )


def test_a_tool_call_answer_parsed_by_the_sdk(fake_provider: FakeProvider) -> None:
    request = translate_request(
        {**user("read the readme"), "tools": [READ_TOOL]}, model=ROUTE_MODEL
    )
    answer = upstream(fake_provider, request.body, "tool_use")
    assert answer.status_code == 200
    upstream_body = answer.json()
    notes: list[str] = []
    message = sdk_create(translate_response(upstream_body, notes))
    call = upstream_body["choices"][0]["message"]["tool_calls"][0]
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert text_of(message.content[0]) == "I'll read the file."
    tool_use = message.content[1]
    assert tool_use.type == "tool_use"
    assert (tool_use.id, tool_use.name, tool_use.input) == (call["id"], "Read", TOOL_INPUT)
    assert message.stop_reason == "tool_use"
    assert message.id == "msg_" + upstream_body["id"]
    assert message.model == ROUTE_MODEL
    usage = upstream_body["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert message.usage.input_tokens == usage["prompt_tokens"] - cached
    assert message.usage.cache_read_input_tokens == cached
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.output_tokens == usage["completion_tokens"]
    assert message.usage.output_tokens_details is not None
    assert (
        message.usage.output_tokens_details.thinking_tokens
        == (usage["completion_tokens_details"]["reasoning_tokens"])
    )
    assert notes == []


def chat_completion(message: JSON, finish_reason: str | None = "stop", **extra: Any) -> JSON:
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "Qwen/Qwen3-8B",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32},
        **extra,
    }


def test_vllm_reasoning_and_parallel_calls() -> None:
    answer = chat_completion(
        {
            "role": "assistant",
            "reasoning_content": "Two files, two reads.",
            "content": None,
            "tool_calls": [
                chat_tool_call("chatcmpl-tool-1", "Read", '{"path": "a"}'),
                chat_tool_call("chatcmpl-tool-2", "Read", '{"path": "b"}'),
            ],
        },
        "tool_calls",
    )
    notes: list[str] = []
    message = sdk_create(translate_response(answer, notes))
    thinking, first, second = message.content
    assert thinking.type == "thinking"
    assert (thinking.thinking, thinking.signature) == ("Two files, two reads.", "")
    assert first.type == second.type == "tool_use"
    assert [(b.id, b.input) for b in (first, second)] == [
        ("chatcmpl-tool-1", {"path": "a"}),
        ("chatcmpl-tool-2", {"path": "b"}),
    ]
    assert message.stop_reason == "tool_use"
    assert notes == ["thinking: the upstream gives no signature"]


def test_ollama_reasoning_field_is_thinking() -> None:
    answer = chat_completion({"role": "assistant", "reasoning": "hm", "content": "4"})
    content = translate_response(answer)["content"]
    assert content == [
        {"type": "thinking", "thinking": "hm", "signature": ""},
        {"type": "text", "text": "4"},
    ]


@pytest.mark.parametrize(
    ("message", "finish_reason", "stop_reason"),
    [
        ({"role": "assistant", "content": "a"}, "stop", "end_turn"),
        ({"role": "assistant", "content": "a"}, "length", "max_tokens"),
        ({"role": "assistant", "content": "a"}, "content_filter", "refusal"),
        (
            {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            "stop",
            "refusal",
        ),
        ({"role": "assistant", "content": "a"}, None, "end_turn"),
    ],
)
def test_finish_reasons(message: JSON, finish_reason: str | None, stop_reason: str) -> None:
    assert (
        sdk_create(translate_response(chat_completion(message, finish_reason))).stop_reason
        == stop_reason
    )


def test_cache_write_and_bad_arguments() -> None:
    answer = chat_completion(
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [chat_tool_call("c1", "Read", "{not json")],
        },
        "tool_calls",
        usage={
            "prompt_tokens": 1000,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 300},
        },
    )
    notes: list[str] = []
    translated = translate_response(answer, notes)
    assert translated["content"] == [tool_use("c1", "Read", {})]
    assert translated["usage"] == {
        "input_tokens": 100,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 600,
        "output_tokens": 5,
    }
    assert notes == ["tool_calls[0]: arguments are not a JSON object, sent as {}"]


# --------------------------------------------------------------------------- errors


def sdk_error(status: int, body: bytes) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(status, body).messages.create(
            model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    return caught.value


@pytest.mark.parametrize(
    ("scenario", "status", "kind", "sdk_class"),
    [
        ("error_429", 429, "rate_limit_error", anthropic.RateLimitError),
        ("error_529", 503, "overloaded_error", anthropic.InternalServerError),
        ("error_500", 500, "api_error", anthropic.InternalServerError),
    ],
)
def test_upstream_errors_in_anthropics_envelope(
    fake_provider: FakeProvider, scenario: str, status: int, kind: str, sdk_class: type
) -> None:
    answer = upstream(fake_provider, chat(user("hi")), scenario)
    assert answer.status_code == status
    provider_message = answer.json()["error"]["message"]
    out_status, out_body = translate_error(answer.status_code, answer.content)
    assert out_status == status
    assert orjson.loads(out_body) == {
        "type": "error",
        "error": {"type": kind, "message": provider_message},
    }
    error = sdk_error(out_status, out_body)
    assert isinstance(error, sdk_class)
    assert provider_message in str(error)


#: Error answers of Chat upstreams other than OpenAI (vLLM, Ollama, a proxy in front), the
#: kind of error each is for a client, and its message: what both Chat translators map.
CHAT_UPSTREAM_ERRORS: list[tuple[int, bytes, str, str]] = [
    (  # vLLM
        400,
        b'{"object":"error","message":"max_tokens is too large: 90000","type":"BadRequestError","param":null,"code":400}',
        "invalid_request_error",
        "max_tokens is too large: 90000",
    ),
    (
        404,
        b'{"error":"model \'qwen3:8b\' not found"}',
        "not_found_error",
        "model 'qwen3:8b' not found",
    ),  # Ollama
    (
        401,
        b'{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}',
        "authentication_error",
        "Incorrect API key provided",
    ),
    (
        502,
        b"<html><body>502 Bad Gateway</body></html>",
        "api_error",
        "<html><body>502 Bad Gateway</body></html>",
    ),
    (503, b"", "overloaded_error", "upstream 503"),
    (
        400,
        b'{"object":"error","message":"bad model","type":"BadRequestError","code":400}',
        "invalid_request_error",
        "bad model",
    ),
    (404, b'{"error":"model \\"qwen\\" not found"}', "not_found_error", 'model "qwen" not found'),
    (502, b"<html>Bad Gateway</html>", "api_error", "<html>Bad Gateway</html>"),
]


@pytest.mark.parametrize(("status", "body", "kind", "message"), CHAT_UPSTREAM_ERRORS)
def test_error_shapes_of_other_upstreams(status: int, body: bytes, kind: str, message: str) -> None:
    out_status, out_body = translate_error(status, body)
    assert out_status == status
    assert orjson.loads(out_body) == {"type": "error", "error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------- stream


def translate_stream(
    upstream_bytes: bytes, chunk_size: int | None = None
) -> tuple[bytes, StreamTranslator]:
    translator = StreamTranslator()
    out = []
    size = chunk_size or len(upstream_bytes) or 1
    for i in range(0, len(upstream_bytes), size):
        out.append(translator.feed(upstream_bytes[i : i + size]))
    out.append(translator.finish())
    return b"".join(out), translator


def events_of(stream: bytes) -> list[tuple[str, JSON]]:
    return [(e.event or "", orjson.loads(e.data)) for e in SSEParser().feed(stream)]


def assert_anthropic_sequence(stream: bytes) -> list[tuple[str, JSON]]:
    """The events of ``stream``, checked against Anthropic's grammar: message_start, then
    blocks one at a time with increasing indices, each delta to the open block and of its
    type, then message_delta and message_stop (or an error event, which ends it)."""
    events = events_of(stream)
    names = [name for name, _ in events]
    if "error" in names:
        assert names.index("error") == len(names) - 1
        events_before = events[:-1]
    else:
        assert names[-2:] == ["message_delta", "message_stop"]
        events_before = events[:-2]
    if events_before:
        assert names[0] == "message_start"
        assert names[1] == "ping"
    open_block: tuple[int, str] | None = None
    started = 0
    delta_types = {
        "text": "text_delta",
        "thinking": "thinking_delta",
        "tool_use": "input_json_delta",
    }
    for name, payload in events_before[2:]:
        assert payload["type"] == name
        if name == "content_block_start":
            assert open_block is None
            assert payload["index"] == started
            open_block = (started, payload["content_block"]["type"])
            started += 1
        elif name == "content_block_delta":
            assert open_block is not None and payload["index"] == open_block[0]
            assert payload["delta"]["type"] == delta_types[open_block[1]]
        else:
            assert name == "content_block_stop"
            assert open_block is not None and payload["index"] == open_block[0]
            open_block = None
    # As from Anthropic, an error event may cut a block short.
    assert open_block is None or names[-1] == "error"
    return events


def sdk_stream(stream: bytes) -> tuple[anthropic.types.Message, list[str]]:
    """What the SDK's own accumulator makes of ``stream``, and its event types."""
    client = sdk(200, stream, "text/event-stream")
    seen: list[str] = []
    with client.messages.stream(
        model="claude-sonnet-4-6", max_tokens=1024, messages=[{"role": "user", "content": "hi"}]
    ) as events:
        for event in events:
            seen.append(event.type)
        return events.get_final_message(), seen


def fake_stream(fake: FakeProvider, body: JSON, scenario: str = "normal") -> bytes:
    request = translate_request({**body, "stream": True}, model=ROUTE_MODEL)
    answer = upstream(fake, request.body, scenario)
    assert answer.status_code == 200
    return answer.content


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_a_text_stream_parsed_by_the_sdk(
    fake_provider: FakeProvider, chunk_size: int | None
) -> None:
    raw = fake_stream(fake_provider, user("tell me a story about the sea"))
    stream, translator = translate_stream(raw, chunk_size)
    events = assert_anthropic_sequence(stream)
    message, seen = sdk_stream(stream)
    assert [b.type for b in message.content] == ["text"]
    assert text_of(message.content[0]) == "You said: tell me a story about the sea"
    assert message.stop_reason == "end_turn"
    usage_chunk = orjson.loads(raw.split(b"data: ")[-2])
    cached = usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert message.usage.input_tokens == usage_chunk["usage"]["prompt_tokens"] - cached
    assert message.usage.cache_read_input_tokens == cached
    assert message.usage.output_tokens == usage_chunk["usage"]["completion_tokens"]
    assert translator.usage == events[-2][1]["usage"]
    assert "text" in seen and seen[-1] == "message_stop"
    assert translator.notes == []


def test_a_tool_call_stream_parsed_by_the_sdk(fake_provider: FakeProvider) -> None:
    raw = fake_stream(fake_provider, {**user("read the readme"), "tools": [READ_TOOL]}, "tool_use")
    stream, _ = translate_stream(raw, 5)
    assert_anthropic_sequence(stream)
    message, seen = sdk_stream(stream)
    text, tool_use = message.content
    assert text.type == "text" and text.text == "I'll read the file."
    assert tool_use.type == "tool_use"
    assert (tool_use.name, tool_use.input) == ("Read", TOOL_INPUT)
    assert tool_use.id.startswith("call_")
    assert message.stop_reason == "tool_use"
    assert seen.count("input_json") > 1  # the arguments arrived in several deltas


def test_an_upstream_error_mid_stream_reaches_the_sdk(fake_provider: FakeProvider) -> None:
    raw = fake_stream(fake_provider, user("hello there"), "error_event")
    assert b'data: {"error"' in raw
    stream, translator = translate_stream(raw, 3)
    events = assert_anthropic_sequence(stream)
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {
                "type": "api_error",
                "message": "The server had an error while processing your request. Sorry about that!",
            },
        },
    )
    assert translator.done
    with pytest.raises(anthropic.APIStatusError, match="Sorry about that"):
        sdk_stream(stream)


def chunk(delta: JSON | None = None, finish: str | None = None, **extra: Any) -> bytes:
    obj: JSON = {
        "id": "chatcmpl-8f1e2a",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "Qwen/Qwen3-8B",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def call_delta(
    index: int, arguments: str, call_id: str | None = None, name: str | None = None
) -> JSON:
    call: JSON = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call["id"] = call_id
        call["type"] = "function"
        call["function"]["name"] = name
    return {"tool_calls": [call]}


#: vLLM's usage of a call that read two files: cached prompt tokens, reasoning tokens.
VLLM_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 40,
    "total_tokens": 160,
    "prompt_tokens_details": {"cached_tokens": 64},
    "completion_tokens_details": {"reasoning_tokens": 9},
}
# A vLLM stream (reasoning parser and tool parser on): reasoning, text, two parallel calls.
VLLM_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user wants "}),
        chunk({"reasoning_content": "two files."}),
        chunk({"content": "Reading "}),
        chunk({"content": "both."}),
        chunk(call_delta(0, "", "chatcmpl-tool-a1", "Read")),
        chunk(call_delta(0, '{"path": ')),
        chunk(call_delta(0, '"a.txt"}')),
        chunk(call_delta(1, '{"path": "b', "chatcmpl-tool-b2", "Read")),
        chunk(call_delta(1, '.txt"}')),
        chunk({}, "tool_calls"),
        chunk(usage=VLLM_USAGE),
        b"data: [DONE]\n\n",
    ]
)


def test_reasoning_text_and_parallel_calls_stream() -> None:
    stream, translator = translate_stream(VLLM_STREAM)
    events = assert_anthropic_sequence(stream)
    starts = [p["content_block"] for n, p in events if n == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        tool_use("chatcmpl-tool-a1", "Read", {}),
        tool_use("chatcmpl-tool-b2", "Read", {}),
    ]
    assert "signature_delta" not in stream.decode()
    message, seen = sdk_stream(stream)
    thinking, text, first, second = message.content
    assert thinking.type == "thinking"
    assert (thinking.thinking, thinking.signature) == ("The user wants two files.", "")
    assert text.type == "text" and text.text == "Reading both."
    assert first.type == second.type == "tool_use"
    assert [first.input, second.input] == [{"path": "a.txt"}, {"path": "b.txt"}]
    assert message.stop_reason == "tool_use"
    assert message.id == "msg_chatcmpl-8f1e2a"
    assert message.usage.model_dump(exclude_none=True) == {
        "input_tokens": 56,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 64,
        "output_tokens": 40,
        "output_tokens_details": {"thinking_tokens": 9},
    }
    assert "thinking" in seen
    assert translator.notes == ["thinking: the upstream gives no signature"]


def test_events_split_anywhere_give_the_same_stream() -> None:
    whole, _ = translate_stream(VLLM_STREAM)
    for cut in range(1, len(VLLM_STREAM)):
        translator = StreamTranslator()
        parts = translator.feed(VLLM_STREAM[:cut]) + translator.feed(VLLM_STREAM[cut:])
        assert parts + translator.finish() == whole, cut


def test_output_is_incremental() -> None:
    translator = StreamTranslator()
    first = translator.feed(chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hel"}))
    names = [name for name, _ in events_of(first)]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert translator.feed(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"lo"}') == b""
    assert b'"text":"lo"' in translator.feed(b"}]}\n\n")


def test_feed_events_takes_a_shared_parser() -> None:
    parser = SSEParser()
    translator = StreamTranslator()
    out = translator.feed_events(parser.feed(VLLM_STREAM)) + translator.finish()
    assert out == translate_stream(VLLM_STREAM)[0]


def test_a_tool_call_named_after_its_first_fragment() -> None:
    raw = b"".join(
        [
            chunk(
                {"tool_calls": [{"index": 0, "id": "call_1", "function": {"arguments": '{"a"'}}]}
            ),
            chunk(
                {"tool_calls": [{"index": 0, "function": {"name": "Read", "arguments": ": 1}"}}]}
            ),
            chunk({}, "tool_calls"),
            b"data: [DONE]\n\n",
        ]
    )
    stream, translator = translate_stream(raw)
    assert_anthropic_sequence(stream)
    message, _ = sdk_stream(stream)
    assert message.content[0].type == "tool_use"
    assert (message.content[0].name, message.content[0].input) == ("Read", {"a": 1})
    assert translator.notes == ["usage: the upstream reported none"]
    assert message.usage.output_tokens == 0


def test_a_stream_cut_before_its_finish_is_an_error_event() -> None:
    stream, translator = translate_stream(chunk({"content": "Hal"}))
    events = assert_anthropic_sequence(stream)
    assert events[-1][1]["error"]["type"] == "api_error"
    assert translator.done
    with pytest.raises(anthropic.APIStatusError, match="ended before"):
        sdk_stream(stream)


def test_a_stream_without_done_ends_at_its_finish_reason() -> None:
    stream, _ = translate_stream(chunk({"content": "ok"}) + chunk({}, "length"))
    message, _ = sdk_stream(stream)
    assert message.stop_reason == "max_tokens"


def test_the_gateway_reports_an_upstream_failure_in_band() -> None:
    translator = StreamTranslator()
    head = translator.feed(chunk({"content": "Partial"}))
    tail = translator.error("upstream connection reset", "overloaded_error")
    assert translator.feed(chunk({"content": "more"})) == b""
    assert translator.finish() == b""
    events = assert_anthropic_sequence(head + tail)
    assert events[-1][1]["error"] == {
        "type": "overloaded_error",
        "message": "upstream connection reset",
    }
    with pytest.raises(anthropic.APIStatusError, match="upstream connection reset"):
        sdk_stream(head + tail)


def test_refusal_stream_and_model_override() -> None:
    translator = StreamTranslator(model="claude-sonnet-4-6")
    raw = chunk({"refusal": "I can't help."}) + chunk({}, "stop") + b"data: [DONE]\n\n"
    stream = translator.feed(raw) + translator.finish()
    message, _ = sdk_stream(stream)
    assert message.model == "claude-sonnet-4-6"
    assert message.stop_reason == "refusal"
    assert message.content[0].type == "text" and message.content[0].text == "I can't help."


def test_reasoning_under_both_names_is_sent_once() -> None:
    raw = chunk({"reasoning_content": "hm", "reasoning": "hm"}) + chunk({"reasoning": "m"})
    stream, _ = translate_stream(raw + chunk({}, "stop") + b"data: [DONE]\n\n")
    message, _ = sdk_stream(stream)
    assert message.content[0].type == "thinking" and message.content[0].thinking == "hmm"


def test_extra_choices_and_bad_events_are_noted_once() -> None:
    second = {"id": "x", "choices": [{"index": 1, "delta": {"content": "other"}}]}
    line = b"data: " + orjson.dumps(second) + b"\n\n"
    raw = chunk({"content": "one"}) + line + line + b"data: {oops\n\n" * 2 + chunk({}, "stop")
    stream, translator = translate_stream(raw)
    message, _ = sdk_stream(stream)
    assert message.content[0].type == "text" and message.content[0].text == "one"
    assert translator.notes == [
        "choices[1:]: only the first choice is returned",
        "an upstream event that is not JSON was skipped",
        "usage: the upstream reported none",
    ]


def test_deepseek_cache_hits_are_cache_reads() -> None:
    answer = chat_completion(
        {"role": "assistant", "content": "ok"},
        usage={
            "prompt_tokens": 90,
            "completion_tokens": 3,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 26,
        },
    )
    usage = translate_response(answer)["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (26, 64)


def test_whole_calls_in_one_delta_without_indices() -> None:
    # Older Ollama: every call complete, in one chunk, with no "index".
    calls = [
        {"id": "call_a", "function": {"name": "Read", "arguments": '{"path":"a"}'}},
        {"id": "call_b", "function": {"name": "Read", "arguments": '{"path":"b"}'}},
    ]
    raw = chunk({"tool_calls": calls}) + chunk({}, "tool_calls") + b"data: [DONE]\n\n"
    stream, _ = translate_stream(raw)
    assert_anthropic_sequence(stream)
    message, _ = sdk_stream(stream)
    assert [(b.id, b.input) for b in tool_uses(message)] == [
        ("call_a", {"path": "a"}),
        ("call_b", {"path": "b"}),
    ]


def test_arguments_after_a_later_call_started_are_kept_and_noted() -> None:
    raw = (
        chunk(call_delta(0, '{"path":', "call_a", "Read"))
        + chunk(call_delta(1, '{"path":"b"}', "call_b", "Read"))
        + chunk(call_delta(0, '"a"}'))
        + chunk({}, "tool_calls")
    )
    stream, translator = translate_stream(raw)
    message, _ = sdk_stream(stream)
    assert [b.input for b in tool_uses(message)] == [{"path": "a"}, {"path": "b"}]
    assert "tool call 0: arguments after its block closed" in translator.notes


def test_usage_figures_that_are_not_counts_are_zero() -> None:
    answer = chat_completion(
        {"role": "assistant", "content": "ok"},
        usage={"prompt_tokens": "many", "completion_tokens": -4, "prompt_tokens_details": None},
    )
    assert translate_response(answer)["usage"] == {
        "input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }


@pytest.mark.parametrize(
    "line",
    [b'{"choices": {"0": 1}}', b'{"choices": [{"delta": "text"}]}', b"[1, 2]", b'{"choices": [7]}'],
)
def test_chunks_of_another_shape_are_skipped(line: bytes) -> None:
    raw = chunk({"content": "a"}) + b"data: " + line + b"\n\n" + chunk({"content": "b"}, "stop")
    stream, translator = translate_stream(raw)
    message, _ = sdk_stream(stream)
    assert message.content[0].type == "text" and message.content[0].text == "ab"
    assert "an upstream chunk of unexpected shape was skipped" in translator.notes


@pytest.mark.parametrize(
    "body",
    [
        {"choices": "x"},
        {"choices": [{"message": {"tool_calls": [1]}}]},
        {"object": "list", "data": []},
    ],
)
def test_an_answer_of_another_shape_is_a_value_error(body: JSON) -> None:
    with pytest.raises(ValueError, match="not a ChatCompletion"):
        translate_response(body)
