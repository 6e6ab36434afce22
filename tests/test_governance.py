"""Budgets, rate limits and concurrency caps, enforced by two gateway processes on one database.

Each test makes an org of its own, so what it sets cannot touch other tests. The
two gateways sync their shared counters every 0.2 s (``governance_sync_interval``);
the accuracy these tests allow is the one docs/governance.md promises.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx2
import pytest

from tests.conftest import (
    RunningGateway,
    add_fake_key,
    launch_gateway,
    scrape,
    stop_gateway,
    tokens_of,
)
from tests.fake_provider import FakeProvider, RecordedRequest
from tests.inprocess import start_in_process
from tvgate import services
from tvgate.governance.store import CounterStore
from tvgate.governance.windows import (
    COUNT_REQUESTS,
    PERIOD_MINUTE,
    budget_counter,
    counter_key,
    window,
)
from tvgate.models import ConcurrencySlot, Org, UsageCounter, User

SYNC = 0.2
_orgs = itertools.count(1)


@dataclass
class Pair:
    a: RunningGateway
    b: RunningGateway

    def __iter__(self) -> Iterator[RunningGateway]:
        return iter((self.a, self.b))


@pytest.fixture(scope="module")
def pair(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    data_dir = tmp_path_factory.mktemp("governance")
    settings = {
        "TVGATE_GOVERNANCE_SYNC_INTERVAL": str(SYNC),
        "TVGATE_QUEUE_TIMEOUT": "5",
        "TVGATE_CACHE_TTL": "0.5",
        "TVGATE_IDLE_TIMEOUT": "2",
    }
    (data_dir / "a").mkdir()
    (data_dir / "b").mkdir()
    a = launch_gateway(database_url, data_dir / "a", {}, **settings)
    b = launch_gateway(database_url, data_dir / "b", {}, **settings)
    yield Pair(a, b)
    stop_gateway(a.proc)
    stop_gateway(b.proc)


@dataclass
class Org_:
    name: str
    org_id: int
    user_id: int
    email: str
    token: str
    secret: str


def new_org(gateway: RunningGateway, fake: FakeProvider, *, scenario: str = "") -> Org_:
    """An org with one member, one key on the fake provider and a route ``claude`` to it."""
    gateway.bind()
    name = f"gov{next(_orgs)}-{secrets.token_hex(3)}"
    email = f"dev@{name}.test"
    services.add_user(email, name)
    token, _ = services.issue_token(email, name, name="tests")
    secret = add_fake_key(
        fake, name, "main", fake.url + (f"/scenario/{scenario}" if scenario else "")
    )
    services.add_route("claude", "main", model="claude-upstream-1", org_name=name)
    org = Org.get(Org.name == name)
    user = User.get(User.email == email)
    return Org_(name, org.id, user.id, email, token, secret)


def client(gateway: RunningGateway, org: Org_) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=org.token, max_retries=0)


def ask(
    gateway: RunningGateway, org: Org_, model: str = "claude", **headers: str
) -> httpx2.Response:
    return httpx2.post(
        gateway.url + "/v1/messages",
        headers={"x-api-key": org.token, "anthropic-version": "2023-06-01", **headers},
        json={
            "model": model,
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "count my tokens please"}],
        },
        timeout=30,
    )


def settle() -> None:
    """Long enough for every process to sync and for route snapshots to reload."""
    time.sleep(max(0.7, 3 * SYNC))


def away_from_minute_end(margin: float = 12.0) -> None:
    """Per-minute windows are fixed: start a per-minute test well inside one minute."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.2)


def max_open(requests: list[RecordedRequest]) -> int:
    events = []
    for r in requests:
        events.append((r.received_at, 1))
        events.append(((r.finished_at or r.closed_at or time.monotonic()), -1))
    open_now = peak = 0
    for _, step in sorted(events):
        open_now += step
        peak = max(peak, open_now)
    return peak


# --- budgets ---


