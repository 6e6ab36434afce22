"""Key services: who may list, rotate, disable, delete; and the plaintext leaving memory.

These use the local keyring (the vault one has its own tests): what is under
test here is authorization, the conditional updates, and that a key changed in
this process is dropped from the gateway's plaintext cache at once, while a key
changed by another process is dropped when the route snapshot no longer carries
its ciphertext.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from tests.conftest import own_openai_key
from tvgate import services
from tvgate.config import load_settings
from tvgate.gateway import Gateway
from tvgate.identity import Principal
from tvgate.keyring import KeyContext, PlaintextCache
from tvgate.keyring.local import LocalKeyring
from tvgate.models import ProviderKey, Route, User, database

KEYRING = LocalKeyring(b"s" * 32)
SECRET = "sk-services-" + "a" * 24


def principal(email: str) -> Principal:
    user = User.get(User.email == email)
    return Principal(user.id, user.org_id, user.org.name, user.email, user.role)


def own_key(name: str, owner_email: str, secret: str) -> ProviderKey:
    return own_openai_key(KEYRING, name, User.get(User.email == owner_email), secret)


@pytest.fixture
def people(db: None) -> dict[str, Principal]:
    services.add_user("admin@a.test", "org-a", admin=True)
    services.add_user("dev@a.test", "org-a")
    services.add_user("other@a.test", "org-a")
    services.add_user("admin@b.test", "org-b", admin=True)
    services.add_key("shared", "anthropic", SECRET, KEYRING, org_name="org-a")
    services.add_key("b-key", "anthropic", SECRET + "b", KEYRING, org_name="org-b")
    services.add_route("claude", "shared", org_name="org-a")
    own_key("dev-own", "dev@a.test", SECRET + "dev")
    return {
        email: principal(email)
        for email in ("admin@a.test", "dev@a.test", "other@a.test", "admin@b.test")
    }


def test_who_sees_which_keys(people: dict[str, Principal]) -> None:
    admin, dev, other = people["admin@a.test"], people["dev@a.test"], people["other@a.test"]
    assert [v.name for v in services.list_keys(actor=admin)] == ["dev-own", "shared"]
    assert [v.name for v in services.list_keys(actor=dev)] == ["dev-own"]
    assert services.list_keys(actor=other) == []
    assert [v.name for v in services.list_keys("org-b")] == ["b-key"]  # the operator
    with pytest.raises(services.NotFound):
        services.list_keys("org-b", actor=admin)
    shown = services.list_keys(actor=admin)[1].as_dict()
    assert shown["fingerprint"] == "…" + SECRET[-4:] and SECRET not in repr(shown)


def test_who_may_change_which_key(people: dict[str, Principal]) -> None:
    admin, dev, other = people["admin@a.test"], people["dev@a.test"], people["other@a.test"]
    admin_b = people["admin@b.test"]
    # Org keys: admins of that org only.
    for actor, error in ((dev, services.Forbidden), (admin_b, services.NotFound)):
        with pytest.raises(error):
            services.rotate_key("shared", "sk-x-123456789", KEYRING, org_name="org-a", actor=actor)
        with pytest.raises(error):
            services.set_key_disabled("shared", True, org_name="org-a", actor=actor)
        with pytest.raises(error):
            services.delete_key("shared", org_name="org-a", force=True, actor=actor)
    # A member's own key: the member; another member does not even see it.
    view = services.rotate_key("dev-own", "sk-dev-rotated-5678", KEYRING, actor=dev)
    assert view.fingerprint == "5678"
    with pytest.raises(services.NotFound):
        services.set_key_disabled("dev-own", True, actor=other)
    # The admin may switch it off or remove it, but not put a secret of their own in it.
    with pytest.raises(services.Forbidden):
        services.rotate_key("dev-own", "sk-admins-choice-0000", KEYRING, actor=admin)
    assert services.set_key_disabled("dev-own", True, actor=admin).disabled
    assert not services.set_key_disabled("dev-own", False, actor=dev).disabled
    # Bad secrets are refused before anything is stored.
    with pytest.raises(services.ServiceError):
        services.rotate_key("shared", "two words", KEYRING, actor=admin)
    row = ProviderKey.get(ProviderKey.name == "shared")
    assert KEYRING.decrypt(row.ciphertext, KeyContext(row.org_id, row.id, None)) == SECRET


def test_rotate_keeps_the_row_and_its_routes(people: dict[str, Principal]) -> None:
    before = ProviderKey.get(ProviderKey.name == "shared")
    view = services.rotate_key("shared", "sk-new-secret-9999", KEYRING, org_name="org-a")
    after = ProviderKey.get_by_id(before.id)
    assert view.id == before.id and view.fingerprint == "9999"
    assert after.ciphertext != before.ciphertext and after.updated_at >= before.updated_at
    context = KeyContext(after.org_id, after.id, None)
    assert KEYRING.decrypt(after.ciphertext, context) == "sk-new-secret-9999"
    # The old ciphertext still decrypts: requests that loaded it finish with it.
    assert KEYRING.decrypt(before.ciphertext, context) == SECRET
    assert Route.get(Route.name == "claude").key_id == before.id


def test_delete_refuses_a_key_in_use_unless_forced(people: dict[str, Principal]) -> None:
    admin = people["admin@a.test"]
    with pytest.raises(services.ServiceError) as refused:
        services.delete_key("shared", actor=admin)
    assert refused.value.status == 409 and "claude" in str(refused.value)
    assert services.delete_key("dev-own", actor=people["dev@a.test"]) == []
    assert services.delete_key("shared", force=True, actor=admin) == ["claude"]
    assert not ProviderKey.select().where(ProviderKey.org == admin.org_id).exists()
    assert not Route.select().exists()
    with pytest.raises(services.NotFound):
        services.delete_key("shared", actor=admin)


# --- the gateway's plaintext cache ---


async def test_cache_is_keyed_by_ciphertext_and_swept() -> None:
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(2)
    cache = PlaintextCache(KEYRING, executor, ttl=60)
    now = [100.0]
    cache.clock = lambda: now[0]
    context = KeyContext(1, 5, None)
    old, new = KEYRING.encrypt("sk-old-1111", context), KEYRING.encrypt("sk-new-2222", context)
    assert await cache.get(old, context) == "sk-old-1111"
    assert await cache.get(new, context) == "sk-new-2222"
    # Both live side by side: a request on the old snapshot still gets the old secret.
    assert await cache.get(old, context) == "sk-old-1111"
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    cache.forget_version(5, old)
    assert len(cache) == 1
    now[0] += 61
    assert cache.sweep() == 1 and len(cache) == 0
    await cache.get(new, context)
    cache.forget(5)
    assert len(cache) == 0
    executor.shutdown()


async def test_gateway_drops_a_changed_key_at_once(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "TVGATE_DATA_DIR": str(tmp_path),
            "TVGATE_MASTER_KEY": base64.b64encode(b"g" * 32).decode(),
            "TVGATE_CACHE_TTL": "0.2",
        },
    )
    gateway = Gateway.build(settings)
    gateway.start()
    try:

        def setup() -> tuple[int, int]:
            services.add_user("admin@g.test", "g", admin=True)
            view = services.add_key("k", "openai", SECRET, gateway.keyring, org_name="g")
            services.add_route("gpt", "k", org_name="g")
            return view.id, ProviderKey.get_by_id(view.id).org_id

        key_id, org_id = await gateway.runner.run(setup)

        async def load() -> str:
            snapshot = await gateway.router.snapshot(org_id)
            ref = snapshot.exact["gpt"][0].key
            return await gateway.keys.get(ref.ciphertext, KeyContext(ref.org_id, ref.id, None))

        assert await load() == SECRET and len(gateway.keys) == 1
        # Changed through the services in this process (as the API will): gone at once.
        await gateway.runner.run(
            lambda: services.rotate_key("k", "sk-rotated-3333", gateway.keyring, org_name="g")
        )
        assert len(gateway.keys) == 0
        assert await load() == "sk-rotated-3333"
        await gateway.runner.run(lambda: services.set_key_disabled("k", True, org_name="g"))
        assert len(gateway.keys) == 0
        assert "gpt" not in (await gateway.router.snapshot(org_id)).exact
        await gateway.runner.run(lambda: services.set_key_disabled("k", False, org_name="g"))
        assert await load() == "sk-rotated-3333"

        # Changed by another process (a plain UPDATE here): gone once the snapshot refresh
        # no longer carries that ciphertext.
        cached = next(iter(gateway.keys._entries))
        keyring = gateway.keyring

        def elsewhere() -> None:
            fresh = keyring.encrypt("sk-elsewhere-4444", KeyContext(org_id, key_id, None))
            ProviderKey.update(ciphertext=fresh).where(ProviderKey.id == key_id).execute()

        await gateway.runner.run(elsewhere)
        for _ in range(200):
            if cached not in gateway.keys._entries:
                break
            await asyncio.sleep(0.05)
        assert cached not in gateway.keys._entries
        assert await load() == "sk-elsewhere-4444"

        await gateway.runner.run(lambda: services.delete_key("k", org_name="g", force=True))
        assert len(gateway.keys) == 0
    finally:
        gateway.stop()
        database.close()
