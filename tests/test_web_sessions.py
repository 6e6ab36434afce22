"""Signing in to the web UI: Visdom Trace, local users and tokens; sessions, cookies, throttling."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import httpx2
import pytest

from tests.conftest import (
    GatewayProcess,
    beside,
    stop_gateway,
)
from tests.fake_visdom import FakeVisdom
from tvgate.models import WebSession

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def visdom(visdom: FakeVisdom) -> FakeVisdom:
    """conftest's, with an org acme."""
    visdom.add_org("acme")
    return visdom


@pytest.fixture(scope="module")
def uigate(gateway: GatewayProcess, visdom: FakeVisdom) -> Iterator[GatewayProcess]:
    with beside(
        gateway,
        TVGATE_VISDOM_URL=visdom.url,
        TVGATE_SESSION_IDLE_TIMEOUT="3",
        TVGATE_LOGIN_ATTEMPTS="1000",
    ) as gw:
        # acme was made in tvgate: only an operator's link lets Visdom Trace's acme in.
        linked = gw.cli("orgs", "link", "acme", "--visdom-org-id", visdom.orgs["acme"].org_id)
        assert linked.returncode == 0, linked.stderr
        yield gw


def browser(gw: GatewayProcess) -> httpx2.Client:
    return httpx2.Client(base_url=gw.url, follow_redirects=False, timeout=30)


def sign_in(client: httpx2.Client, **form: str) -> httpx2.Response:
    page = client.get("/ui/login")
    assert page.status_code == 200
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert xsrf is not None
    return client.post("/ui/login", data={"_xsrf": xsrf.group(1), **form})


def test_login_page_is_safe_to_frame_nowhere_and_runs_no_inline_script(
    uigate: GatewayProcess,
) -> None:
    page = httpx2.get(uigate.url + "/ui/login")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script" not in page.text
    assert "Visdom Trace" in page.text


def test_post_without_xsrf_token_is_refused(uigate: GatewayProcess) -> None:
    with browser(uigate) as client:
        client.get("/ui/login")
        refused = client.post("/ui/login", data={"email": "a@b.c", "password": "x"})
    assert refused.status_code == 403


def test_visdom_trace_sign_in_makes_a_session_and_stores_no_password(
    uigate: GatewayProcess, visdom: FakeVisdom
) -> None:
    email = f"ui-{uuid.uuid4().hex[:6]}@acme.test"
    visdom.add_user(email, PASSWORD, {"acme": "admin"})
    with browser(uigate) as client:
        response = sign_in(client, email=email, password=PASSWORD)
        assert response.status_code == 302 and response.headers["location"] == "/ui/"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui/" in cookie
        assert "Secure" not in cookie  # plain http in the tests; set over https
        home = client.get("/ui/")
        assert home.status_code == 200 and email in home.text and "acme" in home.text
    assert PASSWORD not in uigate.dump_database()
    assert visdom.calls["login"] >= 1


def test_wrong_password_and_unknown_user(uigate: GatewayProcess, visdom: FakeVisdom) -> None:
    email = f"ui-{uuid.uuid4().hex[:6]}@acme.test"
    visdom.add_user(email, PASSWORD, {"acme": "developer"})
    with browser(uigate) as client:
        wrong = sign_in(client, email=email, password="not it")
        assert wrong.status_code == 401 and "Wrong email, password or token." in wrong.text
        assert "tvgate_session" not in wrong.headers.get("set-cookie", "")
        assert client.get("/ui/").status_code == 302


def test_local_user_and_token_sign_in(uigate: GatewayProcess, gateway: GatewayProcess) -> None:
    email = f"local-{uuid.uuid4().hex[:6]}@acme.test"
    created = gateway.cli(
        "users", "add", email, "--org", "acme", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert created.returncode == 0, created.stderr
    with browser(uigate) as client:
        assert sign_in(client, email=email, password=PASSWORD).status_code == 302
        assert email in client.get("/ui/").text
    with browser(uigate) as client:
        assert sign_in(client, token=gateway.tokens["dev@acme.test"]).status_code == 302
        assert "dev@acme.test" in client.get("/ui/").text


def test_sign_out_ends_the_session_for_good(
    uigate: GatewayProcess, gateway: GatewayProcess
) -> None:
    with browser(uigate) as client:
        sign_in(client, token=gateway.tokens["dev@acme.test"])
        stolen = client.cookies.get("tvgate_session")
        home = client.get("/ui/")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', home.text)
        assert xsrf is not None
        out = client.post("/ui/logout", data={"_xsrf": xsrf.group(1)})
        assert out.status_code == 302 and out.headers["location"] == "/ui/login"
    with browser(uigate) as replay:
        replay.cookies.set("tvgate_session", stolen or "", path="/ui/")
        assert replay.get("/ui/").status_code == 302


def test_every_sign_in_gets_a_new_session(uigate: GatewayProcess, gateway: GatewayProcess) -> None:
    seen = set()
    for _ in range(2):
        with browser(uigate) as client:
            sign_in(client, token=gateway.tokens["dev@acme.test"])
            seen.add(client.cookies.get("tvgate_session"))
    assert len(seen) == 2
    gateway.bind()
    assert all(len(s.session_hash) == 64 for s in WebSession.select())


def test_idle_session_expires(uigate: GatewayProcess, gateway: GatewayProcess) -> None:
    with browser(uigate) as client:
        sign_in(client, token=gateway.tokens["dev@acme.test"])
        assert client.get("/ui/").status_code == 200
        time.sleep(3.5)
        assert client.get("/ui/").status_code == 302


def test_sign_in_attempts_are_throttled(gateway: GatewayProcess, visdom: FakeVisdom) -> None:
    gw = beside(
        gateway,
        TVGATE_VISDOM_URL=visdom.url,
        TVGATE_LOGIN_ATTEMPTS="3",
    )
    try:
        with browser(gw) as client:
            statuses = [
                sign_in(client, email="x@acme.test", password="guess").status_code for _ in range(5)
            ]
        assert statuses[:3] == [401, 401, 401]
        assert statuses[3:] == [429, 429]
    finally:
        stop_gateway(gw.proc)