def test_token_budget_holds_across_two_processes(pair: Pair, fake_provider: FakeProvider) -> None:
    org = new_org(pair.a, fake_provider)
    first = ask(pair.a, org)
    assert first.status_code == 200, first.text
    per_call = tokens_of(first)
    budget = str(int(3.5 * per_call))
    made = pair.a.cli(
        "budgets", "set", "--org", org.name, "--user", org.email,
        "--tokens-per-day", budget, "--warn-percent", "50",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    settle()
    admitted, warned = 0, 0
    refusal: httpx2.Response | None = None
    for gateway in itertools.islice(itertools.cycle(pair), 12):
        response = ask(gateway, org)
        if response.status_code == 429:
            refusal = response
            break
        assert response.status_code == 200, response.text
        admitted += 1
        warned += "x-tvgate-budget-warning" in response.headers
        time.sleep(2 * SYNC + 0.1)
    # Three calls fit under 3.5 calls' worth: the fourth would start at 3 of 3.5, and the
    # half call left does not cover its input estimate (body bytes / 4), so it is refused
    # rather than let cross the limit (docs/governance.md). Exact across two processes.
    assert admitted == 3
    assert warned >= 1  # from 50 % on (the third call), answers carry the warning
    assert refusal is not None
    error = refusal.json()
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert f"token budget per day of user {org.email}" in error["error"]["message"]
    assert int(refusal.headers["retry-after"]) > 0
    settle()
    for gateway in pair:  # both processes refuse once the total is shared
        again = ask(gateway, org)
        assert again.status_code == 429
        assert "budget" in again.json()["error"]["message"]
    # Reconciled: the shared counter holds exactly the usage of the admitted calls.
    start, _ = window("day", time.time())
    name = counter_key(org.org_id, "tokens", "day", start, "user", str(org.user_id))
    pair.a.bind()
    assert UsageCounter.get_by_id(name).value == admitted * per_call
    refused = pair.a.wait_traces(3, org_id=org.org_id, status_code=429)
    assert all(t.outcome == "rejected" and t.error_type == "rate_limited" for t in refused)


def test_cost_budget_of_a_route_refuses_in_openai_format(
    pair: Pair, fake_provider: FakeProvider
) -> None:
    org = new_org(pair.a, fake_provider)
    add_fake_key(fake_provider, org.name, "oa", fake_provider.openai_url, "openai")
    services.add_route("gpt", "oa", model="gpt-4o", org_name=org.name)
    services.set_budget(
        org.name, scope="route", subject="gpt", metric="usd", period="month", amount=1e-6
    )
    settle()
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hello there"}]}
    headers = {"authorization": f"Bearer {org.token}"}
    # Its input estimate alone (body bytes / 4 tokens at gpt-4o's price) costs more than
    # the budget: even the first call cannot fit, and closes the budget for the month.
    first = httpx2.post(pair.a.url + "/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 429
    settle()
    for gateway in pair:
        refused = httpx2.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert "cost budget per month of route gpt" in error["message"]
        assert error["type"] and "retry-after" in refused.headers
    # Another route of the same org is not held by the route's budget.
    assert ask(pair.b, org).status_code == 200


def test_cost_budget_is_spent_by_the_calls_it_admits(
    pair: Pair, fake_provider: FakeProvider
) -> None:
    """A dollar budget of 3.5 calls' cost admits three or four calls (the fourth only if
    the half call left covers its input estimate), charges each at its own price and then
    refuses, in both processes."""
    org = new_org(pair.a, fake_provider)
    add_fake_key(fake_provider, org.name, "oa", fake_provider.openai_url, "openai")
    services.add_route("gpt", "oa", model="gpt-4o", org_name=org.name)
    services.add_route("gpt-probe", "oa", model="gpt-4o", org_name=org.name)
    headers = {"authorization": f"Bearer {org.token}"}

    def chat(gateway: RunningGateway, model: str) -> httpx2.Response:
        body = {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        return httpx2.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)

    assert chat(pair.a, "gpt-probe").status_code == 200
    (probe,) = pair.a.wait_traces(1, org_id=org.org_id, route_name="gpt-probe")
    per_call = probe.cost_usd
    assert per_call > 0
    services.set_budget(
        org.name, scope="route", subject="gpt", metric="usd", period="month", amount=3.5 * per_call
    )
    settle()
    statuses = [chat(pair.a, "gpt").status_code for _ in range(8)]
    admitted = statuses.count(200)
    assert 3 <= admitted <= 4, statuses
    assert statuses == [200] * admitted + [429] * (8 - admitted)  # never a 200 after a 429
    traces = pair.a.wait_traces(admitted, org_id=org.org_id, route_name="gpt", status_code=200)
    assert all(t.cost_usd == pytest.approx(per_call) for t in traces)
    settle()
    refused = chat(pair.b, "gpt")
    assert refused.status_code == 429
    assert "cost budget per month of route gpt" in refused.json()["error"]["message"]
    name, _, _ = budget_counter(org.org_id, "route", "gpt", "usd", "month", time.time())
    pair.a.bind()
    spent = UsageCounter.get_by_id(name)
    assert spent.value == pytest.approx(admitted * per_call)


def test_warning_header_for_a_route_with_a_unicode_name(
    pair: Pair, fake_provider: FakeProvider
) -> None:
    org = new_org(pair.a, fake_provider)
    services.add_route("ruta-ñ", "main", org_name=org.name)
    services.set_budget(
        org.name,
        scope="route",
        subject="ruta-ñ",
        metric="tokens",
        period="day",
        amount=1e9,
        warn_percent=0,
    )
    settle()
    response = ask(pair.b, org, model="ruta-ñ")
    assert response.status_code == 200
    assert response.headers["x-tvgate-budget-warning"] == (
        "the token budget per day of route ruta-\\xf1 (1,000,000,000 tokens): 0% used"
    )


# --- rate limits ---


def test_requests_per_minute_hold_exactly_across_two_processes(
    pair: Pair, fake_provider: FakeProvider
) -> None:
    org = new_org(pair.a, fake_provider)
    made = pair.b.cli("limits", "set", "--org", org.name, "--route", "claude", "--rpm", "6")
    assert made.returncode == 0, made.stderr
    settle()
    away_from_minute_end()
    gateways = [pair.a, pair.b] * 8
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda gw: ask(gw, org), gateways))
    codes = sorted(r.status_code for r in statuses)
    assert codes.count(200) == 6, codes
    assert codes.count(429) == 10
    refusal = next(r for r in statuses if r.status_code == 429)
    assert "6 requests per minute of route claude" in refusal.json()["error"]["message"]
    assert 1 <= int(refusal.headers["retry-after"]) <= 60
    # Units reserved but not used went back: the shared counter shows what was served.
    settle()
    start, _ = window(PERIOD_MINUTE, time.time())
    name = counter_key(org.org_id, COUNT_REQUESTS, PERIOD_MINUTE, start, "route", "claude")
    pair.a.bind()
    assert UsageCounter.get_by_id(name).value == 6


