"""Issue 16.7, 16.11, 16.13 against real gateways: prices per org, base URLs, upstream addresses.

16.7: one org's admin set the price every org was charged (and 0 switched off every
dollar budget). Prices are now per org over a gateway-wide default table that only the
operator (CLI) changes. 16.11: base URLs with a query or a fragment let a member reach
any path of a private upstream; members' own keys have a switch of their own. 16.13: the
address check let NAT64, 6to4, translated and IPv4-compatible forms of private IPv4
addresses through.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import orjson
import pytest

from tests.conftest import (
    ANTHROPIC_SECRET,
    GatewayProcess,
    add_test_key,
    beside,
    free_port,
    launch_gateway,
    stop_gateway,
)
from tests.fake_provider import FakeProvider
from tests.harness import PRIVATE_UPSTREAMS_OFF
from tvgate import services
from tvgate.models import ProviderKey, Trace, database
from tvgate.proxy.upstream import is_public_address

OPERATOR = "operator (command line)"
#: The operator's default price of the test models (input, output per million tokens).
DEFAULT = (3.0, 15.0)


@dataclass
class PriceOrg:
    name: str
    #: Tokens by role: admin, dev (a member), auditor.
    tokens: dict[str, str]


@dataclass
class Priced:
    orgs: dict[str, PriceOrg]
    #: Unique model names: "attacked" (another org's admin set it to 0), "override"
    #: (an org's own price), "budgeted" (behind a dollar budget), "cli" (set by the CLI),
    #: "ui" (set on the Policy page).
    models: dict[str, str]
    #: The other org's admin's PUT of the "attacked" model, made before ``gateway`` started.
    attack: httpx2.Response
    attack_with_org: httpx2.Response
    gateway: GatewayProcess


def _org(fake: FakeProvider, models: dict[str, str]) -> PriceOrg:
    name = "p-" + uuid.uuid4().hex[:6]
    services.add_user(f"admin@{name}.test", name, admin=True)
    services.add_user(f"dev@{name}.test", name)
    services.add_user(f"auditor@{name}.test", name)
    services.update_user(f"auditor@{name}.test", role="auditor", org_name=name)
    add_test_key("p-key", name, fake.url)
    for route, model in models.items():
        services.add_route(route, "p-key", model=model, org_name=name)
    tokens = {
        who: services.issue_token(f"{who}@{name}.test", name)[0]
        for who in ("admin", "dev", "auditor")
    }
    return PriceOrg(name, tokens)


def api(gateway: GatewayProcess, token: str) -> httpx2.Client:
    return httpx2.Client(
        base_url=gateway.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


@pytest.fixture(scope="module")
def priced(gateway: GatewayProcess, fake_provider: FakeProvider) -> Iterator[Priced]:
    """Orgs "a" and "b"; the default prices set by the operator; then org b's admin's attack
    on the shared gateway; then a gateway of this module, which prices what it sees after."""
    tag = uuid.uuid4().hex[:8]
    models = {
        kind: f"pm-{tag}-{kind}" for kind in ("attacked", "override", "budgeted", "cli", "ui")
    }
    gateway.bind()
    for model in models.values():
        services.set_price(model, {"input_per_mtok": DEFAULT[0], "output_per_mtok": DEFAULT[1]})
    orgs = {"a": _org(fake_provider, models), "b": _org(fake_provider, models)}
    services.set_budget(
        orgs["a"].name, scope="route", subject="budgeted", metric="usd", period="day", amount=1e-7
    )
    database.close()
    with api(gateway, orgs["b"].tokens["admin"]) as client:
        zero = {"input_per_mtok": 0, "output_per_mtok": 0}
        attack = client.put(f"/prices/{models['attacked']}", json=zero)
        client.put(f"/prices/{models['budgeted']}", json=zero)
        attack_with_org = client.put(
            f"/prices/{models['override']}", json={**zero, "org": orgs["a"].name}
        )
    own = launch_gateway(gateway.database_url, gateway.data_dir, gateway.tokens)
    yield Priced(orgs, models, attack, attack_with_org, own)
    stop_gateway(own.proc)


def call(gateway: GatewayProcess, token: str, route: str) -> httpx2.Response:
    return httpx2.post(
        gateway.url + "/v1/messages",
        content=orjson.dumps(
            {"model": route, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        ),
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        timeout=30,
    )


def priced_trace(gateway: GatewayProcess, token: str, route: str) -> Trace:
    session = uuid.uuid4().hex
    response = httpx2.post(
        gateway.url + "/v1/messages",
        content=orjson.dumps(
            {"model": route, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        ),
        headers={
            "x-api-key": token,
            "anthropic-version": "2023-06-01",
            "x-claude-code-session-id": session,
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    (trace,) = gateway.wait_traces(1, session_id=session)
    assert trace.input_tokens > 0 and trace.output_tokens > 0
    return trace


def cost_at(trace: Trace, price: tuple[float, float]) -> float:
    return (trace.input_tokens * price[0] + trace.output_tokens * price[1]) / 1_000_000


def trace_priced_at(
    gateway: GatewayProcess, token: str, route: str, price: tuple[float, float]
) -> Trace:
    """A trace priced at ``price``: prices changed through the API are in force once the
    gateway's price cache has been refreshed (cache_ttl), so ask until one is."""
    for _ in range(60):
        trace = priced_trace(gateway, token, route)
        if trace.cost_usd == pytest.approx(cost_at(trace, price)):
            return trace
        time.sleep(0.2)
    raise AssertionError(f"{route}: cost {trace.cost_usd}, expected {cost_at(trace, price)}")


