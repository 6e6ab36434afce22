"""The web UI in a real browser (Playwright driving Debian's Chromium).

One browser for the module. The flow: an admin signs in, adds a key and an org
route; a member signs in, reads the Claude Code configuration from the page, calls
the gateway with the official anthropic SDK and finds the trace and its answer.
Around it: an XSS payload renders inert, a form without its XSRF token is refused,
a member cannot open admin pages, every page is screenshotted at 1280 and 390 px and
has no horizontal overflow on a phone, and no page ever carries a key's secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.conftest import ANTHROPIC_SECRET, OPENAI_SECRET, GatewayProcess, post_message
from tests.fake_provider import FakeProvider

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).parent / "artifacts" / "screenshots"
XSS = "<script>window.__xss=1</script><img src=x onerror=window.__xss=1>"
ADMIN, MEMBER = "admin@acme.test", "dev@acme.test"

#: The HTML of every page any test of this module showed, checked for secrets at the end.
SEEN: list[tuple[str, str]] = []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def record(page: Page) -> str:
    html = page.content()
    SEEN.append((page.url, html))
    return html


def submit(page: Page, form: str, fields: dict[str, str], landing: str) -> str:
    """Fill the form ``form`` (a CSS selector) as a person would, choosing in its selects and
    typing in its inputs; submit it and record the page it lands on (``landing``: a regex of
    its URL, the redirect that says what happened)."""
    for name, value in fields.items():
        field = page.locator(f"{form} [name={name}]")
        if field.evaluate("element => element.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.click(f"{form} button[type=submit]")
    page.wait_for_url(re.compile(landing))
    return record(page)


def visit(page: Page, url: str, status: int = 200) -> str:
    response = page.goto(url)
    assert response is not None
    assert response.status == status, f"{url}: {response.status}"
    return record(page)


def sign_in(context: BrowserContext, gateway: GatewayProcess, email: str) -> Page:
    page = context.new_page()
    visit(page, gateway.url + "/ui/login")
    page.locator("summary", has_text="token").click()
    page.fill("input[name=token]", gateway.tokens[email])
    page.click("button[type=submit]:has-text('Sign in')")
    page.wait_for_url(gateway.url + "/ui/")
    record(page)
    return page


def shoot(page: Page, name: str) -> None:
    """Screenshots at desktop and phone widths; at the phone width, no sideways scrolling."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in ((1280, 900), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{width}.png"), full_page=True)
    overflow = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert overflow[0] <= overflow[1], f"{name} overflows at 390 px: {overflow}"
    page.set_viewport_size({"width": 1280, "height": 900})


