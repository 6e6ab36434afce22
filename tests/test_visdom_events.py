"""tvgate.visdom.events: stored calls as Visdom Trace events, checked field by field by the
strict stand-in's own checks (tests/fake_visdom_ingest.py), for each API a tool speaks."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from tests.fake_visdom_ingest import check_event
from tvgate.providers.base import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES
from tvgate.visdom.events import (
    MAX_EVENT_BYTES,
    CallRecord,
    SessionState,
    call_events,
    event_uuid,
    session_end,
)
from tvgate.visdom.lines import cwd_of


def record(trace_id: str, endpoint: str, request: Any, response: Any, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "trace_id": trace_id,
        "session_id": "sess-1",
        "tool": "claude-code" if endpoint == ANTHROPIC_MESSAGES else "codex",
        "endpoint": endpoint,
        "provider": "anthropic" if endpoint == ANTHROPIC_MESSAGES else "openai",
        "model": "claude-sonnet-4-5",
        "received_at": 1_780_000_000.0 + int(trace_id[-1], 16),
        "finished_at": 1_780_000_000.5 + int(trace_id[-1], 16),
        "message_id": f"msg_{trace_id}",
        "request_id": f"req_{trace_id}",
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_read_tokens": 30,
        "cache_write_tokens": 5,
        "request": request,
        "response": response,
    }
    values.update(fields)
    return CallRecord(**values)


def valid(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for event in events:
        assert check_event(event) == [], event
        assert len(orjson.dumps(event)) <= MAX_EVENT_BYTES
    return events


ASK = {"role": "user", "content": [{"type": "text", "text": "list the files"}]}
ANSWER_1 = {
    "id": "msg_a1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "use ls", "signature": "sig"},
        {"type": "text", "text": "Listing."},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
    ],
    "stop_reason": "tool_use",
}
RESULT = {
    "role": "user",
    "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py\nb.py"}],
}
ANSWER_2 = {
    "id": "msg_a2",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "Two files."}],
    "stop_reason": "end_turn",
}


def test_an_anthropic_tool_session_gives_tool_events_and_gap_free_lines() -> None:
    state = SessionState()
    first = valid(
        call_events(
            record("t1", ANTHROPIC_MESSAGES, {"messages": [ASK]}, ANSWER_1, branch="main"), state
        )
    )
    assert [(e["event_type"], e["hook_event_name"]) for e in first] == [
        ("session_start", "SessionStart"),
        ("transcript", "Stop"),
        ("tool_use", "PreToolUse"),
    ]
    transcript = first[1]
    assert transcript["transcript_offset"] == 0
    user, assistant = transcript["transcript_lines"]
    assert user["type"] == "user" and user["message"]["content"] == ASK["content"]
    assert user["gitBranch"] == "main" and user["sessionId"] == "sess-1"
    message = assistant["message"]
    assert message["id"] == "msg_t1" and message["model"] == "claude-sonnet-4-5"
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert "signature" not in message["content"][0]
    assert message["usage"] == {
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_read_input_tokens": 30,
        "cache_creation_input_tokens": 5,
    }
    pre = first[2]
    assert (pre["tool_name"], pre["tool_use_id"], pre["tool_input"]) == (
        "Bash",
        "toolu_1",
        {"command": "ls"},
    )
    assert state.open_tools == {"toolu_1": "Bash"}

    second = valid(
        call_events(
            record(
                "t2",
                ANTHROPIC_MESSAGES,
                {"messages": [ASK, {"role": "assistant", "content": ANSWER_1["content"]}, RESULT]},
                ANSWER_2,
            ),
            state,
        )
    )
    assert [(e["event_type"], e["hook_event_name"]) for e in second] == [
        ("tool_use", "PostToolUse"),
        ("transcript", "Stop"),
    ]
    post = second[0]
    assert post["tool_response"] == "a.py\nb.py" and post["tool_is_error"] is False
    assert post["tool_use_id"] == "toolu_1" and post["tool_name"] == "Bash"
    assert second[1]["transcript_offset"] == 2
    assert [line["type"] for line in second[1]["transcript_lines"]] == ["user", "assistant"]
    assert state.offset == 4 and state.open_tools == {}

    end = session_end("sess-1", state, "end-key")
    assert check_event(end) == []
    assert end["final_stats"] == {
        "duration_ms": 1500,
        "total_tokens": 2 * (100 + 20 + 30 + 5),
        "input_tokens": 200,
        "output_tokens": 40,
        "cache_read_tokens": 60,
        "cache_write_tokens": 10,
        "user_messages": 1,
        "assistant_messages": 2,
        "total_tool_calls": 1,
    }
    # Sealed: the next call starts the session anew, its chunks after the old ones.
    assert not state.started and state.offset == 4


def test_events_are_the_same_when_made_again() -> None:
    """A resend (made again from the same trace and state) carries the same uuids."""
    made = [
        call_events(record("t1", ANTHROPIC_MESSAGES, {"messages": [ASK]}, ANSWER_1), SessionState())
        for _ in range(2)
    ]
    assert made[0] == made[1]
    uuids = [e["event_uuid"] for e in made[0]]
    assert len(set(uuids)) == len(uuids)
    parsed = uuid.UUID(uuids[0])
    assert parsed.version == 7 and parsed.int >> 80 == 1_780_000_001_000
    assert event_uuid("t1", 0, 1.0) != event_uuid("t2", 0, 1.0)


def test_a_codex_responses_session_maps_to_claude_shaped_lines() -> None:
    state = SessionState()
    request = {
        "model": "gpt-5-codex",
        "instructions": "You are Codex.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "rules"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "<environment_context><cwd>/src/app</cwd>"}
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "run tests"}],
            },
        ],
    }
    answer = {
        "id": "resp_1",
        "object": "response",
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "run pytest"}]},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "shell",
                "arguments": '{"command":["pytest"]}',
            },
        ],
    }
    call = record(
        "c1",
        OPENAI_RESPONSES,
        request,
        answer,
        cwd=cwd_of(orjson.dumps(request)),
        model="gpt-5-codex",
    )
    assert call.cwd == "/src/app"
    events = valid(call_events(call, state))
    assert events[0]["tool"] == "codex" and events[0]["cwd"] == "/src/app"
    lines = events[1]["transcript_lines"]
    assert [line["type"] for line in lines] == ["user", "user", "assistant"]
    assert lines[1]["message"]["content"] == [{"type": "text", "text": "run tests"}]
    content = lines[2]["message"]["content"]
    assert content == [
        {"type": "thinking", "thinking": "run pytest"},
        {"type": "tool_use", "id": "call_1", "name": "shell", "input": {"command": ["pytest"]}},
    ]
    # OpenAI counts cached tokens inside the prompt's: Claude's input_tokens does not.
    assert lines[2]["message"]["usage"]["input_tokens"] == 70
    assert events[2]["hook_event_name"] == "PreToolUse"
    follow = {
        "input": [
            *request["input"],
            answer["output"][1],
            {"type": "function_call_output", "call_id": "call_1", "output": "3 passed"},
        ]
    }
    done = {
        "id": "resp_2",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "All pass."}]}],
    }
    events = valid(call_events(record("c2", OPENAI_RESPONSES, follow, done), state))
    assert events[0]["tool_response"] == "3 passed"
    assert events[1]["transcript_offset"] == 3
    assert events[1]["transcript_lines"][0]["message"]["content"][0]["type"] == "tool_result"


def test_a_chat_completions_call_with_tools() -> None:
    state = SessionState()
    request: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather?"},
        ]
    }
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_w",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    events = valid(call_events(record("d1", OPENAI_CHAT, request, answer, tool="aider"), state))
    assert events[0]["tool"] == "codex" and events[0]["params"] == {"tvgate_tool": "aider"}
    assert events[1]["transcript_lines"][0]["message"]["content"] == [
        {"type": "text", "text": "weather?"}
    ]
    assert events[2]["tool_input"] == {"city": "Oslo"}
    follow = {
        "messages": [
            *request["messages"],
            answer["choices"][0]["message"],
            {"role": "tool", "tool_call_id": "call_w", "content": "sunny"},
        ]
    }
    events = valid(
        call_events(
            record("d2", OPENAI_CHAT, follow, {"choices": [{"message": {"content": "Sunny."}}]}),
            state,
        )
    )
    assert events[0]["tool_response"] == "sunny"


def test_large_turns_are_spread_over_events_and_a_huge_result_is_shrunk() -> None:
    state = SessionState()
    big = "x" * 300_000
    turns = [
        {"role": "user", "content": [{"type": "text", "text": big + str(i)}]} for i in range(3)
    ]
    events = valid(
        call_events(record("e1", ANTHROPIC_MESSAGES, {"messages": turns}, ANSWER_2), state)
    )
    transcripts = [e for e in events if e["event_type"] == "transcript"]
    assert len(transcripts) == 3
    offsets = [(e["transcript_offset"], len(e["transcript_lines"])) for e in transcripts]
    assert offsets == [(0, 1), (1, 1), (2, 2)]
    assert state.offset == 4

    state = SessionState()
    call_events(record("f1", ANTHROPIC_MESSAGES, {"messages": [ASK]}, ANSWER_1), state)
    huge = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "é" * 2_000_000}],
    }
    events = valid(
        call_events(
            record("f2", ANTHROPIC_MESSAGES, {"messages": [ASK, ANSWER_1, huge]}, ANSWER_2), state
        )
    )
    assert "cut by tvgate" in events[0]["tool_response"]
    line = events[1]["transcript_lines"][0]
    assert "cut by tvgate" in line["message"]["content"][0]["content"]


def test_without_captured_bodies_lines_carry_no_text() -> None:
    state = SessionState()
    call = record("g1", ANTHROPIC_MESSAGES, None, None, captured=False)
    events = valid(call_events(call, state))
    assert [e["event_type"] for e in events] == ["session_start", "transcript"]
    (line,) = events[1]["transcript_lines"]
    assert line["type"] == "assistant"
    assert line["message"]["content"] == [] and line["message"]["id"] == "msg_g1"
    assert line["message"]["usage"]["output_tokens"] == 20


def test_the_working_directory_is_read_from_the_json_text_of_the_request() -> None:
    claude = orjson.dumps({"system": [{"text": "Primary working directory: /src/a b\nIs git"}]})
    assert cwd_of(claude) == "/src/a"
    assert cwd_of(orjson.dumps({"system": "Working directory: /w/x\nmore"})) == "/w/x"
    assert cwd_of(orjson.dumps({"input": "<cwd>C:\\work\\app</cwd>"})) == "C:\\work\\app"
    assert cwd_of(b'{"messages": []}') == ""
