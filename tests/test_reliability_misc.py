"""Fault-injection findings 17.6 and 17.8, reproduced against a real ``tvgate serve``.

* An answer too large to capture whole still has its usage read, charged and traced.
* A connection that never finishes its request headers is closed after the header
  timeout; connections past the per-address cap are closed at once.
* On PostgreSQL, the gateway lets go of connections it has not used for a while, so a
  smart shutdown (SIGTERM) of the server can finish.
* The set of recently stored blob digests stays bounded.
* What a stream's capture retains is bounded by ``capture_max_bytes`` and the trace says
  it was cut.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import orjson
import psycopg2
import pytest

from tests.conftest import (
    PG_ADMIN_DSN,
    GatewayProcess,
    add_fake_key,
    beside,
    launch_gateway,
    own_postgres,
    scrape,
    seed,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.governance.windows import budget_counter
from tvgate.models import Org, Trace, UsageCounter, User, database
from tvgate.providers import ANTHROPIC_MESSAGES, OPENAI_RESPONSES
from tvgate.providers.assemble import JSON_TAIL_BYTES, assemble_json_tail
from tvgate.traces import store

_orgs = itertools.count(1)
#: What the module's gateway keeps of an answer for its trace.
CAPTURE_MAX = 64 * 1024


@pytest.fixture(scope="module")
def gw(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """A gateway over the session's database that keeps at most CAPTURE_MAX of an answer."""
    with beside(
        gateway,
        TVGATE_GOVERNANCE_SYNC_INTERVAL="0.2",
        TVGATE_CAPTURE_MAX_BYTES=str(CAPTURE_MAX),
    ) as own:
        yield own


@dataclass
class OwnOrg:
    name: str
    token: str


def new_org(gateway: GatewayProcess, fake: FakeProvider) -> OwnOrg:
    """An org of this test's own with a member, an OpenAI key and the routes ``embed``
    (text-embedding-3-small, which has a price) and ``gpt``."""
    gateway.bind()
    name = f"rel{next(_orgs)}-{secrets.token_hex(3)}"
    email = f"dev@{name}.test"
    services.add_user(email, name)
    token, _ = services.issue_token(email, name, name="tests")
    add_fake_key(fake, name, "oa", fake.openai_url, "openai")
    services.add_route("embed", "oa", model="text-embedding-3-small", org_name=name)
    services.add_route("gpt", "oa", model="gpt-upstream-1", org_name=name)
    assert User.get(User.email == email)
    return OwnOrg(name, token)


def wait_trace(gateway: GatewayProcess, org: OwnOrg, count: int = 1) -> list[Trace]:
    gateway.bind()
    org_id = Org.get(Org.name == org.name).id
    return gateway.wait_traces(count, timeout=30, org_id=org_id)


# --- 17.6: a JSON answer over the capture limit keeps its usage ---


def test_embeddings_answer_over_8_mib_is_traced_charged_and_marked_cut(
    gw: GatewayProcess, fake_provider: FakeProvider
) -> None:
    org = new_org(gw, fake_provider)
    # A token budget of the route: the call must be charged to it with the usage read
    # from the tail of the cut answer (a budget admits a call only while it covers the
    # call's input estimate, so it is set well above one batch).
    services.set_budget(
        org.name, scope="route", subject="embed", metric="tokens", period="day", amount=10**6
    )
    client = openai.OpenAI(base_url=gw.openai_url, api_key=org.token, max_retries=0, timeout=120)
    inputs = [f"word{i}" for i in range(300)]
    # Floats as JSON: ~34 KB per input, ~10 MB in all, with usage after the data.
    result = client.embeddings.create(model="embed", input=inputs, encoding_format="float")
    assert len(result.data) == len(inputs)
    assert result.usage.prompt_tokens == len(inputs)

    (trace,) = wait_trace(gw, org)
    assert trace.bytes_out > 8 * 1024 * 1024
    assert trace.outcome == "ok"
    assert trace.input_tokens == len(inputs)
    assert trace.response_model == "text-embedding-3-small"
    assert trace.cost_usd > 0
    assert trace.truncated

    # The call was charged: the route's shared counter holds its tokens once synced.
    org_id = Org.get(Org.name == org.name).id
    name, _, _ = budget_counter(org_id, "route", "embed", "tokens", "day", time.time())
    deadline = time.monotonic() + 20
    charged = 0.0
    while time.monotonic() < deadline and charged < len(inputs):
        gw.bind()
        counter = UsageCounter.get_or_none(UsageCounter.key == name)
        charged = counter.value if counter is not None else 0.0
        time.sleep(0.3)
    assert charged == len(inputs), "the route's token budget was not charged the call's usage"


