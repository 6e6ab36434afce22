"""A cloud key's settings after it is added, and the endpoints a key names, against a real
``tvgate serve`` with the fake Vertex AI, Azure OpenAI and Bedrock behind it.

* ``tvgate keys rotate NAME --region …`` (the secret on standard input) and
  ``PATCH /api/v1/keys/NAME`` with ``secret`` and ``settings`` change a key's region,
  project, api_version, role: checked by the key's cloud as when it was added, stored over
  the old ones (an empty value removes one), in force for the gateway's next calls. A
  member gets 403, another org's admin 404; a setting its cloud refuses is a 400 naming it.
* The URLs a key's secret is sent to besides its base URL (a service account's
  ``token_uri``, an Azure ``authority``, a Bedrock ``sts_endpoint``) pass the base URL's
  checks (``TVGATE_ALLOW_PRIVATE_UPSTREAMS``): a private one is a 400 naming the field, and
  a token endpoint is called under the provider calls' address rules.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from tests.conftest import ANTHROPIC_SECRET, GatewayProcess, add_test_key, launch_gateway
from tests.fake_azure import FakeAzure
from tests.fake_bedrock import FakeBedrock
from tests.fake_provider import FakeProvider
from tests.fake_vertex import FakeVertex
from tests.harness import PRIVATE_UPSTREAMS_OFF, beside
from tests.test_cloud_vertex import _xsrf, signed_in
from tests.test_vault_gateway import wait_for
from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.models import database

VERTEX_MODEL = "claude-sonnet-4-5@20250929"
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
ROLE = "arn:aws:iam::123456789012:role/tvgate-settings"


@dataclass
class Keys:
    gw: GatewayProcess
    org: str
    tokens: dict[str, str]
    vertex: FakeVertex
    azure: FakeAzure
    bedrock: FakeBedrock
    #: Each key's secret as given, by key name.
    secrets: dict[str, str]


@pytest.fixture(scope="module")
def keys(
    database_url: str, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keys]:
    vertex, azure = FakeVertex(), FakeAzure(set())
    vertex.start()
    azure.start()
    with FakeBedrock(fake_provider.url, ANTHROPIC_SECRET) as bedrock:
        open_database(database_url)
        migrate(database.obj)
        org = "ks-" + secrets.token_hex(3)
        tokens = {}
        for who, in_org, admin in (
            ("admin", org, True),
            ("member", org, False),
            ("stranger", org + "-other", True),
        ):
            services.add_user(f"{who}@{in_org}.test", in_org, admin=admin)
            tokens[who], _ = services.issue_token(f"{who}@{in_org}.test", in_org)
        api_key = secrets.token_hex(16)
        azure.api_keys.add(api_key)
        key_id, secret = bedrock.add_key()
        bedrock.roles[ROLE] = ""
        given = {
            "gcp": json.dumps(vertex.service_account("settings")),
            "az": json.dumps({"api_key": api_key}),
            "br": json.dumps({"access_key_id": key_id, "secret_access_key": secret}),
        }
        at_vertex = {"project": vertex.project, "region": vertex.region}
        for name, provider, base_url, settings, model in (
            ("gcp", "vertex", vertex.url, at_vertex, VERTEX_MODEL),
            ("az", "azure", azure.url, {"api_version": "2024-10-21"}, "gpt4o-prod"),
            ("br", "bedrock", bedrock.url, {"region": "us-east-1"}, BEDROCK_MODEL),
        ):
            add_test_key(name, org, base_url, given[name], provider=provider, settings=settings)
            services.add_route(name, name, model=model, org_name=org)
        # Google's endpoint (never called: the token endpoint comes first): the fake's
        # token endpoint, and an https one on 127.0.0.1 (a name that resolves there).
        internal = json.loads(given["gcp"])
        internal["token_uri"] = vertex.url.replace("http:", "https:") + "/token"
        for name, account in (("gcp-google", given["gcp"]), ("gcp-internal", json.dumps(internal))):
            add_test_key(
                name,
                org,
                "https://us-east5-aiplatform.googleapis.com",
                account,
                provider="vertex",
                settings={"project": vertex.project, "region": vertex.region},
            )
            services.add_route(name, name, model=VERTEX_MODEL, org_name=org)
        database.close()
        with launch_gateway(database_url, tmp_path_factory.mktemp("settings"), tokens) as gw:
            yield Keys(gw, org, tokens, vertex, azure, bedrock, given)
    vertex.stop()
    azure.stop()


def ask(keys: Keys, route: str, gw: GatewayProcess | None = None) -> httpx2.Response:
    """A member's call on ``route`` as its cloud's client makes it (OpenAI's API for Azure)."""
    url, token = (gw or keys.gw).url, keys.tokens["member"]
    if route == "az":
        return httpx2.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {token}"},
            json={"model": route, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
    return httpx2.post(
        url + "/v1/messages",
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        json={"model": route, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )


def rotate_by_cli(keys: Keys, name: str, *flags: str) -> Any:
    """``tvgate keys rotate NAME FLAGS --json`` with the key's secret on standard input."""
    return keys.gw.cli(
        *("keys", "rotate", name, "--org", keys.org, "--json", *flags),
        stdin=keys.secrets[name] + "\n",
    )


def patch(keys: Keys, name: str, body: dict[str, Any], who: str = "admin") -> httpx2.Response:
    return httpx2.patch(
        f"{keys.gw.url}/api/v1/keys/{name}",
        headers={"Authorization": f"Bearer {keys.tokens[who]}"},
        json=body,
        timeout=30,
    )


def test_a_vertex_keys_region_changes_by_cli_and_api(keys: Keys) -> None:
    assert ask(keys, "gcp").status_code == 200
    moved = rotate_by_cli(keys, "gcp", "--region", "europe-west1")
    assert moved.returncode == 0, moved.stderr
    view = json.loads(moved.stdout)
    assert view["settings"] == {"project": keys.vertex.project, "region": "europe-west1"}
    assert view["base_url"] == keys.vertex.url  # the admin's own base URL stays
    assert "private_key" not in moved.stdout + moved.stderr
    # In force in the running gateway: the fake's endpoint serves us-east5 only.
    wait_for(lambda: ask(keys, "gcp").status_code == 400, "the new region in force")
    refused = ask(keys, "gcp").json()
    assert refused["type"] == "error"
    assert "Location europe-west1 is not served" in refused["error"]["message"]
    back = patch(keys, "gcp", {"secret": keys.secrets["gcp"], "settings": {"region": "us-east5"}})
    assert back.status_code == 200, back.text
    assert back.json()["settings"]["region"] == "us-east5"
    assert "private_key" not in back.text
    wait_for(lambda: ask(keys, "gcp").status_code == 200, "the old region again")


def test_a_bedrock_key_takes_a_role_and_drops_it(keys: Keys) -> None:
    before = keys.bedrock.assumed.count(ROLE)
    sts = keys.bedrock.url + "/sts/"
    changed = patch(
        keys,
        "br",
        {"secret": keys.secrets["br"], "settings": {"role_arn": ROLE, "sts_endpoint": sts}},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["settings"] == {
        "region": "us-east-1",
        "role_arn": ROLE,
        "sts_endpoint": sts,
    }
    wait_for(
        lambda: ask(keys, "br").status_code == 200 and keys.bedrock.assumed.count(ROLE) > before,
        "the role assumed for a call",
    )
    dropped = rotate_by_cli(keys, "br", "--role-arn", "", "--sts-endpoint", "")
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout)["settings"] == {"region": "us-east-1"}
    assert ask(keys, "br").status_code == 200


def test_an_azure_keys_api_version_changes(keys: Keys) -> None:
    changed = rotate_by_cli(keys, "az", "--api-version", "2025-04-01-preview")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["settings"]["api_version"] == "2025-04-01-preview"

    def sent_new_version() -> bool:
        seen = len(keys.azure.requests)
        return (
            ask(keys, "az").status_code == 200
            and "api-version=2025-04-01-preview" in keys.azure.requests[seen].query
        )

    wait_for(sent_new_version, "the new api-version sent")


def test_settings_are_checked_and_only_the_orgs_admin_changes_them(keys: Keys) -> None:
    secret = keys.secrets["gcp"]
    bad = patch(keys, "gcp", {"secret": secret, "settings": {"region": "Not a region!"}})
    assert bad.status_code == 400 and "region" in bad.json()["error"]["message"]
    unknown = patch(keys, "gcp", {"secret": secret, "settings": {"colour": "blue"}})
    assert unknown.status_code == 400 and "colour" in unknown.json()["error"]["message"]
    bare = patch(keys, "gcp", {"settings": {"region": "us-east5"}})
    assert bare.status_code == 400 and "secret" in bare.json()["error"]["message"]
    # An access key's role needs an access key: a Bedrock API key cannot assume one.
    role = patch(keys, "br", {"secret": '{"api_key": "ABSK-x"}', "settings": {"role_arn": ROLE}})
    assert role.status_code == 400 and "assumes a role" in role.json()["error"]["message"]
    assert patch(keys, "gcp", {"secret": secret, "settings": {}}, who="member").status_code == 403
    assert patch(keys, "gcp", {"secret": secret, "settings": {}}, who="stranger").status_code == 404
    for answer in (bad, unknown, bare, role):
        assert "private_key" not in answer.text
    assert ask(keys, "gcp").status_code == 200  # nothing was changed


def test_the_endpoints_a_key_names_are_checked_as_base_urls(keys: Keys) -> None:
    with beside(keys.gw, **PRIVATE_UPSTREAMS_OFF) as strict:
        api = httpx2.Client(
            base_url=strict.url, headers={"Authorization": f"Bearer {keys.tokens['admin']}"}
        )
        account = keys.vertex.service_account("internal")
        account["token_uri"] = "http://10.20.30.40/token"
        access_key = {"access_key_id": "AKIAX", "secret_access_key": "s"}
        role = {"region": "us-east-1", "role_arn": ROLE, "sts_endpoint": "https://127.0.0.1/sts/"}
        place = {"project": "p-1", "region": "us-east5"}
        metadata = {"authority": "http://169.254.169.254"}
        for name, provider, secret, settings, field in (
            ("v-internal", "vertex", account, place, "token_uri"),
            ("a-internal", "azure", {"api_key": "k" * 32}, metadata, "authority"),
            ("b-internal", "bedrock", access_key, role, "sts_endpoint"),
        ):
            body = {
                "name": name,
                "provider": provider,
                "secret": json.dumps(secret),
                "settings": settings,
                "base_url": "https://example.openai.azure.com",
            }
            refused = api.post("/api/v1/keys", json=body)
            assert refused.status_code == 400, refused.text
            message = refused.json()["error"]["message"]
            assert f"{field} points at a private address" in message or (
                f"{field} must be https" in message
            ), message
        changed = api.patch(
            "/api/v1/keys/br",
            json={
                "secret": keys.secrets["br"],
                "settings": {"role_arn": ROLE, "sts_endpoint": "https://127.0.0.1/sts/"},
            },
        )
        assert changed.status_code == 400 and "sts_endpoint" in changed.json()["error"]["message"]
        # A key stored while private upstreams were allowed: its token endpoint (the fake's,
        # http on 127.0.0.1) is refused when it is called, before any grant is sent.
        requests = len(keys.vertex.requests)
        called = ask(keys, "gcp-google", strict)
        assert called.status_code == 502, called.text
        message = called.json()["error"]["message"]
        assert "token endpoint" in message and "is not https, which is not allowed" in message
        called = ask(keys, "gcp-internal", strict)
        assert called.status_code == 502, called.text
        assert "upstream address 127.0.0.1 is not a public address" in called.text
        assert len(keys.vertex.requests) == requests


def test_the_key_page_changes_a_bedrock_keys_region(keys: Keys) -> None:
    with signed_in(keys.gw, keys.tokens["admin"]) as browser:
        page = browser.get("/ui/keys/br")
        # The form shows the key's settings (its region filled in), never its secret.
        assert 'name="region" value="us-east-1"' in page.text
        assert 'name="role_arn" value=""' in page.text
        assert keys.secrets["br"] not in page.text
        # The form as a browser sends it: every setting field, the empty ones too.
        form = dict.fromkeys(("role_arn", "external_id", "sts_endpoint"), "")
        form.update(
            _xsrf=_xsrf(page), action="rotate", secret=keys.secrets["br"], region="eu-west-1"
        )
        changed = browser.post("/ui/keys/br", data=form)
        assert changed.status_code in (302, 303), changed.text
        shown = browser.get("/ui/keys/br").text
        assert 'name="region" value="eu-west-1"' in shown
        # The fake Bedrock signs in us-east-1 only: the new region is in force.
        wait_for(lambda: ask(keys, "br").status_code != 200, "the new region in force")
        form = {**form, "_xsrf": _xsrf(browser.get("/ui/keys/br")), "region": "us-east-1"}
        assert browser.post("/ui/keys/br", data=form).status_code in (302, 303)
    wait_for(lambda: ask(keys, "br").status_code == 200, "the old region again")


def test_a_refused_change_changes_nothing(keys: Keys) -> None:
    """One PATCH with a new secret and region and a base URL that is refused: a 400, and the
    key's secret and settings are as they were (not rotated on the way to the refusal)."""

    def stored() -> dict[str, Any]:
        listed = httpx2.get(
            f"{keys.gw.url}/api/v1/keys",
            headers={"Authorization": f"Bearer {keys.tokens['admin']}"},
            timeout=30,
        )
        assert listed.status_code == 200, listed.text
        (key,) = [k for k in listed.json()["keys"] if k["name"] == "br"]
        return dict(key)

    before = stored()
    key_id, secret = keys.bedrock.add_key()
    new_secret = json.dumps({"access_key_id": key_id, "secret_access_key": secret})
    for refused_part in ({"base_url": "ftp://bedrock.example"}, {"max_concurrent": -1}):
        body = {"secret": new_secret, "settings": {"region": "eu-west-1"}, **refused_part}
        refused = patch(keys, "br", body)
        assert refused.status_code == 400, refused.text
        assert stored() == before
        # The refusal is in the audit log; the rotation it undid is not.
        events = httpx2.get(
            f"{keys.gw.url}/api/v1/audit",
            params={"limit": "1"},
            headers={"Authorization": f"Bearer {keys.tokens['admin']}"},
            timeout=30,
        ).json()["events"]
        assert [(e["action"], e["target"], e["allowed"]) for e in events] == [
            ("update key", "br", False)
        ]
        assert refused.json()["error"]["message"] in events[0]["change"]["refused"]
    assert ask(keys, "br").status_code == 200