def test_tokens_per_minute_of_a_user(pair: Pair, fake_provider: FakeProvider) -> None:
    org = new_org(pair.a, fake_provider)
    away_from_minute_end()
    per_call = tokens_of(ask(pair.a, org))
    services.set_rate_limit(org.name, scope="user", subject=org.email, tpm=per_call * 2)
    settle()
    assert ask(pair.a, org).status_code == 200
    assert ask(pair.b, org).status_code == 200
    settle()
    refused = ask(pair.a, org)
    assert refused.status_code == 429
    assert "tokens per minute of user" in refused.json()["error"]["message"]


# --- concurrency caps ---


def _drip_stream(gateway: RunningGateway, org: Org_, events: int = 5) -> httpx2.Response:
    with httpx2.stream(
        "POST",
        gateway.url + "/v1/messages",
        headers={
            "x-api-key": org.token,
            "anthropic-version": "2023-06-01",
            "x-fake-scenario": "drip",
            "x-fake-events": str(events),
            "x-fake-interval": "0.2",
        },
        json={
            "model": "claude",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": "slowly"}],
        },
        timeout=30,
    ) as response:
        response.read()
        return response


def _requests_with(fake: FakeProvider, secret: str) -> list[RecordedRequest]:
    return [
        r
        for r in fake.requests
        if secret in (r.headers.get("x-api-key", ""), r.headers.get("authorization", "")[7:])
    ]


def _wait_upstream(fake: FakeProvider, secret: str, count: int) -> None:
    """Until ``count`` calls with ``secret`` have reached the fake provider (their slots are
    held then): a fixed sleep is not enough on a loaded machine."""
    deadline = time.monotonic() + 30
    while len(_requests_with(fake, secret)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def _held_key_slots(gateway: RunningGateway) -> int:
    """The key concurrency slots held in ``gateway``'s database, once every process has
    given back what it holds (or 30 s have passed)."""
    deadline = time.monotonic() + 30
    while True:
        gateway.bind()
        held = ConcurrencySlot.select().where(ConcurrencySlot.resource.startswith("key:"))
        slots = sum(s.slots for s in held)
        if slots == 0 or time.monotonic() > deadline:
            return slots
        time.sleep(0.1)


def test_key_concurrency_cap_holds_across_two_processes(
    pair: Pair, fake_provider: FakeProvider
) -> None:
    org = new_org(pair.a, fake_provider)
    made = pair.a.cli("keys", "set", "main", "--org", org.name, "--max-concurrent", "2")
    assert made.returncode == 0, made.stderr
    settle()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda gw: _drip_stream(gw, org), [pair.a, pair.b] * 3))
    took = time.monotonic() - started
    # Queued, not refused: the queue timeout (5 s) is longer than three waves of ~1 s.
    assert [r.status_code for r in results] == [200] * 6
    seen = _requests_with(fake_provider, org.secret)
    assert len(seen) == 6
    assert max_open(seen) == 2
    assert took >= 2.5  # three waves of two
    settle()
    assert _held_key_slots(pair.a) == 0  # every slot given back


