"""Review issue 16 (web sign-in and hardening), each attack against a real ``tvgate serve``.

16.10: behind nginx every browser reaches tvgate from nginx's address; the sign-in limit
must count failures per (client address, email), from X-Forwarded-For only when the peer
is a trusted proxy, in the database that every worker shares, and never count successes.
16.15: an unknown email costs the same scrypt as a known one. 16.16: /readyz while Visdom
Trace is down, the SQLite file's mode, HSTS, refusals audited in the org they aimed at,
and debug logs without SQL values.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import peewee
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    beside,
    free_port,
    gateway_env,
    start_gateway,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tvgate import services
from tvgate.identity.sessions import AddressThrottle
from tvgate.models import AuditEvent, Org, ProviderKey, ProxyToken, Route, User, WebSession

PASSWORD = "correct horse battery staple"
LIMIT = 3
#: The nginx in front of the gateway, as the gateway sees it (the test process), and the
#: load balancers' network in front of nginx.
PROXIES = "127.0.0.1/32,10.0.0.0/8"


def local_user(gateway: GatewayProcess, org: str = "acme") -> str:
    """A new local user (password sign-in, no Visdom Trace) of ``org``; returns the email."""
    email = f"web-{uuid.uuid4().hex[:8]}@{org}.test"
    gateway.bind()
    services.add_user(email, org, password=PASSWORD)
    return email


def sign_in(
    client: httpx2.Client, email: str, password: str, forwarded_for: str = ""
) -> httpx2.Response:
    """The sign-in form as a browser behind nginx posts it (nginx adds X-Forwarded-For)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    page = client.get("/ui/login", headers=headers)
    assert page.status_code == 200
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert xsrf is not None
    return client.post(
        "/ui/login",
        data={"_xsrf": xsrf.group(1), "email": email, "password": password},
        headers=headers,
    )


def browser(gw: GatewayProcess) -> httpx2.Client:
    return httpx2.Client(base_url=gw.url, follow_redirects=False, timeout=30)


def attempt(gw: GatewayProcess, email: str, password: str, forwarded_for: str = "") -> int:
    """One sign-in from a new browser (no session cookie yet); the status."""
    with browser(gw) as client:
        return sign_in(client, email, password, forwarded_for).status_code


def forwarded() -> str:
    """A client address of its own (TEST-NET-3), so that tests never share a count."""
    return f"203.0.113.{secrets.randbelow(250) + 1}"


def launch_behind_nginx(gateway: GatewayProcess, **env: str) -> GatewayProcess:
    """A gateway behind a trusted nginx, with a small sign-in limit."""
    return beside(gateway, TVGATE_TRUSTED_PROXIES=PROXIES, TVGATE_LOGIN_ATTEMPTS=str(LIMIT), **env)


