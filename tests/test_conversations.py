"""Tests of tvgate.traces.conversations: a body stored from where it differs is stored exactly as if whole."""

from __future__ import annotations

import random
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvgate.traces.content import blob_digest, load_request, store_request
from tvgate.traces.conversations import PER_CONVERSATION, Conversations
from tvgate.traces.redact import Redactor
from tvgate.traces.split import BIG_STRING, continue_split, split_body

PROVIDER_KEY = "sk-ant-api03-" + "Q" * 40
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA"
    + "x" * 64
    + "\n-----END RSA PRIVATE KEY-----"
)
#: Text with a secret of each kind, as a coding agent's tool results carry them.
SECRETS = [
    "export ANTHROPIC_API_KEY=sk-ant-api03-" + "a1B2" * 12,
    "token ghp_" + "Z9y8" * 10,
    PEM,
    'aws_secret_access_key = "' + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" + '"',
    "the org key " + PROVIDER_KEY + " leaked",
    "AKIAIOSFODNN7EXAMPLE",
]


class DictSink:
    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.puts = 0

    def has(self, digest: bytes) -> bool:
        return digest in self.blobs

    def put(self, digest: bytes, data: bytes) -> None:
        assert digest not in self.blobs and blob_digest(data) == digest
        self.blobs[digest] = data
        self.puts += 1

    def get(self, digest: bytes) -> bytes:
        return self.blobs[digest]