@pytest.fixture(scope="module")
def admin_page(browser: Browser, gateway: GatewayProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield sign_in(context, gateway, ADMIN)
    context.close()


@pytest.fixture(scope="module")
def member_page(browser: Browser, gateway: GatewayProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield sign_in(context, gateway, MEMBER)
    context.close()


def test_admin_adds_a_key_and_an_org_route(
    admin_page: Page, gateway: GatewayProcess, fake_provider: FakeProvider
) -> None:
    page = admin_page
    visit(page, gateway.url + "/ui/keys")
    secret_field = page.locator("#add-key input[name=secret]")
    assert secret_field.get_attribute("type") == "password"
    assert secret_field.get_attribute("autocomplete") == "off"
    fields = {
        "name": "ui-anthropic",
        "provider": "anthropic",
        "base_url": fake_provider.url,
        "secret": ANTHROPIC_SECRET,
        "max_concurrent": "50",
    }
    html = submit(page, "#add-key", fields, r".*/ui/keys\?ok=key-added")
    assert "ui-anthropic" in html and "…" + ANTHROPIC_SECRET[-4:] in html
    assert "50" in page.locator("tr", has_text="ui-anthropic").inner_text()
    shoot(page, "keys")

    visit(page, gateway.url + "/ui/keys/ui-anthropic")
    shoot(page, "key")
    submit(page, "#key-cap", {"max_concurrent": "60"}, r".*/ui/keys/ui-anthropic\?ok=saved")
    assert "60" in page.locator("dl.facts").inner_text()

    visit(page, gateway.url + "/ui/routes")
    fields = {
        "name": "ui-claude",
        "key": "ui-anthropic",
        "model": "claude-ui-upstream",
        "description": "Made in the browser test",
        "fallbacks": "claude-test, claude-pass",
    }
    assert "ui-claude" in submit(page, "#add-route", fields, r".*/ui/routes\?ok=route-added")
    row = page.locator("tr", has_text="ui-claude").inner_text()
    assert "claude-test, claude-pass" in row
    shoot(page, "routes")

    # Who gets what: the member asking for ui-claude gets the new route.
    page.goto(gateway.url + f"/ui/routes?name=ui-claude&user={MEMBER}")
    html = record(page)
    assert "claude-ui-upstream" in page.inner_text("#resolve")
    route_id = re.search(r'href="/ui/routes/(\d+)">ui-claude<', html)
    assert route_id is not None
    visit(page, gateway.url + f"/ui/routes/{route_id.group(1)}")
    shoot(page, "route")
    page.fill("input[name=fallbacks]", "claude-pass")
    page.click("button[type=submit]:has-text('Save')")
    page.wait_for_url(re.compile(r".*/ui/routes\?ok=saved"))
    assert "claude-pass" in page.locator("tr", has_text="ui-claude").inner_text()
    assert "claude-test" not in page.locator("tr", has_text="ui-claude").inner_text()


def test_admin_sets_budgets_and_limits_and_the_member_sees_them(
    admin_page: Page, member_page: Page, gateway: GatewayProcess
) -> None:
    page = admin_page
    visit(page, gateway.url + "/ui/governance")
    fields = {
        "scope": "user",
        "subject": MEMBER,
        "measure": "usd-month",
        "amount": "1000000",
        "warn_percent": "90",
    }
    submit(page, "#set-budget", fields, r".*/ui/governance\?ok=saved")
    budget = page.locator("#budgets tbody tr", has_text=MEMBER)
    assert "cost per month" in budget.inner_text() and "$1,000,000.00" in budget.inner_text()
    assert budget.locator("meter").count() == 1
    fields = {"scope": "route", "subject": "claude-test", "rpm": "100000"}
    submit(page, "#set-limit", fields, r".*/ui/governance\?ok=saved")
    assert "100,000" in page.locator("#limits tbody tr", has_text="claude-test").inner_text()
    shoot(page, "governance")
    # A refusal comes back as a page saying why.
    visit(page, gateway.url + "/ui/governance")
    page.select_option("#set-budget select[name=scope]", "user")
    page.fill("#set-budget input[name=subject]", "nobody@acme.test")
    page.fill("#set-budget input[name=amount]", "5")
    with page.expect_navigation() as navigation:
        page.click("#set-budget button[type=submit]")
    assert navigation.value is not None and navigation.value.status == 404
    assert "no user" in page.inner_text("main")

    visit(member_page, gateway.url + "/ui/me")
    mine = member_page.inner_text("#my-budgets")
    assert "$1,000,000.00" in mine and "claude-test" in mine
    shoot(member_page, "me-budgets")
    visit(member_page, gateway.url + "/ui/")
    assert MEMBER in member_page.inner_text("#budgets")
    visit(page, gateway.url + "/ui/")
    assert MEMBER in page.inner_text("#budgets")
    shoot(page, "overview-budgets")

    # Removed again, so that no other test of the session runs under them.
    visit(page, gateway.url + "/ui/governance")
    page.locator("#budgets tbody tr", has_text=MEMBER).locator("button").click()
    page.wait_for_url(re.compile(r".*/ui/governance\?ok=deleted"))
    page.locator("#limits tbody tr", has_text="claude-test").locator("button").click()
    page.wait_for_url(re.compile(r".*/ui/governance\?ok=deleted"))
    html = record(page)
    assert MEMBER not in page.inner_text("#budgets") and "No rate limits." in html


def test_member_connects_claude_code_and_reads_the_answer(
    member_page: Page, gateway: GatewayProcess
) -> None:
    page = member_page
    visit(page, gateway.url + "/ui/me")
    shoot(page, "me")
    config = page.inner_text("#config-claude-code-0")
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in config.splitlines()
        if line.startswith("export ")
    )
    base_url = env["ANTHROPIC_BASE_URL"]
    assert base_url == gateway.url
    assert env["ANTHROPIC_AUTH_TOKEN"] == '"$TVGATE_TOKEN"'
    settings_json = page.inner_text("#config-claude-code-1")
    assert '"apiKeyHelper"' in settings_json and gateway.url in settings_json
    codex = page.text_content("#tool-codex") or ""
    assert 'wire_api = "responses"' in codex and gateway.url + "/v1" in codex
    for tool in ("cursor", "gsd2", "aider", "continue", "cline", "opencode", "curl"):
        assert page.locator(f"#tool-{tool}").count() == 1

    client = anthropic.Anthropic(
        base_url=base_url, auth_token=gateway.tokens[MEMBER], api_key=None, max_retries=0
    )
    question = "What is the colour of the browser test? " + XSS
    message = client.messages.create(
        model="ui-claude",
        max_tokens=64,
        system="You are tested by a browser.",
        messages=[{"role": "user", "content": question}],
        extra_headers={"x-tvgate-session": "ui-session-1"},
    )
    answer = message.content[0].text  # type: ignore[union-attr]
    assert answer.startswith("You said:")
    gateway.wait_traces(1, route_name="ui-claude")

    visit(page, gateway.url + "/ui/traces?route=ui-claude")
    shoot(page, "traces")
    page.click("table.traces a >> nth=0")
    page.wait_for_url(re.compile(r".*/ui/traces/[0-9a-zA-Z_-]+$"))
    record(page)
    assert page.evaluate("window.__xss") is None
    # The payload is shown as text (in the question and in the echoed answer), not run.
    assert XSS in page.inner_text(".turn.user")
    assert "You said:" in page.inner_text("#answer")
    assert "You are tested by a browser." in page.inner_text(".turn.system")
    assert page.locator(".turn img").count() == 0
    shoot(page, "trace")

    trace_url = page.url
    raw = page.goto(trace_url + "/raw")
    assert raw is not None and raw.status == 200
    assert raw.headers["content-type"].startswith("application/json")
    record(page)
    assert '"route": "ui-claude"' in page.inner_text("body")

    visit(page, gateway.url + "/ui/sessions/ui-session-1")
    assert "ui-claude" in page.inner_text("main")
    shoot(page, "session")

    visit(page, gateway.url + "/ui/")
    assert page.locator("svg rect.bar").count() > 0
    shoot(page, "overview-member")


def _agent_call(gateway: GatewayProcess, session: str, words: str, **headers: str) -> None:
    body = {
        "model": "claude-sonnet",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": words}],
    }
    assert post_message(gateway, body, session, **headers).status_code == 200


def _agents_of(gateway: GatewayProcess, session: str, count: int) -> list[dict[str, Any]]:
    """The session's agents as the JSON API gives them, once its ``count`` traces are in."""
    gateway.wait_traces(count, session_id=session)
    view = httpx2.get(
        f"{gateway.url}/api/v1/sessions/{session}",
        headers={"Authorization": f"Bearer {gateway.tokens[MEMBER]}"},
        timeout=10,
    ).json()
    agents: list[dict[str, Any]] = view["agents"]
    return agents


def test_session_page_shows_the_tree_of_agents_with_their_usage(
    member_page: Page, gateway: GatewayProcess
) -> None:
    page = member_page
    session = "ui-agents-1"
    subagent = "agent-b " + XSS
    _agent_call(gateway, session, "plan the whole change")
    _agent_call(gateway, session, "explore", **{"X-Claude-Code-Agent-Id": "agent-a"})
    _agent_call(gateway, session, "explore more of it", **{"X-Claude-Code-Agent-Id": "agent-a"})
    _agent_call(
        gateway, session, "review it all for me please", **{"X-Claude-Code-Agent-Id": subagent}
    )
    agents = _agents_of(gateway, session, 4)
    visit(page, gateway.url + f"/ui/sessions/{session}")
    assert page.evaluate("window.__xss") is None
    # A nested list: the main agent, and under it its two subagents.
    main = page.locator("#agents > li")
    assert main.count() == 1
    assert page.locator("#agents > li > ul > li").count() == 2
    rows = [main.locator(":scope > .agent"), *page.locator("#agents > li > ul > li > .agent").all()]
    for row, agent, name in zip(rows, agents, ("Main agent", "agent-a", subagent), strict=True):
        text = row.inner_text()
        usage, calls = agent["usage"], agent["calls"]
        assert name in text  # the id shown as text, the payload inert
        assert (
            f"{calls} {'call' if calls == 1 else 'calls'} · {usage['input_tokens']} tokens in"
            f" · {usage['output_tokens']} out · ${agent['cost_usd']:.4f}"
        ) in text
    # Each with its own figures: no two agents' rows say the same.
    assert len({row.locator(".usage").inner_text() for row in rows}) == 3
    assert page.locator(".agent img").count() == 0
    shoot(page, "session-agents")

    # Hostile headers (an unknown parent, a cycle) do not break the page: every agent
    # shows once, those whose parent is not above them under the main agent.
    hostile = "ui-agents-hostile"
    _agent_call(
        gateway,
        hostile,
        "one",
        **{"X-Claude-Code-Agent-Id": "orphan", "X-Claude-Code-Parent-Agent-Id": "ghost"},
    )
    _agent_call(
        gateway,
        hostile,
        "two",
        **{"X-Claude-Code-Agent-Id": "d", "X-Claude-Code-Parent-Agent-Id": "e"},
    )
    _agent_call(
        gateway,
        hostile,
        "three",
        **{"X-Claude-Code-Agent-Id": "e", "X-Claude-Code-Parent-Agent-Id": "d"},
    )
    tree = _agents_of(gateway, hostile, 3)
    visit(page, gateway.url + f"/ui/sessions/{hostile}")
    assert [a["agent_id"] for a in tree] == ["", "orphan", "d", "e"]
    assert page.locator("#agents li").count() == 4
    under_main = page.locator("#agents > li > ul > li")
    assert [li.get_attribute("data-agent") for li in under_main.all()] == ["orphan", "d"]
    assert page.locator("#agents li[data-agent=d] > ul > li[data-agent=e]").count() == 1
    assert "ghost" in page.locator("#agents li[data-agent=orphan] > .agent").inner_text()


def test_member_mints_a_token_shown_once_and_revokes_it(
    member_page: Page, gateway: GatewayProcess
) -> None:
    page = member_page
    visit(page, gateway.url + "/ui/me")
    page.fill("form[action='/ui/me/tokens'] input[name=name]", "ui-minted")
    page.click("form[action='/ui/me/tokens'] button[type=submit]")
    page.wait_for_selector("#token-value")
    record(page)
    token = page.inner_text("#token-value").strip()
    assert token.startswith("tvg_")
    models = httpx2.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {token}"})
    assert models.status_code == 200
    # Shown once: the next visit has only its prefix.
    html = visit(page, gateway.url + "/ui/me")
    assert token not in html
    row = page.locator("tr", has_text="ui-minted")
    row.locator("button:has-text('Revoke')").click()
    page.wait_for_url(re.compile(r".*ok=token-revoked"))
    record(page)
    refused = httpx2.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {token}"})
    assert refused.status_code == 401


def test_member_cannot_open_admin_pages(member_page: Page, gateway: GatewayProcess) -> None:
    page = member_page
    nav = page.inner_text("header nav")
    assert "Keys" not in nav and "Audit" not in nav
    for path in (
        "/ui/keys",
        "/ui/routes",
        "/ui/users",
        "/ui/policy",
        "/ui/audit",
        "/ui/governance",
        f"/ui/users/{ADMIN}",
        "/ui/keys/fake-anthropic",
    ):
        visit(page, gateway.url + path, status=403)
    shoot(page, "forbidden")


def test_form_without_xsrf_token_is_refused(admin_page: Page, gateway: GatewayProcess) -> None:
    # The signed-in admin's own browser, posting a form from which the token was removed.
    page = admin_page
    visit(page, gateway.url + "/ui/policy")
    page.evaluate("document.querySelector('#policy input[name=_xsrf]').remove()")
    with page.expect_navigation() as navigation:
        page.click("#policy button[type=submit]")
    response = navigation.value
    assert response is not None and response.status == 403
    record(page)
    # And with the token, the same form saves.
    visit(page, gateway.url + "/ui/policy")
    page.click("#policy button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/policy\?ok=saved"))
    record(page)