def audit_events(gateway: GatewayProcess, token: str) -> list[dict[str, object]]:
    with api(gateway, token) as client:
        response = client.get("/audit", params={"limit": 500})
    assert response.status_code == 200, response.text
    events: list[dict[str, object]] = response.json()["events"]
    return events


def listed_price(gateway: GatewayProcess, token: str, model: str) -> dict[str, object]:
    with api(gateway, token) as client:
        response = client.get("/prices")
    assert response.status_code == 200, response.text
    (found,) = [p for p in response.json()["prices"] if p["model"] == model]
    return dict(found)


# --- 16.7: prices per org ---


def test_another_orgs_admin_cannot_change_this_orgs_prices(priced: Priced) -> None:
    a, b = priced.orgs["a"], priced.orgs["b"]
    model = priced.models["attacked"]
    gw = priced.gateway
    # Org b's admin set org b's price, and only org b's.
    assert priced.attack.status_code == 200, priced.attack.text
    assert listed_price(gw, b.tokens["admin"], model)["input_per_mtok"] == 0
    assert listed_price(gw, a.tokens["admin"], model)["input_per_mtok"] == DEFAULT[0]
    a_trace = priced_trace(gw, a.tokens["dev"], "attacked")
    assert a_trace.cost_usd == pytest.approx(cost_at(a_trace, DEFAULT))
    assert a_trace.cost_usd > 0
    b_trace = priced_trace(gw, b.tokens["dev"], "attacked")
    assert b_trace.cost_usd == 0
    # Naming another org is refused, in the API's own envelope.
    assert priced.attack_with_org.status_code == 400, priced.attack_with_org.text
    assert "org" in priced.attack_with_org.json()["error"]["message"]
    assert listed_price(gw, a.tokens["admin"], priced.models["override"])["input_per_mtok"] == 3.0
    # The change is audited in org b, the org it affects; org a's log has nothing of it.
    b_events = [e for e in audit_events(gw, b.tokens["admin"]) if e["target"] == model]
    assert [(e["action"], e["actor"], e["allowed"]) for e in b_events] == [
        ("set price", f"admin@{b.name}.test", True)
    ]
    assert not [e for e in audit_events(gw, a.tokens["admin"]) if e["target"] == model]


def test_another_orgs_zero_price_does_not_switch_off_this_orgs_dollar_budget(
    priced: Priced,
) -> None:
    """Org b priced the model at 0; org a's dollar budget on it still counts dollars."""
    a = priced.orgs["a"]
    gw = priced.gateway
    statuses = []
    for _ in range(60):
        response = call(gw, a.tokens["dev"], "budgeted")
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
        time.sleep(0.2)
    assert statuses[-1] == 429, statuses
    assert "budget" in response.json()["error"]["message"]


def test_an_org_admins_price_prices_that_orgs_traces_only_and_is_audited_there(
    priced: Priced,
) -> None:
    a, b = priced.orgs["a"], priced.orgs["b"]
    model = priced.models["override"]
    gw = priced.gateway
    with api(gw, a.tokens["admin"]) as client:
        response = client.put(f"/prices/{model}", json={"input_per_mtok": 7, "output_per_mtok": 70})
    assert response.status_code == 200, response.text
    assert response.json()["org"] == a.name
    a_trace = trace_priced_at(gw, a.tokens["dev"], "override", (7.0, 70.0))
    assert a_trace.cost_usd > cost_at(a_trace, DEFAULT)
    # Org b, on the same model and after org a's price is in force, pays the default.
    b_trace = priced_trace(gw, b.tokens["dev"], "override")
    assert b_trace.cost_usd == pytest.approx(cost_at(b_trace, DEFAULT))
    assert listed_price(gw, b.tokens["admin"], model)["input_per_mtok"] == DEFAULT[0]
    (event,) = [e for e in audit_events(gw, a.tokens["admin"]) if e["target"] == model]
    assert (event["action"], event["actor"]) == ("set price", f"admin@{a.name}.test")
    assert not [e for e in audit_events(gw, b.tokens["admin"]) if e["target"] == model]


