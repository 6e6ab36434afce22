"""Budgets hold exactly across worker processes: reservations, and a refusal that is final.

Reliability review 17.5: a 40-token daily budget with 15-token calls, sent back to
back on new connections to two workers, admitted 6 calls (225 %) and answered 200
after a 429; one process alone admitted the call that crossed the limit (45/40).
These tests repeat that against a real ``tvgate serve`` with ``TVGATE_WORKERS=2``
(and with one worker) on SQLite and on PostgreSQL, and hold the gateway to what
docs/governance.md promises: a call is admitted only when what the budget has left
covers its input estimate, and once a call has been refused for the budget, no
call is admitted in that window.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import math
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import (
    GatewayProcess,
    add_fake_key,
    launch_gateway,
    stop_gateway,
    tokens_of,
)
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.governance.store import CLOSED, GRANTED, WAIT, CounterStore
from tvgate.governance.windows import counter_key, window
from tvgate.models import BudgetHold, Org, UsageCounter
from tvgate.proxy.body import parse_request_body

#: The default sync interval, as the review ran it: the one that lets workers drift apart most.
SYNC = 1.0
_orgs = itertools.count(1)
#: The body every call sends: its size is what the gateway estimates the input from.
BODY = json.dumps(
    {
        "model": "claude",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "count my tokens please"}],
    }
).encode()


def _launch(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, workers: int
) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp(f"budgets{workers}")
    gateway = launch_gateway(
        database_url,
        data_dir,
        {},
        TVGATE_WORKERS=str(workers),
        TVGATE_GOVERNANCE_SYNC_INTERVAL=str(SYNC),
        TVGATE_CACHE_TTL="0.5",
    )
    yield gateway
    stop_gateway(gateway.proc)


@pytest.fixture(scope="module")
def two_workers(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    yield from _launch(database_url, tmp_path_factory, 2)


@pytest.fixture(scope="module")
def one_worker(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    yield from _launch(database_url, tmp_path_factory, 1)


def new_org(gateway: GatewayProcess, fake: FakeProvider) -> tuple[str, int, str]:
    """An org with one member and a route ``claude`` to the fake provider: (name, id, token)."""
    gateway.bind()
    name = f"exact{next(_orgs)}-{secrets.token_hex(3)}"
    services.add_user(f"dev@{name}.test", name)
    token, _ = services.issue_token(f"dev@{name}.test", name, name="tests")
    add_fake_key(fake, name, "main", fake.url)
    services.add_route("claude", "main", model="claude-upstream-1", org_name=name)
    return name, Org.get(Org.name == name).id, token


def ask(gateway: GatewayProcess, token: str) -> httpx2.Response:
    """One call on a connection of its own (a new client each time), as the review sent them."""
    with httpx2.Client(timeout=30) as fresh:
        return fresh.post(
            gateway.url + "/v1/messages",
            headers={
                "x-api-key": token,
                "anthropic-version": "2023-06-01",
                "content-type": "application/json",
            },
            content=BODY,
        )


def documented_admissions(limit: int, per_call: int) -> int:
    """How many back-to-back calls docs/governance.md says a budget admits: a call is
    admitted while what is left covers its input estimate (body bytes / 4)."""
    input_estimate = math.ceil(len(BODY) / 4)
    left, admitted = limit, 0
    while left >= input_estimate and left > 0:
        left -= per_call
        admitted += 1
    return admitted


def counter_of(gateway: GatewayProcess, org_id: int) -> UsageCounter:
    """The org's daily token counter, once every worker has synced (and given back what it
    held for calls now ended)."""
    time.sleep(3 * SYNC)
    start, _ = window("day", time.time())
    gateway.bind()
    return UsageCounter.get_by_id(counter_key(org_id, "tokens", "day", start, "org", ""))


def held(counter: UsageCounter) -> float:
    """What the gateway's processes hold of the counter's budget."""
    return sum(hold.amount for hold in BudgetHold.select().where(BudgetHold.key == counter.key))


def set_budget(gateway: GatewayProcess, org: str, tokens: int) -> None:
    made = gateway.cli("budgets", "set", "--org", org, "--tokens-per-day", str(tokens))
    assert made.returncode == 0, made.stderr
    time.sleep(3 * SYNC)  # the budget reaches every worker's route snapshot


def measure_call(gateway: GatewayProcess, fake: FakeProvider) -> tuple[str, int, str, int]:
    """A new org and the tokens one call uses there (before any budget: not counted)."""
    name, org_id, token = new_org(gateway, fake)
    first = ask(gateway, token)
    assert first.status_code == 200, first.text
    return name, org_id, token, tokens_of(first)


def run_budget(gateway: GatewayProcess, fake: FakeProvider, calls: int) -> None:
    """The review's scenario: a budget of 40/15 calls' worth, ``calls`` calls back to back."""
    name, org_id, token, per_call = measure_call(gateway, fake)
    limit = per_call * 40 // 15
    set_budget(gateway, name, limit)
    statuses = [ask(gateway, token).status_code for _ in range(calls)]
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    first_refusal = statuses.index(429) if 429 in statuses else len(statuses)
    # A refusal is final for the window: no 200 after the first 429.
    assert 200 not in statuses[first_refusal:], statuses
    expected = documented_admissions(limit, per_call)
    assert admitted == expected, (statuses, limit, per_call)
    counter = counter_of(gateway, org_id)
    # The shared counter holds the usage of the admitted calls, and no reservation is left.
    assert counter.value == admitted * per_call <= limit
    assert held(counter) == 0
    assert counter.closed_limit == limit


def test_two_workers_never_admit_after_a_refusal(
    two_workers: GatewayProcess, fake_provider: FakeProvider
) -> None:
    run_budget(two_workers, fake_provider, calls=10)


def test_one_worker_refuses_the_call_that_cannot_fit(
    one_worker: GatewayProcess, fake_provider: FakeProvider
) -> None:
    run_budget(one_worker, fake_provider, calls=6)


def test_two_workers_hold_a_budget_against_simultaneous_calls(
    two_workers: GatewayProcess, fake_provider: FakeProvider
) -> None:
    """Sixteen calls at once: each reserves its estimate before it goes out, so the calls
    admitted never use more than the budget (the fake answers within its estimate)."""
    name, org_id, token, per_call = measure_call(two_workers, fake_provider)
    limit = per_call * 40 // 15
    set_budget(two_workers, name, limit)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: ask(two_workers, token).status_code, range(16)))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) == documented_admissions(limit, per_call), statuses
    counter = counter_of(two_workers, org_id)
    assert counter.value == statuses.count(200) * per_call <= limit
    assert held(counter) == 0


def test_raising_a_closed_budget_admits_again(
    two_workers: GatewayProcess, fake_provider: FakeProvider
) -> None:
    """A refusal is final for the budget as it stood: an admin who raises it reopens it."""
    name, org_id, token, per_call = measure_call(two_workers, fake_provider)
    set_budget(two_workers, name, per_call)
    assert ask(two_workers, token).status_code == 200
    assert [ask(two_workers, token).status_code for _ in range(4)] == [429] * 4
    set_budget(two_workers, name, 3 * per_call)
    assert [ask(two_workers, token).status_code for _ in range(4)] == [200, 200, 429, 429]
    assert counter_of(two_workers, org_id).value == 3 * per_call


def test_headroom_of_a_dead_process_stops_counting_and_a_closed_budget_stays_closed(
    fresh_database_url: str,
) -> None:
    """The shared side alone: what a process holds makes others wait, not refuse; what a
    process that died (no heartbeat for the slot TTL) held stops counting; a budget closed
    to calls of a size stays closed to them, for every process, until it is raised."""
    db = open_database(fresh_database_url)
    migrate(db)
    end = time.time() + 3600
    ttl = 0.5
    died, alive = CounterStore(db, "died", ttl), CounterStore(db, "alive", ttl)

    def reserve(store: CounterStore, need: float, limit: float = 100) -> tuple[float, str]:
        return store.reserve_budget("k", 100, need, limit, may_close=True, expires_at=end)

    assert reserve(died, 10) == (100, GRANTED)
    assert reserve(alive, 10) == (0, WAIT)  # it may come back: wait, do not close
    time.sleep(ttl + 0.2)  # "died" never heartbeats again
    assert reserve(alive, 10) == (100, GRANTED)
    # Its calls used 95, and it gives the rest back: 5 left, which a call needing 10 cannot
    # use, and nobody alive holds anything that could come back: closed for the window.
    alive.sync({"k": (95.0, end)}, {}, [], unhold={"k": 100})
    assert reserve(alive, 10) == (0, CLOSED)
    assert reserve(died, 10) == (0, CLOSED)  # every process, every call as large
    assert reserve(died, 50) == (0, CLOSED)
    assert reserve(alive, 4) == (5, GRANTED)  # a smaller call still fits what is left
    assert reserve(alive, 100, limit=300) == (100, GRANTED)  # raised past where it closed
    db.close()


def test_one_oversized_call_does_not_close_the_budget_to_smaller_ones(
    two_workers: GatewayProcess, fake_provider: FakeProvider
) -> None:
    """A body whose input estimate alone is past the budget is refused; the budget stays
    open to the calls that fit, so one request cannot spend a whole team's day."""
    name, org_id, token, per_call = measure_call(two_workers, fake_provider)
    set_budget(two_workers, name, 3 * per_call)
    huge = json.dumps(
        {
            "model": "claude",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "x" * (16 * per_call)}],
        }
    )
    with httpx2.Client(timeout=30) as fresh:
        refused = fresh.post(
            two_workers.url + "/v1/messages",
            headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
            content=huge,
        )
    assert refused.status_code == 429
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert "token budget per day of the org" in error["error"]["message"]
    fit = documented_admissions(3 * per_call, per_call)
    statuses = [ask(two_workers, token).status_code for _ in range(fit + 2)]
    assert statuses == [200] * fit + [429, 429]
    assert counter_of(two_workers, org_id).value == fit * per_call


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ('"max_tokens": 32000', 32000),
        ('"max_completion_tokens": 900', 900),
        ('"max_output_tokens": 70, "max_tokens": 60', 70),
        ('"max_tokens": true', 0),
        ('"max_tokens": -5', 0),
        ('"max_tokens": "9"', 0),
        ('"stream": true', 0),
    ],
)
def test_the_output_limit_a_budget_reserves_is_read_from_the_body(
    members: str, expected: int
) -> None:
    body = parse_request_body(f'{{"model": "m", {members}}}'.encode())
    assert body.max_output == expected