def test_key_cap_refuses_with_retry_after_when_the_queue_times_out(
    database_url: str, fake_provider: FakeProvider, tmp_path: Path
) -> None:
    gateway = start_in_process(
        database_url,
        tmp_path,
        {},
        TVGATE_QUEUE_TIMEOUT="0.5",
        TVGATE_GOVERNANCE_SYNC_INTERVAL=str(SYNC),
        TVGATE_MAX_CONCURRENT_CALLS="3",
    )
    try:
        org = new_org(gateway, fake_provider)
        services.update_key("main", max_concurrent=1, org_name=org.name)
        settle()
        holder = threading.Thread(target=_drip_stream, args=(gateway, org, 25))
        holder.start()
        _wait_upstream(fake_provider, org.secret, 1)
        refused = ask(gateway, org)
        assert refused.status_code == 429
        assert refused.json()["error"]["message"].startswith("this route's provider key has 1")
        assert refused.headers["retry-after"] == "1"
        # The gateway-wide cap (3) refuses the fourth open call, whatever its key.
        others = new_org(gateway, fake_provider)
        streams = [threading.Thread(target=_drip_stream, args=(gateway, others, 25)) for _ in "ab"]
        for stream in streams:
            stream.start()
        _wait_upstream(fake_provider, others.secret, 2)
        over = ask(gateway, others)
        assert over.status_code == 429
        assert "the gateway has 3 calls open" in over.json()["error"]["message"]
        holder.join()
        for stream in streams:
            stream.join()
        assert ask(gateway, org).status_code == 200
        counted = scrape(gateway.url)
        assert counted["tvgate_governance_refused_total"] == 2
    finally:
        gateway.stop()
    # A process that stops gives back every slot it held, at once.
    gateway.bind()
    gateway_slots = ConcurrencySlot.select().where(ConcurrencySlot.resource == "gateway")
    assert gateway_slots.count() >= 1
    assert sum(s.slots for s in gateway_slots) == 0


# --- the shared store itself ---


def test_reservations_never_pass_the_limit(fresh_database_url: str) -> None:
    from tvgate.db import migrate, open_database

    db = open_database(fresh_database_url)
    migrate(db)
    stores = [CounterStore(db, f"holder-{i}", slot_ttl=10) for i in range(2)]
    end = time.time() + 60

    def take(store: CounterStore) -> int:
        return sum(store.reserve("k", 3, 50, end) for _ in range(20))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        granted = sum(pool.map(take, stores * 2))
    assert granted == 50
    assert UsageCounter.get_by_id("k").value == 50

    def slot(store: CounterStore) -> bool:
        return store.acquire_slot("key:1", 0, 3)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        won = list(pool.map(slot, [CounterStore(db, f"h{i}", 10) for i in range(8)]))
    assert won.count(True) == 3
    # A holder that stopped sending heartbeats holds nothing after the TTL.
    ConcurrencySlot.update(heartbeat_at=time.time() - 60).execute()
    assert stores[0].acquire_slot("key:1", 0, 3)
    db.close()


def test_windows_are_utc_days_months_and_minutes() -> None:
    moment = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    assert window("minute", moment) == (moment - 30, moment + 30)
    day_start, day_end = window("day", moment)
    assert datetime.fromtimestamp(day_start, UTC) == datetime(2026, 12, 31, tzinfo=UTC)
    assert day_end - day_start == 86400
    month_start, month_end = window("month", moment)
    assert datetime.fromtimestamp(month_start, UTC) == datetime(2026, 12, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(month_end, UTC) == datetime(2027, 1, 1, tzinfo=UTC)
