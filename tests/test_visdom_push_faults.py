"""Faults on the push to Visdom Trace (issue 18): an ingestion that answers hostile things
(a 200 with a 10 MB body, a body that drips forever, a redirect, an HTML page) is read
no further than the pusher's bounds, in size and in time, and the event is parked with a
clear reason or retried, the gateway serving calls meanwhile; a gateway killed with
SIGKILL in the middle of a push and started again delivers every event, none twice as
Visdom Trace's dedup keys count them. A real ``tvgate serve`` against the strict
stand-in (tests/fake_visdom_ingest.py), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import scrape
from tests.fake_visdom_ingest import FakeVisdomIngest
from tests.harness import GatewayProcess, launch_gateway
from tests.test_visdom_sink import (
    INGEST_KEY,
    PUSH,
    REPO,
    assert_claude_session,
    claude_session,
    connect,
    ended,
    status,
    wait_for,
)

#: Seconds a POST may take: the drip-feed's answer is cut at this.
PUSH_TIMEOUT = "2"


@pytest.fixture
def ingest() -> Iterator[FakeVisdomIngest]:
    fake = FakeVisdomIngest(INGEST_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def gateway(
    seeded: tuple[str, Path, dict[str, str]], ingest: FakeVisdomIngest
) -> Iterator[GatewayProcess]:
    url, data_dir, tokens = seeded
    with launch_gateway(
        url, data_dir, tokens, TVGATE_VISDOM_PUSH_TIMEOUT=PUSH_TIMEOUT, **PUSH
    ) as gw:
        connect(gw, ingest)
        yield gw


def still_serving(gw: GatewayProcess) -> None:
    """The gateway answers its health check and its proxy while the push misbehaves (no
    call: it would be a session of its own to push)."""
    assert httpx2.get(gw.url + "/healthz", timeout=10).status_code == 200
    models = httpx2.get(
        gw.url + "/v1/models", headers={"x-api-key": gw.tokens["dev@acme.test"]}, timeout=10
    )
    assert models.status_code == 200, models.text


def parked_for(gw: GatewayProcess, reason: str) -> Callable[[], bool]:
    def check() -> bool:
        return any(reason in parked["error"] for parked in status(gw)["parked"])

    return check


def test_hostile_answers_park_the_event_with_their_reason(
    gateway: GatewayProcess, ingest: FakeVisdomIngest
) -> None:
    """Each hostile answer in turn (an admin reconnecting after each): parked with what
    was wrong, the session's later events waiting behind it; answered properly at last,
    the session arrives whole."""
    elsewhere = FakeVisdomIngest(INGEST_KEY).start()
    ingest.redirect_to = elsewhere.url
    reasons = {
        "huge": "with more than 64 KiB",
        "redirect": "a redirect to " + elsewhere.url,
        "html": "with text/html",
    }
    try:
        for hostile, reason in reasons.items():
            ingest.misbehave = lambda _request, name=hostile: name
            if hostile == "huge":
                answers = claude_session(
                    gateway, "cc-hostile", "hostile", **{"x-tracevault-repo": REPO}
                )
            else:
                connect(gateway, ingest)  # released: tried again, parked again
            wait_for(parked_for(gateway, reason), 60, lambda: str(status(gateway)))
            assert ingest.hostile_answers[hostile] >= 1
            shown = status(gateway)
            assert shown["parked_count"] == 1 and shown["sent"] == 0
            still_serving(gateway)
        # The redirect was not followed: the key never went to where it pointed.
        assert sum(elsewhere.answers.values()) == 0
    finally:
        elsewhere.stop()
    ingest.misbehave = None
    connect(gateway, ingest)
    wait_for(ended(ingest, "cc-hostile"), 60, lambda: str(status(gateway)))
    assert ingest.problems == [] and ingest.gaps() == []
    assert_claude_session(ingest.session("cc-hostile"), answers, "hostile")
    assert status(gateway)["parked_count"] == 0


def test_an_answer_that_never_ends_is_cut_at_the_timeout_and_retried(
    gateway: GatewayProcess, ingest: FakeVisdomIngest
) -> None:
    ingest.misbehave = lambda _request: "drip"
    answers = claude_session(gateway, "cc-drip", "drip", **{"x-tracevault-repo": REPO})
    wait_for(
        lambda: scrape(gateway.url)['tvgate_visdom_events_total{outcome="retried"}'] >= 2,
        60,
        lambda: str(status(gateway)),
    )
    shown = status(gateway)
    assert f"did not answer within {PUSH_TIMEOUT} s" in shown["last_error"]
    assert shown["parked_count"] == 0 and shown["pending"] > 0
    still_serving(gateway)
    ingest.misbehave = None  # no reconnect: a retry is not parked
    wait_for(ended(ingest, "cc-drip"), 90, lambda: str(status(gateway)))
    assert ingest.problems == [] and ingest.gaps() == []
    assert_claude_session(ingest.session("cc-drip"), answers, "drip")


@pytest.mark.slow
def test_a_gateway_killed_in_the_middle_of_a_push_delivers_every_event_once(
    seeded: tuple[str, Path, dict[str, str]], ingest: FakeVisdomIngest
) -> None:
    """SIGKILL while Visdom Trace has stored an event and not yet answered: the restarted
    gateway (once the dead one's lease has run out) sends it again and the rest after it;
    the stand-in's dedup keys (chunk index, event_uuid, tool_use_id and hook) find each
    line and tool event once, and no chunk sent again with other content."""
    url, data_dir, tokens = seeded
    held: list[str] = []

    def hold_first_tool_event(event: dict[str, object]) -> bool:
        if event["event_type"] == "tool_use" and not held:
            held.append(str(event["event_uuid"]))
            return True
        return False

    ingest.hold = hold_first_tool_event
    gw = launch_gateway(url, data_dir, tokens, **PUSH)
    try:
        connect(gw, ingest)
        answers = claude_session(gw, "cc-killed", "killed", **{"x-tracevault-repo": REPO})
        assert ingest.held.wait(60), str(status(gw))
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        gw.stop()
    ingest.hold = None
    ingest.released.set()
    with launch_gateway(url, data_dir, tokens, **PUSH) as restarted:
        wait_for(ended(ingest, "cc-killed"), 120, lambda: str(status(restarted)))
        assert status(restarted)["pending"] == 0
    assert ingest.problems == [] and ingest.gaps() == []
    assert_claude_session(ingest.session("cc-killed"), answers, "killed")
    sent = [e for _path, _headers, e in ingest.received if e.get("event_uuid") == held[0]]
    assert len(sent) == 2  # delivered before the kill and again after: deduplicated