@pytest.fixture(scope="module")
def behind_nginx(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """Two workers behind a trusted nginx, with a small sign-in limit."""
    with launch_behind_nginx(gateway, TVGATE_WORKERS="2") as gw:
        yield gw


# --- 16.10: sign-in limits behind nginx ---


def test_failures_lock_only_that_address_and_email_behind_a_trusted_proxy(
    behind_nginx: GatewayProcess,
) -> None:
    victim = local_user(behind_nginx)
    attacker, colleague = "198.51.100.66", "198.51.100.77"
    failures = [attempt(behind_nginx, victim, "guess", attacker) for _ in range(LIMIT + 1)]
    # The attacker is locked out of this account, even with the right password...
    assert failures == [401] * LIMIT + [429]
    assert attempt(behind_nginx, victim, PASSWORD, attacker) == 429
    # ...but the victim, behind the same nginx from another address, signs in,
    assert attempt(behind_nginx, victim, PASSWORD, colleague) == 302
    # and everyone else's sign-in from the attacker's address still works.
    assert attempt(behind_nginx, local_user(behind_nginx), PASSWORD, attacker) == 302
    # The session records the browser's address, not nginx's.
    behind_nginx.bind()
    sessions = WebSession.select().join(User).where(User.email == victim)
    assert [s.address for s in sessions] == [colleague]


def test_a_client_cannot_choose_its_address_behind_trusted_proxies(
    behind_nginx: GatewayProcess,
) -> None:
    victim = local_user(behind_nginx)
    attacker = "198.51.100.88"
    # What the attacker writes into X-Forwarded-For comes before what the proxies append
    # (the balancer 10.1.2.3, then nginx the address it saw): it is never reached.
    statuses = [
        attempt(behind_nginx, victim, "guess", f"{forwarded()}, {attacker}, 10.1.2.3")
        for _ in range(LIMIT + 1)
    ]
    assert statuses == [401] * LIMIT + [429]
    assert attempt(behind_nginx, victim, PASSWORD, f"not-an-address, {attacker}") == 429
    # A password typed into the email field is not kept: the table holds a digest.
    typed = "hunter2-" + uuid.uuid4().hex
    assert attempt(behind_nginx, typed, "guess", attacker) == 401
    assert typed not in behind_nginx.dump_database()
    assert attempt(behind_nginx, victim, PASSWORD, f"{attacker}, 198.51.100.99, 10.1.2.3") == 302
    behind_nginx.bind()
    [session] = WebSession.select().join(User).where(User.email == victim)
    assert session.address == "198.51.100.99"


def test_forwarded_for_from_an_untrusted_peer_is_ignored(gateway: GatewayProcess) -> None:
    gw = beside(
        gateway,
        # Some other proxy is trusted; the test process (127.0.0.1) is not.
        TVGATE_TRUSTED_PROXIES="10.99.0.0/16",
        TVGATE_LOGIN_ATTEMPTS=str(LIMIT),
    )
    try:
        victim = local_user(gw)
        # A new made-up address each time does not reset the count of the real one.
        statuses = [attempt(gw, victim, "guess", forwarded()) for _ in range(LIMIT + 2)]
        assert statuses == [401] * LIMIT + [429, 429]
        assert attempt(gw, victim, PASSWORD, "198.51.100.1") == 429
        other = local_user(gw)
        assert attempt(gw, other, PASSWORD, "198.51.100.1") == 302
        gw.bind()
        [session] = WebSession.select().join(User).where(User.email == other)
        assert session.address == "127.0.0.1"
    finally:
        stop_gateway(gw.proc)


#: The per-address cap on failed sign-ins across emails in the spraying test.
SPRAY_LIMIT = 5


def test_spraying_many_emails_from_one_address_is_refused_after_the_cap(
    gateway: GatewayProcess,
) -> None:
    """Password spraying: a guess or two at each of many emails stays under the per-email
    limit; past the address's cap its sign-ins are refused (429, audited in the org of the
    user aimed at), while another address behind the same trusted nginx signs in."""
    # One worker: each counts the failures it saw.
    gw = launch_behind_nginx(
        gateway, TVGATE_LOGIN_ATTEMPTS_PER_ADDRESS=str(SPRAY_LIMIT), TVGATE_WORKERS="1"
    )
    try:
        sprayer, colleague = forwarded(), "198.51.100.123"
        sprayed = [local_user(gw) for _ in range(SPRAY_LIMIT)]
        statuses = [attempt(gw, email, "guess", sprayer) for email in sprayed]
        assert statuses == [401] * SPRAY_LIMIT  # each email failed once: no pair is locked
        victim = local_user(gw)
        # The next email from that address is refused, even with its right password...
        assert attempt(gw, victim, PASSWORD, sprayer) == 429
        page = attempt_page(gw, local_user(gw), "guess", sprayer)
        assert page.status_code == 429
        assert "Too many sign-in attempts" in page.text
        # ...and the refusal is in the audit of the victim's org, with the address.
        gw.bind()
        [refusal] = _refusals("acme", "sign in", victim)
        assert sprayer in refusal.change
        # Another address is not held to the sprayer's count.
        assert attempt(gw, victim, PASSWORD, colleague) == 302
        assert attempt(gw, sprayed[0], PASSWORD, colleague) == 302
    finally:
        stop_gateway(gw.proc)


def test_the_address_count_is_bounded() -> None:
    """However many addresses fail, the throttle follows at most ``max_addresses``: the one
    that failed longest ago is forgotten first."""
    throttle = AddressThrottle(2, max_addresses=3)
    for _ in range(2):
        throttle.failed("192.0.2.1")
    assert throttle.locked("192.0.2.1")
    for host in range(2, 5):
        throttle.failed(f"192.0.2.{host}")
        throttle.failed(f"192.0.2.{host}")
    assert not throttle.locked("192.0.2.1")
    assert [throttle.locked(f"192.0.2.{host}") for host in range(2, 5)] == [True] * 3


def attempt_page(
    gw: GatewayProcess, email: str, password: str, forwarded_for: str
) -> httpx2.Response:
    """One sign-in from a new browser; the whole answer."""
    with browser(gw) as client:
        return sign_in(client, email, password, forwarded_for)


def test_successful_sign_ins_do_not_count(behind_nginx: GatewayProcess) -> None:
    email = local_user(behind_nginx)
    address = forwarded()
    # Over two workers, so that one of them sees more than LIMIT of them whatever the split.
    statuses = [attempt(behind_nginx, email, PASSWORD, address) for _ in range(2 * LIMIT + 1)]
    assert statuses == [302] * (2 * LIMIT + 1)


def _worker(client: httpx2.Client) -> int:
    """Which worker serves this client's (kept-alive) connection."""
    worker: int = client.get("/healthz").json()["worker"]
    return worker


def test_both_workers_see_the_same_failure_count(behind_nginx: GatewayProcess) -> None:
    email = local_user(behind_nginx)
    address = forwarded()
    with browser(behind_nginx) as first:
        worker = _worker(first)
        statuses = [sign_in(first, email, "guess", address).status_code for _ in range(LIMIT)]
        assert statuses == [401] * LIMIT
        assert _worker(first) == worker  # the same connection, so the same worker
    # A connection that the kernel gives to the other worker.
    for _ in range(100):
        second = browser(behind_nginx)
        if _worker(second) != worker:
            break
        second.close()
    else:
        pytest.fail("no connection reached the second worker")
    try:
        assert sign_in(second, email, PASSWORD, address).status_code == 429
    finally:
        second.close()


# --- 16.15: an unknown email costs as much as a known one ---


def test_unknown_email_runs_scrypt_like_a_known_one(
    gateway: GatewayProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = local_user(gateway)
    calls: list[int] = []
    real_scrypt = hashlib.scrypt

    def counting_scrypt(password: bytes, **kwargs: Any) -> bytes:
        calls.append(kwargs["n"])
        return real_scrypt(password, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
    assert services.verify_local_password(email, "not the password") == []
    known = list(calls)
    calls.clear()
    assert services.verify_local_password(f"nobody-{uuid.uuid4().hex}@acme.test", PASSWORD) == []
    unknown = list(calls)
    assert known == [2**15]
    assert unknown == known


# --- 16.16: readiness, file mode, HSTS, audit, debug logs ---


def test_ready_while_visdom_trace_is_down_and_says_so(gateway: GatewayProcess) -> None:
    gw = beside(
        gateway,
        TVGATE_VISDOM_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
    )
    try:
        ready = httpx2.get(gw.url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True
        assert body["checks"]["visdom"].startswith("unavailable")
        assert body["checks"]["database"] == "ok" and body["checks"]["identity"] == "ok"
        # Tokens minted by tvgate still work while Visdom Trace is away.
        me = httpx2.get(
            gw.url + "/api/v1/me",
            headers={"Authorization": f"Bearer {gateway.tokens['dev@acme.test']}"},
            timeout=30,
        )
        assert me.status_code == 200
    finally:
        stop_gateway(gw.proc)


def test_sqlite_files_are_private_to_the_service_user(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = data_dir / "tvgate.db"
    env = gateway_env(f"sqlite:///{database}", data_dir, 0)
    proc = start_gateway(env, tmp_path / "tvgate.log")
    try:
        # A request that reads the database, so that the WAL and shared-memory files exist.
        assert httpx2.get(f"http://{env['TVGATE_LISTEN']}/readyz", timeout=30).status_code == 200
        files = [database, data_dir / "tvgate.db-wal", data_dir / "tvgate.db-shm"]
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        assert modes == {f.name: 0o600 for f in files}
    finally:
        stop_gateway(proc)


def test_hsts_only_when_the_public_url_is_https(gateway: GatewayProcess) -> None:
    gw = beside(
        gateway,
        TVGATE_PUBLIC_URL="https://gate.example.test",
    )
    token = {"Authorization": f"Bearer {gateway.tokens['dev@acme.test']}"}
    try:
        for url in (gw.url + "/ui/login", gw.url + "/api/v1/me"):
            response = httpx2.get(url, headers=token, timeout=30)
            assert response.status_code == 200
            assert (
                response.headers.get("strict-transport-security")
                == "max-age=31536000; includeSubDomains"
            ), url
    finally:
        stop_gateway(gw.proc)
    for url in (gateway.url + "/ui/login", gateway.url + "/api/v1/me"):
        response = httpx2.get(url, headers=token, timeout=30)
        assert response.status_code == 200
        assert "strict-transport-security" not in response.headers, url


def _refusals(org_name: str, action: str, target: str, after: int = 0) -> list[AuditEvent]:
    """The refusals audited in an org for an action on a target, since audit row ``after``
    (SQLite gives a deleted row's id again, so an earlier test's refusal on another object
    may share this one's target)."""
    org = Org.get(Org.name == org_name)
    return list(
        AuditEvent.select().where(
            (AuditEvent.id > after)
            & (AuditEvent.org_id == org.id)
            & (AuditEvent.action == action)
            & (AuditEvent.target == target)
            & (AuditEvent.allowed == False)  # noqa: E712 - a SQL comparison
        )
    )


def test_a_refused_attempt_on_another_orgs_object_is_audited_in_that_org(
    gateway: GatewayProcess,
) -> None:
    gateway.bind()
    before = AuditEvent.select(peewee.fn.MAX(AuditEvent.id)).scalar() or 0
    route = Route.get(Route.name == "other-claude")
    token = (
        ProxyToken.select().join(User).where(User.email == "dev@other.test").order_by(ProxyToken.id)
    ).first()
    budget = services.set_budget(
        "other", scope="org", metric="tokens", period="month", amount=10**12
    )
    # A call by the other org, for a trace of theirs.
    marker = "other-org-" + uuid.uuid4().hex
    anthropic.Anthropic(
        base_url=gateway.url, api_key=gateway.tokens["dev@other.test"], max_retries=0
    ).messages.create(
        model="other-claude", max_tokens=16, messages=[{"role": "user", "content": marker}]
    )
    other_org = Org.get(Org.name == "other")
    trace_id = ""
    deadline = time.monotonic() + 30
    while not trace_id and time.monotonic() < deadline:
        traces = gateway.traces(org_id=other_org.id)
        trace_id = str(traces[-1].id) if traces else ""
        time.sleep(0.1)
    assert trace_id
    admin = httpx2.Client(
        base_url=gateway.url + "/api/v1",
        headers={"Authorization": f"Bearer {gateway.tokens['admin@acme.test']}"},
        timeout=30,
    )
    with admin:
        attempts = {
            ("delete route", str(route.id)): admin.delete(f"/routes/{route.id}"),
            ("update route", str(route.id)): admin.patch(
                f"/routes/{route.id}", json={"upstream_model": "claude-stolen"}
            ),
            ("revoke token", str(token.id)): admin.delete(f"/tokens/{token.id}"),
            ("delete budget", str(budget.id)): admin.delete(f"/budgets/{budget.id}"),
            ("read trace", trace_id): admin.get(f"/traces/{trace_id}"),
        }
    for (action, target), response in attempts.items():
        assert response.status_code == 404, (action, response.text)
        # The envelope says "not found", never whose it is.
        assert "other" not in response.text
        assert len(_refusals("acme", action, target, before)) == 1, action
        [refusal] = _refusals("other", action, target, before)
        assert refusal.actor == "admin@acme.test"
    assert Route.get_by_id(route.id).upstream_model == "claude-other"
    assert ProxyToken.get_by_id(token.id).revoked_at is None


def test_debug_log_holds_no_ciphertext_and_no_body(
    gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    gw = beside(gateway, TVGATE_LOG_LEVEL="debug")
    marker = "canary-body-" + secrets.token_hex(8)
    secret = "sk-ant-api03-" + secrets.token_hex(16)
    name = "debug-" + uuid.uuid4().hex[:6]
    try:
        admin = {"Authorization": f"Bearer {gateway.tokens['admin@acme.test']}"}
        added = httpx2.post(
            gw.url + "/api/v1/keys",
            json={
                "name": name,
                "provider": "anthropic",
                "secret": secret,
                "base_url": "https://api.anthropic.com",
            },
            headers=admin,
            timeout=30,
        )
        assert added.status_code == 201, added.text
        client = anthropic.Anthropic(
            base_url=gw.url, api_key=gateway.tokens["dev@acme.test"], max_retries=0
        )
        reply = client.messages.create(
            model="claude-test",
            max_tokens=16,
            messages=[{"role": "user", "content": marker}],
        )
        assert reply.content
    finally:
        stop_gateway(gw.proc)  # a stop writes every queued trace
    gw.bind()
    ciphertext = ProviderKey.get(ProviderKey.name == name).ciphertext
    log = gw.log_text()
    assert '"level": "debug"' in log and "INSERT" in log  # SQL is logged at debug...
    assert ciphertext not in log  # ...without its values
    assert ciphertext[-24:] not in log
    assert marker not in log
    assert secret not in log and ANTHROPIC_SECRET not in log
    assert not [token for token in gateway.tokens.values() if token in log]