def test_headroom_held_by_a_killed_process_comes_back_after_its_heartbeat_stops(
    database_url: str, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    """Fault injection: a gateway is killed (SIGKILL) while a call holds most of a budget.
    Another gateway's call waits for that headroom instead of being refused, and is
    admitted once the dead process's heartbeat is ten syncs (10 s) old."""
    (tmp_path / "doomed").mkdir()
    (tmp_path / "survivor").mkdir()
    settings = {"TVGATE_GOVERNANCE_SYNC_INTERVAL": str(SYNC), "TVGATE_CACHE_TTL": "0.5"}
    doomed = launch_gateway(database_url, tmp_path / "doomed", {}, **settings)
    survivor = launch_gateway(
        database_url, tmp_path / "survivor", {}, TVGATE_QUEUE_TIMEOUT="30", **settings
    )
    try:
        name, org_id, token, per_call = measure_call(survivor, fake_provider)
        set_budget(survivor, name, 3 * per_call)

        def hang() -> None:
            with contextlib.suppress(httpx2.HTTPError):
                httpx2.post(
                    doomed.url + "/v1/messages",
                    headers={
                        "x-api-key": token,
                        "anthropic-version": "2023-06-01",
                        "x-fake-scenario": "hang",
                        "x-fake-hang": "120",
                    },
                    content=BODY,
                    timeout=60,
                )

        hanging = threading.Thread(target=hang, daemon=True)
        hanging.start()
        survivor.bind()
        start, _ = window("day", time.time())
        key = counter_key(org_id, "tokens", "day", start, "org", "")
        deadline = time.monotonic() + 20
        while not BudgetHold.select().where(BudgetHold.key == key).exists():
            assert time.monotonic() < deadline, "the hanging call never reserved"
            time.sleep(0.05)
        doomed.proc.kill()  # no last sync: what it held stays in the table
        doomed.proc.wait(10)
        hanging.join(70)
        held_by_dead = held(UsageCounter.get_by_id(key))
        # What is left beside it cannot cover a call: without the expiry, this would wait
        # for ever (and answer 429 after the queue timeout).
        assert 3 * per_call - held_by_dead < math.ceil(len(BODY) / 4)
        assert ask(survivor, token).status_code == 200
    finally:
        stop_gateway(doomed.proc)
        stop_gateway(survivor.proc)