# --- 17.8: header timeout and per-address connection cap ---


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (reads end) rather than answering or waiting."""
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert data == b"", f"the server answered instead of closing: {data[:60]!r}"
    return True


def test_half_sent_request_line_is_closed_after_the_header_timeout(
    database_url: str, tmp_path: Path
) -> None:
    gateway = launch_gateway(database_url, tmp_path, {}, TVGATE_HEADER_TIMEOUT="1")
    try:
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as slow:
            slow.settimeout(20)
            slow.sendall(b"POST /v1/messages HTT")
            assert _closed_by_server(slow), "a half-sent request line was held open"
        # A keep-alive connection that has answered a request may idle past the header
        # timeout (nginx keeps its upstream connections open between requests).
        with socket.create_connection((host, int(port))) as kept:
            kept.settimeout(10)
            request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            kept.sendall(request)
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(2)
            kept.sendall(request)
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        stop_gateway(gateway.proc)


def test_connections_past_the_per_address_cap_are_closed(database_url: str, tmp_path: Path) -> None:
    cap = 4
    gateway = launch_gateway(
        database_url, tmp_path, {}, TVGATE_MAX_CONNECTIONS_PER_ADDRESS=str(cap)
    )
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    held: list[socket.socket] = []
    try:
        for _ in range(cap):
            sock = socket.create_connection((host, int(port)))
            sock.settimeout(10)
            sock.sendall(request)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            held.append(sock)
        with socket.create_connection((host, int(port))) as extra:
            extra.settimeout(5)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                extra.sendall(request)
            assert _closed_by_server(extra), f"connection {cap + 1} from one address was kept"
        # One of the held connections goes: a new one is served again.
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            response = _healthz_or_none(gateway)
            if response is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert response is not None and response.status_code == 200
    finally:
        for sock in held:
            sock.close()
        stop_gateway(gateway.proc)


def _healthz_or_none(gateway: GatewayProcess) -> httpx2.Response | None:
    try:
        return httpx2.get(gateway.url + "/healthz", timeout=5)
    except httpx2.TransportError:
        return None


def test_trusted_proxies_are_not_held_to_the_per_address_cap(
    database_url: str, tmp_path: Path
) -> None:
    gateway = launch_gateway(
        database_url,
        tmp_path,
        {},
        TVGATE_MAX_CONNECTIONS_PER_ADDRESS="2",
        TVGATE_TRUSTED_PROXIES="127.0.0.1",
    )
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = socket.create_connection((host, int(port)))
            sock.settimeout(10)
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            held.append(sock)
    finally:
        for sock in held:
            sock.close()
        stop_gateway(gateway.proc)


# --- 17.8: idle database connections on PostgreSQL ---


def _backends(name: str) -> int:
    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,))
            (count,) = cur.fetchone()
            return int(count)
    finally:
        conn.close()


def test_postgresql_connections_unused_for_the_idle_timeout_are_closed(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    with own_postgres(tmp_path) as url:
        name = url.rsplit("/", 1)[1]
        tokens = seed(url, tmp_path, fake_provider)
        # Prices and route snapshots are reloaded every 30 s here: nothing else uses the
        # database while the test watches it.
        with launch_gateway(
            url, tmp_path, tokens, TVGATE_DB_IDLE_TIMEOUT="1", TVGATE_CACHE_TTL="30"
        ) as gateway:
            client = openai.OpenAI(
                base_url=gateway.openai_url, api_key=tokens["dev@acme.test"], max_retries=0
            )
            for _ in range(3):
                client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hello"}]
                )
            gateway.wait_traces(3, timeout=30)
            database.close()
            assert _backends(name) > 0  # the gateway did connect
            deadline = time.monotonic() + 12
            while (held := _backends(name)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert held == 0, f"the gateway still holds {held} idle connections"
            # And it connects again when it needs to.
            answer = client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "again"}]
            )
            assert answer.choices[0].message.content


# --- 17.8: the touched-blob set is bounded ---


def test_touched_blob_set_stays_bounded(tmp_path: Path) -> None:
    open_database(f"sqlite:///{tmp_path / 'blobs.db'}")
    migrate(database.obj)
    org = Org.create(name="blobs")
    store._TOUCHED.clear()
    digests: list[bytes] = []
    for _ in range(store.TOUCHED_MAX * 2 // 5_000 + 1):
        blobs = store.BlobStore(org.id)
        batch = [os.urandom(32) for _ in range(5_000)]
        for digest in batch:
            blobs.put(digest, digest)
        with database.atomic():
            blobs.flush()
        blobs.committed()
        digests.extend(batch)
        assert len(store._TOUCHED) <= store.TOUCHED_MAX
    assert len(digests) > store.TOUCHED_MAX
    # The newest are the ones remembered: a conversation's latest turns are not stored again.
    assert all(store.BlobStore(org.id).has(digest) for digest in digests[-1000:])
    assert not store.BlobStore(org.id).has(digests[0])
    database.close()


# --- 17.8: what a stream's capture retains is bounded ---


def test_stream_capture_is_cut_at_the_capture_bound(
    gw: GatewayProcess, fake_provider: FakeProvider
) -> None:
    org = new_org(gw, fake_provider)
    client = openai.OpenAI(base_url=gw.openai_url, api_key=org.token, max_retries=0, timeout=120)
    events = 6000  # "drip i/6000 " each: ~70 KB of text, past the 64 KiB bound
    stream = client.chat.completions.create(
        model="gpt",
        messages=[{"role": "user", "content": "talk"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={
            "x-fake-scenario": "drip",
            "x-fake-events": str(events),
            "x-fake-interval": "0",
        },
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert len(text) > CAPTURE_MAX  # the client got all of it
    (trace,) = wait_trace(gw, org)
    assert trace.outcome == "ok"
    assert trace.truncated
    assert trace.output_tokens > 0  # the usage event after the cut is still read
    metrics = scrape(gw.url)
    retained = metrics["tvgate_capture_retained_bytes_max"]
    assert 0 < retained <= CAPTURE_MAX


def test_usage_is_read_from_the_tail_of_every_json_api() -> None:
    """The end of a cut answer gives its usage, whichever API; a usage quoted inside the
    answer's text is not taken for it."""
    decoy = 'the model wrote "usage": {"input_tokens": 999999} in its text ' * 2000
    anthropic_body = {
        "id": "msg_1",
        "type": "message",
        "content": [{"type": "text", "text": decoy}],
        "model": "claude-x",
        "usage": {"input_tokens": 11, "output_tokens": 22, "cache_read_input_tokens": 3},
    }
    responses_body = {
        "id": "resp_1",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": decoy}]}],
        "usage": {"input_tokens": 5, "output_tokens": 6, "input_tokens_details": {}},
        "user": None,
        "metadata": {},
    }
    for api, body, expected in (
        (ANTHROPIC_MESSAGES, anthropic_body, (11, 22, 3)),
        (OPENAI_RESPONSES, responses_body, (5, 6, 0)),
    ):
        raw = orjson.dumps(body, option=orjson.OPT_INDENT_2)
        assembled = assemble_json_tail(api, raw[-JSON_TAIL_BYTES:])
        usage = assembled.usage
        assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens) == expected
        assert assembled.truncated