def test_admin_turns_the_subscription_passthrough_on_in_the_policy_page(
    admin_page: Page, gateway: GatewayProcess
) -> None:
    page = admin_page
    visit(page, gateway.url + "/ui/policy")
    box = page.locator("#policy input[name=subscription_passthrough]")
    assert not box.is_checked()
    box.check()
    page.click("#policy button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/policy\?ok=saved"))
    record(page)
    try:
        assert page.locator("#policy input[name=subscription_passthrough]").is_checked()
        with httpx2.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.tokens[ADMIN]}"}
        ) as api:
            assert api.get("/api/v1/policy").json()["subscription_passthrough"] is True
            # Unticked and saved: off again.
            page.locator("#policy input[name=subscription_passthrough]").uncheck()
            page.click("#policy button[type=submit]")
            page.wait_for_url(re.compile(r".*/ui/policy\?ok=saved"))
            assert api.get("/api/v1/policy").json()["subscription_passthrough"] is False
    finally:
        gateway.cli("policy", "set", "--org", "acme", "--subscription-passthrough", "off")
    visit(page, gateway.url + "/ui/users")
    assert "Subscription calls" in page.inner_text("table thead")


def test_admin_pages_render_at_both_widths(admin_page: Page, gateway: GatewayProcess) -> None:
    page = admin_page
    for name, path in (
        ("overview", "/ui/"),
        ("overview-30d", "/ui/?range=30d"),
        ("users", "/ui/users"),
        ("user", f"/ui/users/{MEMBER}"),
        ("policy", "/ui/policy"),
        ("audit", "/ui/audit"),
        ("admin-me", "/ui/me"),
        ("admin-traces", "/ui/traces"),
    ):
        visit(page, gateway.url + path)
        shoot(page, name)
    html = visit(page, gateway.url + "/ui/audit")
    assert "add key" in html and "ui-anthropic" in html
    visit(page, gateway.url + "/ui/login")  # signed in: redirected to the overview
    shoot(page, "login-redirect")


def test_sign_in_page(browser: Browser, gateway: GatewayProcess) -> None:
    context = browser.new_context()
    page = context.new_page()
    visit(page, gateway.url + "/ui/login")
    shoot(page, "login")
    visit(page, gateway.url + "/ui/keys")  # not signed in: to the sign-in page
    assert "/ui/login" in page.url
    context.close()


def test_no_page_ever_showed_a_secret() -> None:
    assert len(SEEN) > 20
    for url, html in SEEN:
        for secret in (ANTHROPIC_SECRET, OPENAI_SECRET):
            assert secret not in html, f"a provider key's secret is in {url}"