def session(turns: int, seed: int, *, secrets: bool) -> list[bytes]:
    """A coding agent's successive request bodies: each is the one before plus a turn,
    with the cache_control marker moved to the newest message."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "path", "if", "for", '"quoted"', "\\n", "é", "data"]
    system = "You are an agent. " * rng.randint(1, 200)
    # The SDKs send `model` and the rest after `messages`; some clients before.
    messages_first = rng.random() < 0.5
    messages: list[dict[str, Any]] = []
    bodies = []
    for turn in range(turns):
        text = " ".join(rng.choices(words, k=rng.randint(5, 400)))
        if secrets and rng.random() < 0.5:
            text = rng.choice(SECRETS) + " " + text
        content: Any = text if rng.random() < 0.3 else [{"type": "text", "text": text}]
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": content})
        sent = [dict(m) for m in messages]
        if isinstance(sent[-1]["content"], list):
            last = dict(sent[-1]["content"][-1], cache_control={"type": "ephemeral"})
            sent[-1]["content"] = [last]
        document = {"model": "claude-x", "system": system, "messages": sent, "max_tokens": 1000}
        if messages_first:
            document = {"messages": sent, **{k: v for k, v in document.items() if k != "messages"}}
        bodies.append(orjson.dumps(document, option=orjson.OPT_INDENT_2 if seed % 3 == 0 else 0))
    return bodies


def stored_whole(redactor: Redactor, raw: bytes) -> tuple[bytes, bytes]:
    """The root and the stored bytes when the body is redacted and stored on its own."""
    sink = DictSink()
    root = store_request(redactor.redact(raw), sink)
    return root, load_request(root, sink)


def test_a_continued_body_is_cut_as_a_whole_scan_cuts_it() -> None:
    bodies = session(12, seed=1, secrets=False)
    previous, previous_raw = split_body(bodies[0]), bodies[0]
    for turn, raw in enumerate(bodies[1:], 1):
        shared = [r for r in previous.resumes if raw.startswith(previous_raw[:r])]
        whole = split_body(raw)
        assert len(shared) >= turn - 1  # all but the message whose marker moved, if any
        for resume in shared:
            assert continue_split(raw, previous, resume) == whole
        previous, previous_raw = whole, raw


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), secrets=st.booleans(), literal=st.booleans())
def test_sessions_are_stored_as_if_each_body_were_stored_whole(
    seed: int, secrets: bool, literal: bool
) -> None:
    redactor = Redactor([PROVIDER_KEY] if literal else [])
    assert redactor.element_local
    conversations = Conversations()
    sink = DictSink()
    bodies = session(10, seed, secrets=secrets)
    for raw in bodies:
        root = conversations.store((1, 1, "s"), redactor, raw, sink)
        expected_root, expected = stored_whole(redactor, raw)
        assert root == expected_root
        assert load_request(root, sink) == expected
        if literal:
            assert PROVIDER_KEY.encode() not in expected
    # Every body after the second went on from the one before it (the first one's only
    # message had the cache_control marker, which moved).
    assert conversations.continued >= len(bodies) - 2


def test_a_long_session_is_scanned_about_once() -> None:
    redactor = Redactor([PROVIDER_KEY])
    conversations = Conversations()
    sink = DictSink()
    bodies = session(40, seed=4, secrets=True)
    for raw in bodies:
        conversations.store((1, 1, ""), redactor, raw, sink)
    assert conversations.continued >= len(bodies) - 2
    # Each body is about the one before plus a turn: scanned in all, a few times the
    # last body, against twenty times for the bodies whole.
    assert conversations.scanned < 3 * len(bodies[-1])
    assert sum(map(len, bodies)) > 15 * len(bodies[-1])


def test_a_secret_early_in_the_conversation_does_not_stop_the_reuse() -> None:
    redactor = Redactor([PROVIDER_KEY])
    conversations = Conversations()
    sink = DictSink()
    first = [{"role": "user", "content": f"my key is {PROVIDER_KEY} and {PEM}"}]
    for turn in range(6):
        messages = first + [{"role": "user", "content": f"turn {n} " * 50} for n in range(turn)]
        raw = orjson.dumps({"model": "m", "messages": messages})
        root = conversations.store((1, 1, ""), redactor, raw, sink)
        assert (root, load_request(root, sink)) == stored_whole(redactor, raw)
        assert PROVIDER_KEY.encode() not in load_request(root, sink)
    assert conversations.continued == 5


def test_admin_patterns_redact_the_whole_body_every_time() -> None:
    # An admin pattern may match across elements: the label in one message, the value
    # in the next. Redacting the new turn alone would miss it.
    redactor = Redactor(patterns=[r"PASSWORD\W{0,12}hunter2"])
    assert not redactor.element_local
    conversations = Conversations()
    sink = DictSink()
    messages = [{"role": "user", "content": "the PASSWORD is"}]
    for _ in range(3):
        messages.append({"role": "user", "content": "hunter2"})
        raw = orjson.dumps({"model": "m", "messages": messages})
        root = conversations.store((1, 1, ""), redactor, raw, sink)
        assert (root, load_request(root, sink)) == stored_whole(redactor, raw)
        assert b"hunter2" not in load_request(root, sink)[:80]
    assert conversations.continued == 0


def test_a_body_sent_again_keeps_its_root_and_writes_nothing() -> None:
    redactor = Redactor()
    conversations = Conversations()
    sink = DictSink()
    raw = session(5, seed=2, secrets=True)[-1]
    root = conversations.store((1, 1, ""), redactor, raw, sink)
    puts = sink.puts
    assert conversations.store((1, 1, ""), redactor, bytes(raw), sink) == root
    assert sink.puts == puts
    # New redaction settings store it again, from scratch.
    assert conversations.store((1, 1, ""), Redactor(), raw, sink) == root
    assert conversations.continued == 0


def test_a_swept_blob_of_a_remembered_body_is_written_again() -> None:
    redactor = Redactor()
    conversations = Conversations()
    sink = DictSink()
    bodies = session(4, seed=3, secrets=False)
    conversations.store((1, 1, ""), redactor, bodies[2], sink)
    sink.blobs.clear()  # a retention sweep took everything
    root = conversations.store((1, 1, ""), redactor, bodies[3], sink)
    assert conversations.continued == 1
    assert load_request(root, sink) == bodies[3]


def test_conversations_are_kept_apart_and_bounded() -> None:
    redactor = Redactor()
    conversations = Conversations(budget=400_000)
    sink = DictSink()
    big = "x" * (BIG_STRING * 4)

    def body(branch: int, turns: int) -> bytes:
        messages = [{"role": "user", "content": f"{branch} {n} {big}"} for n in range(turns)]
        return orjson.dumps({"model": "m", "messages": messages})

    # Parallel branches of one conversation each go on from their own last body.
    for turns in (1, 2, 3):
        for branch in range(PER_CONVERSATION):
            conversations.store((1, 1, "s"), redactor, body(branch, turns), sink)
    assert conversations.continued == 2 * PER_CONVERSATION
    # Another org, user or session does not share a body, even an identical one.
    before = conversations.continued
    for key in ((2, 1, "s"), (1, 2, "s"), (1, 1, "t")):
        conversations.store(key, redactor, body(0, 4), sink)
    assert conversations.continued == before
    # Bounded in bytes: the oldest conversations leave first; a body over a quarter
    # of the budget is not kept at all.
    for user in range(40):
        conversations.store((3, user, ""), redactor, body(user, 2), sink)
    assert conversations.recent.size <= conversations.recent.budget
    huge = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "y" * 200_000}]})
    conversations.store((4, 1, ""), redactor, huge, sink)
    conversations.store((4, 1, ""), redactor, huge + b" ", sink)
    assert conversations.recent.size <= conversations.recent.budget