def test_an_org_admin_goes_back_to_the_default_and_no_other_org_can(priced: Priced) -> None:
    """After the test above: org a's own price of the "override" model is deleted."""
    a, b = priced.orgs["a"], priced.orgs["b"]
    model = priced.models["override"]
    gw = priced.gateway
    with api(gw, b.tokens["admin"]) as client:
        # Org b has no price of its own to delete; org a's is out of its reach.
        assert client.delete(f"/prices/{model}").status_code == 404
    with api(gw, a.tokens["dev"]) as client:
        assert client.delete(f"/prices/{model}").status_code == 403
    assert listed_price(gw, a.tokens["admin"], model)["org"] == a.name
    with api(gw, a.tokens["admin"]) as client:
        response = client.delete(f"/prices/{model}")
    assert response.status_code == 200, response.text
    listed = listed_price(gw, a.tokens["admin"], model)
    assert (listed["org"], listed["input_per_mtok"]) == (None, DEFAULT[0])
    trace_priced_at(gw, a.tokens["dev"], "override", DEFAULT)
    actions = [e["action"] for e in audit_events(gw, a.tokens["admin"]) if e["target"] == model]
    assert actions[0] == "delete price"


def test_an_org_admin_sets_the_orgs_price_on_the_policy_page(priced: Priced) -> None:
    a, b = priced.orgs["a"], priced.orgs["b"]
    model = priced.models["ui"]
    gw = priced.gateway
    with httpx2.Client(base_url=gw.url, follow_redirects=False, timeout=30) as browser:
        login = browser.get("/ui/login")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', login.text)
        assert xsrf is not None
        signed_in = browser.post(
            "/ui/login", data={"_xsrf": xsrf.group(1), "token": a.tokens["admin"]}
        )
        assert signed_in.status_code == 302, signed_in.text
        page = browser.get("/ui/policy")
        assert page.status_code == 200 and model in page.text
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        assert xsrf is not None
        saved = browser.post(
            "/ui/prices",
            data={
                "_xsrf": xsrf.group(1),
                "model": model,
                "input_per_mtok": "11",
                "output_per_mtok": "22",
            },
        )
        assert saved.status_code in (302, 303), saved.text
        row = re.search(
            rf"<tr><td>{re.escape(model)}</td><td>([^<]+)</td>", browser.get("/ui/policy").text
        )
        assert row is not None and row.group(1) == "this org"
    assert listed_price(gw, a.tokens["admin"], model)["input_per_mtok"] == 11.0
    assert listed_price(gw, b.tokens["admin"], model)["input_per_mtok"] == DEFAULT[0]
    trace_priced_at(gw, a.tokens["dev"], "ui", (11.0, 22.0))
    (event,) = [e for e in audit_events(gw, a.tokens["admin"]) if e["target"] == model]
    assert (event["action"], event["actor"]) == ("set price", f"admin@{a.name}.test")


@pytest.mark.parametrize("who", ["dev", "auditor"])
def test_members_and_auditors_cannot_set_prices(priced: Priced, who: str) -> None:
    a = priced.orgs["a"]
    model = priced.models["cli"]
    with api(priced.gateway, a.tokens[who]) as client:
        response = client.put(f"/prices/{model}", json={"input_per_mtok": 0, "output_per_mtok": 0})
    assert response.status_code == 403, response.text
    assert listed_price(priced.gateway, a.tokens["admin"], model)["input_per_mtok"] == DEFAULT[0]
    refused = [e for e in audit_events(priced.gateway, a.tokens["admin"]) if e["target"] == model]
    assert any(e["actor"] == f"{who}@{a.name}.test" and not e["allowed"] for e in refused)


