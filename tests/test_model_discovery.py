"""``GET /v1/models`` as Claude Code's gateway model discovery and the SDKs read it (issue
21.4): Anthropic's format paged as Anthropic's API pages it (``limit``, ``after_id``,
``before_id``, ``has_more``, ``first_id``, ``last_id``; a bad value a 400 in Anthropic's
envelope), every route the caller may use, on every path a base URL may lead to, never a
redirect; and real Claude Code with ``CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1``
asking for it and keeping the routes named like Claude models."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from tests.clients import Setup, claude_result, run_claude
from tests.conftest import OPENAI_SECRET, GatewayProcess, add_test_key
from tests.fake_provider import FakeProvider
from tests.harness import beside
from tvgate import services
from tvgate.models import database

#: The org's routes a member may call by name, in name order (a pattern is not listed).
CLAUDE_ROUTES = [f"claude-r{i:02d}" for i in range(25)] + ["Team-Anthropic-Opus"]
OTHER_ROUTES = ["gpt-x", "team-haiku"]
LISTED = sorted(CLAUDE_ROUTES + OTHER_ROUTES)


@pytest.fixture(scope="module")
def member(gateway: GatewayProcess, fake_provider: FakeProvider) -> str:
    """A member's token in an org of its own, with 28 routes by name and a pattern."""
    gateway.bind()
    org = "models-" + uuid.uuid4().hex[:6]
    email = f"dev@{org}.test"
    services.add_user(email, org)
    token, _ = services.issue_token(email, org)
    add_test_key("anthropic", org, fake_provider.url)
    add_test_key("openai", org, fake_provider.openai_url, OPENAI_SECRET, provider="openai")
    for name in [*CLAUDE_ROUTES, "team-haiku", "claude-haiku-*"]:
        services.add_route(name, "anthropic", org_name=org)
    # An OpenAI route: listed to Anthropic clients too, since translation serves it.
    services.add_route("gpt-x", "openai", org_name=org)
    database.close()
    return token


def _get(gateway: GatewayProcess, token: str, path: str) -> httpx2.Response:
    """``path`` as Claude Code's discovery sends it: one credential, Anthropic's version."""
    headers = {"Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}
    return httpx2.get(gateway.url + path, headers=headers, follow_redirects=False, timeout=10)


def test_the_sdk_pages_through_every_route(gateway: GatewayProcess, member: str) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key=member, max_retries=0)
    page = client.models.list(limit=7)
    assert [m.id for m in page.data] == LISTED[:7]
    assert (page.has_more, page.first_id, page.last_id) == (True, LISTED[0], LISTED[6])
    # The SDK follows last_id as after_id until has_more is false: 4 pages.
    assert [m.id for m in page] == LISTED
    pages = [page]
    while pages[-1].has_next_page():
        pages.append(pages[-1].get_next_page())
    assert [len(p.data) for p in pages] == [7, 7, 7, 7]
    assert pages[-1].has_more is False and pages[-1].last_id == LISTED[-1]
    assert all(m.type == "model" and m.display_name == m.id for m in page)
    # Without a limit, Anthropic's default of 20.
    first = client.models.list()
    assert len(first.data) == 20 and first.has_more
    # Backwards: the page right before an id.
    before = client.models.list(before_id=LISTED[10], limit=3)
    assert ([m.id for m in before.data], before.has_more) == (LISTED[7:10], True)
    start = client.models.list(before_id=LISTED[2], limit=5)
    assert ([m.id for m in start.data], start.has_more) == (LISTED[:2], False)
    # A cursor is compared by name: one that is no route's still leads on.
    after = client.models.list(after_id="claude-r10x", limit=2)
    assert [m.id for m in after.data] == ["claude-r11", "claude-r12"]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.models.list(limit=0)
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "limit: must be an integer from 1 to 1000",
        },
    }


@pytest.mark.parametrize("prefix", ["", "/anthropic", "/proxy/anthropic"])
def test_discovery_request_gets_every_route_on_every_base_path(
    gateway: GatewayProcess, member: str, prefix: str
) -> None:
    response = _get(gateway, member, prefix + "/v1/models?limit=1000")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    listing = response.json()
    assert [m["id"] for m in listing["data"]] == LISTED
    assert (listing["has_more"], listing["first_id"], listing["last_id"]) == (
        False,
        LISTED[0],
        LISTED[-1],
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: must be an integer from 1 to 1000"),
        ("limit=1001", "limit: must be an integer from 1 to 1000"),
        ("limit=-1", "limit: must be an integer from 1 to 1000"),
        ("limit=ten", "limit: must be an integer from 1 to 1000"),
        ("limit=", "limit: must be an integer from 1 to 1000"),
        ("after_id=a&before_id=b", "after_id and before_id cannot both be given"),
        ("after_id=", "after_id: must be a model id of 1 to 200 characters"),
        ("before_id=" + "x" * 201, "before_id: must be a model id of 1 to 200 characters"),
    ],
)
def test_bad_page_values_are_a_400_in_anthropics_envelope(
    gateway: GatewayProcess, member: str, query: str, message: str
) -> None:
    response = _get(gateway, member, "/v1/models?" + query)
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }


def test_openai_format_lists_every_route_in_one_list(gateway: GatewayProcess, member: str) -> None:
    client = openai.OpenAI(base_url=gateway.openai_url, api_key=member, max_retries=0)
    page = client.models.list()
    assert [m.id for m in page.data] == LISTED


@pytest.fixture(scope="module")
def chatty(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """A gateway over the suite's database that logs at debug (the model lists it gives)."""
    with beside(gateway, TVGATE_LOG_LEVEL="debug") as gw:
        yield gw


def test_claude_code_discovers_the_routes_named_like_claude(
    chatty: GatewayProcess, member: str, tmp_path: Path
) -> None:
    setup = Setup(
        chatty.url,
        member,
        "claude-r03",
        tmp_path,
        env={"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"},
    )
    run = run_claude(setup, "Say hello.")
    assert run.returncode == 0, run.describe()
    assert claude_result(run)["subtype"] == "success", run.describe()
    # The gateway got Claude Code's discovery call and answered it with every route.
    log = chatty.log_text()
    listed = f"(claude-code, anthropic format, limit 1000): {len(LISTED)} routes: "
    assert listed + ", ".join(LISTED) in log, log
    # Claude Code kept those named like Claude models (claude…, anthropic…, any case),
    # which its /model picker offers.
    (cache,) = setup.home.rglob("gateway-models.json")
    kept = json.loads(cache.read_text())
    assert kept["baseUrl"] == chatty.url
    assert [m["id"] for m in kept["models"]] == sorted(CLAUDE_ROUTES)