def test_the_operator_sets_the_default_table_and_org_prices_with_the_cli(priced: Priced) -> None:
    a, b = priced.orgs["a"], priced.orgs["b"]
    gw = priced.gateway
    model = priced.models["cli"]
    done = gw.cli("prices", "set", model, "--org", b.name, "--input", "1", "--output", "2")
    assert done.returncode == 0, done.stderr
    done = gw.cli("prices", "set", model, "--input", "4", "--output", "40")
    assert done.returncode == 0, done.stderr
    # The default changed for org a; org b keeps its own price.
    assert listed_price(gw, a.tokens["admin"], model)["input_per_mtok"] == 4.0
    assert listed_price(gw, b.tokens["admin"], model)["input_per_mtok"] == 1.0
    trace_priced_at(gw, a.tokens["dev"], "cli", (4.0, 40.0))
    trace_priced_at(gw, b.tokens["dev"], "cli", (1.0, 2.0))

    # The default table's change is audited in the org it affects (not in org b, which
    # has its own price), as the operator's.
    def operators(org: PriceOrg) -> list[object]:
        events = audit_events(gw, org.tokens["admin"])
        return [e["action"] for e in events if e["target"] == model and e["actor"] == OPERATOR]

    assert operators(a) == ["set default price"]
    assert operators(b) == ["set price"]
    # The CLI refuses what the API refuses.
    bad = gw.cli("prices", "set", model, "--input", "-1", "--output", "1")
    assert bad.returncode == 1 and "input_per_mtok must be" in bad.stderr
    listed = gw.cli("prices", "list", "--org", b.name, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [p for p in orjson.loads(listed.stdout) if p["model"] == model]
    assert (row["input_per_mtok"], row["org"]) == (1.0, b.name)


# --- 16.11: base URLs, and members' own keys ---


@pytest.fixture(scope="module")
def user_keys_org(gateway: GatewayProcess) -> PriceOrg:
    """An org whose members may add their own keys and routes."""
    gateway.bind()
    org = _org_without_routes()
    services.set_policy(org.name, allow_user_keys=True, allow_user_routes=True)
    database.close()
    return org


def _org_without_routes() -> PriceOrg:
    name = "u-" + uuid.uuid4().hex[:6]
    services.add_user(f"admin@{name}.test", name, admin=True)
    services.add_user(f"dev@{name}.test", name)
    tokens = {who: services.issue_token(f"{who}@{name}.test", name)[0] for who in ("admin", "dev")}
    return PriceOrg(name, tokens)


@pytest.fixture(scope="module")
def user_switch_off(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """Private upstreams allowed for the operator's and admins' keys, not for members' own."""
    with beside(
        gateway,
        TVGATE_ALLOW_PRIVATE_UPSTREAMS="true",
        TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS="false",
    ) as gw:
        yield gw


@pytest.fixture(scope="module")
def all_switches_off(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    with beside(gateway, **PRIVATE_UPSTREAMS_OFF, TVGATE_CONNECT_TIMEOUT="3") as gw:
        yield gw


def add_key(gw: GatewayProcess, token: str, name: str, base_url: str) -> httpx2.Response:
    with api(gw, token) as client:
        return client.post(
            "/keys",
            json={
                "name": name,
                "provider": "anthropic",
                "secret": ANTHROPIC_SECRET,
                "base_url": base_url,
            },
        )


def own_key_and_route(gw: GatewayProcess, token: str, name: str, base_url: str) -> int:
    """A member's own key ``name`` to ``base_url`` and their route of the same name to it,
    both added through the API; the key's id."""
    created = add_key(gw, token, name, base_url)
    assert created.status_code == 201, created.text
    with api(gw, token) as client:
        route = client.post("/routes", json={"name": name, "key": name})
    assert route.status_code == 201, route.text
    key_id: int = created.json()["id"]
    return key_id


@pytest.mark.parametrize("tail", ["/internal/secret#", "/internal/secret?x=", "/v1?"])
def test_a_base_url_with_a_query_or_fragment_is_refused(
    gateway: GatewayProcess,
    fake_provider: FakeProvider,
    user_keys_org: PriceOrg,
    tail: str,
) -> None:
    base_url = fake_provider.url + tail
    for who in ("admin", "dev"):
        name = "q-" + uuid.uuid4().hex[:6]
        response = add_key(gateway, user_keys_org.tokens[who], name, base_url)
        assert response.status_code == 400, response.text
        assert "query or fragment" in response.json()["error"]["message"]
    done = gateway.cli(
        "keys", "add", "q-cli", "--provider", "anthropic", "--org", user_keys_org.name,
        "--base-url", base_url, stdin=ANTHROPIC_SECRET,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert "query or fragment" in done.stderr
    with api(gateway, user_keys_org.tokens["admin"]) as client:
        names = [k["name"] for k in client.get("/keys").json()["keys"]]
    assert not [n for n in names if n.startswith("q-")]


def test_a_stored_base_url_with_a_fragment_is_refused_by_the_proxy(
    gateway: GatewayProcess, fake_provider: FakeProvider, user_keys_org: PriceOrg
) -> None:
    """A key stored before add_key refused them: the proxy does not call it."""
    dev = user_keys_org.tokens["dev"]
    key_id = own_key_and_route(gateway, dev, "own-old", fake_provider.url)
    gateway.bind()
    ProviderKey.update(base_url=fake_provider.url + "/internal/secret#").where(
        ProviderKey.id == key_id
    ).execute()
    database.close()
    before = len(fake_provider.requests)
    # The key is cached for up to cache_ttl (1 s here): ask until the stored URL is in force.
    for _ in range(50):
        response = call(gateway, dev, "own-old")
        if response.status_code != 200:
            break
        time.sleep(0.2)
        before = len(fake_provider.requests)
    assert response.status_code == 502, response.text
    assert "query or fragment" in response.json()["error"]["message"]
    assert len(fake_provider.requests) == before


def test_a_members_private_base_url_needs_the_user_switch(
    gateway: GatewayProcess,
    user_switch_off: GatewayProcess,
    fake_provider: FakeProvider,
    user_keys_org: PriceOrg,
) -> None:
    dev = user_keys_org.tokens["dev"]
    refused = add_key(user_switch_off, dev, "own-refused", fake_provider.url)
    assert refused.status_code == 400, refused.text
    assert "TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS" in refused.json()["error"]["message"]
    # The admin's org key on the same gateway: the operator's switch is on.
    admin = add_key(
        user_switch_off, user_keys_org.tokens["admin"], "org-private", fake_provider.url
    )
    assert admin.status_code == 201, admin.text
    # The shared gateway has both switches on (tests/conftest.py): the member may.
    accepted = add_key(gateway, dev, "own-private", fake_provider.url)
    assert accepted.status_code == 201, accepted.text


def test_a_members_private_key_is_refused_on_connection_with_the_user_switch_off(
    gateway: GatewayProcess,
    user_switch_off: GatewayProcess,
    fake_provider: FakeProvider,
    user_keys_org: PriceOrg,
) -> None:
    dev = user_keys_org.tokens["dev"]
    own_key_and_route(gateway, dev, "own-conn", fake_provider.url)
    assert call(gateway, dev, "own-conn").status_code == 200
    before = len(fake_provider.requests)
    refused = call(user_switch_off, dev, "own-conn")
    assert refused.status_code == 502, refused.text
    assert "not allowed" in refused.json()["error"]["message"]
    assert len(fake_provider.requests) == before


# --- 16.13: private IPv4 addresses inside IPv6 ones ---


@pytest.mark.parametrize(
    ("host", "public"),
    [
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("64:ff9b:1::808:808", False),  # local-use NAT64 (RFC 8215)
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("::ffff:0:7f00:1", False),  # IPv4-translated 127.0.0.1
        ("::ffff:0:a00:1", False),  # IPv4-translated 10.0.0.1
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("fec0::1", False),  # site-local
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("::808:808", False),  # IPv4-compatible: deprecated, never a public address
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("100::1", False),  # discard-only
        ("2606:4700::1111", True),
    ],
)
def test_private_ipv4_inside_ipv6_is_not_public(host: str, public: bool) -> None:
    assert is_public_address(host) is public


def test_a_base_url_on_an_embedded_private_address_is_refused(
    all_switches_off: GatewayProcess, user_keys_org: PriceOrg
) -> None:
    for host in ("[64:ff9b::7f00:1]", "[2002:a9fe:a9fe::1]", "[::7f00:1]", "[fec0::1]"):
        response = add_key(
            all_switches_off, user_keys_org.tokens["admin"], "e-key", f"https://{host}"
        )
        assert response.status_code == 400, f"{host}: {response.text}"
        assert "private address" in response.json()["error"]["message"]


def test_a_connection_to_an_embedded_loopback_address_is_refused(
    all_switches_off: GatewayProcess, user_keys_org: PriceOrg
) -> None:
    """A key stored earlier on such an address: curl's open-socket check refuses it."""
    all_switches_off.bind()
    add_test_key("nat64", user_keys_org.name, f"https://[64:ff9b::7f00:1]:{free_port()}")
    services.add_route("nat64", "nat64", org_name=user_keys_org.name)
    database.close()
    response = call(all_switches_off, user_keys_org.tokens["dev"], "nat64")
    assert response.status_code == 502, response.text
    assert "not a public address" in response.json()["error"]["message"]
