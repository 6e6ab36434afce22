"""Governance management services: budgets, rate limits, route fallbacks, key concurrency
caps. Who may set and read them, what is refused, and the usage read from the shared
counters the gateways flush (inserted here by hand), on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import orjson
import pytest

from tvgate import services
from tvgate.db import migrate, open_database
from tvgate.governance.windows import counter_key, window
from tvgate.identity import Principal
from tvgate.keyring.local import LocalKeyring
from tvgate.models import AuditEvent, Budget, Org, RateLimit, Route, UsageCounter, User, database

KEYRING = LocalKeyring(b"g" * 32)
SECRET = "sk-governance-" + "b" * 24
NOW = time.time()


def principal(email: str, org: str = "org-a") -> Principal:
    user = User.select().join(Org).where((User.email == email) & (Org.name == org)).get()
    return Principal(user.id, user.org_id, org, user.email, user.role)


@pytest.fixture
def people(fresh_database_url: str) -> Iterator[dict[str, Principal]]:
    """org-a: an admin, an auditor, two members; keys "shared" (everyone) and "granted"
    (nobody); routes of every scope. org-b: an admin."""
    open_database(fresh_database_url)
    migrate(database.obj)
    services.add_user("admin@a.test", "org-a", admin=True)
    services.add_user("audit@a.test", "org-a")
    services.update_user("audit@a.test", role="auditor", org_name="org-a")
    services.add_user("dev@a.test", "org-a")
    services.add_user("other@a.test", "org-a")
    services.add_user("admin@b.test", "org-b", admin=True)
    services.set_policy("org-a", allow_user_routes=True)
    services.add_key("shared", "anthropic", SECRET, KEYRING, org_name="org-a")
    services.add_key("granted", "anthropic", SECRET, KEYRING, org_name="org-a")
    services.set_key_availability("granted", False, "org-a")
    services.add_key("b-key", "anthropic", SECRET, KEYRING, org_name="org-b")
    services.add_route("claude", "shared", org_name="org-a")
    services.add_route("haiku", "shared", org_name="org-a")
    services.add_route("secret-route", "granted", org_name="org-a")
    services.add_route("for-other", "shared", org_name="org-a", for_user="other@a.test")
    services.add_route("b-route", "b-key", org_name="org-b")
    yield {
        "admin": principal("admin@a.test"),
        "auditor": principal("audit@a.test"),
        "dev": principal("dev@a.test"),
        "other": principal("other@a.test"),
        "admin_b": principal("admin@b.test", "org-b"),
    }
    database.close()


def count(org_id: int, counts: str, period: str, scope: str, subject: str, value: float) -> None:
    """What the gateways would have flushed to a shared counter for the current window."""
    start, end = window(period, NOW)
    UsageCounter.create(
        key=counter_key(org_id, counts, period, start, scope, subject),
        value=value,
        expires_at=end,
    )


def refusals(org: str) -> int:
    org_id = Org.get(Org.name == org).id
    return AuditEvent.select().where((AuditEvent.org_id == org_id) & ~AuditEvent.allowed).count()


def test_budgets_upsert_and_show_what_was_counted(people: dict[str, Principal]) -> None:
    admin = people["admin"]
    org_id = admin.org_id
    dev_id = str(people["dev"].user_id)
    org_day = services.set_budget(
        scope="org", metric="tokens", period="day", amount=1_000_000, actor=admin
    )
    dev_month = services.set_budget(
        scope="user",
        subject="Dev@A.test",
        metric="usd",
        period="month",
        amount=50,
        warn_percent=90,
        actor=admin,
    )
    assert dev_month.subject == "dev@a.test" and dev_month.warn_percent == 90
    assert Budget.get_by_id(dev_month.id).subject == dev_id  # stored as the user's id
    services.set_budget(
        scope="route", subject="claude", metric="tokens", period="month", amount=10, actor=admin
    )
    services.set_budget(
        scope="key", subject="shared", metric="usd", period="day", amount=0, actor=admin
    )
    # Setting the same subject, metric and period again replaces the amount in place.
    again = services.set_budget(
        scope="org", metric="tokens", period="day", amount=2_000_000, warn_percent=50, actor=admin
    )
    assert again.id == org_day.id and again.amount == 2_000_000 and again.warn_percent == 50
    assert Budget.select().count() == 4

    count(org_id, "tokens", "day", "org", "", 1_500_000)
    count(org_id, "usd", "month", "user", dev_id, 12.5)
    count(org_id, "tokens", "month", "route", "claude", 25)
    # Yesterday's counter is another window: it does not count today.
    UsageCounter.create(
        key=counter_key(org_id, "usd", "day", window("day", NOW)[0] - 86400, "key", "shared"),
        value=99.0,
        expires_at=window("day", NOW)[0],
    )
    # Nor does another org's counter of the same shape.
    count(people["admin_b"].org_id, "tokens", "day", "org", "", 7)

    budgets = {
        (b.scope, b.metric, b.period): b for b in services.list_budgets(actor=admin, now=NOW)
    }
    assert [b.scope for b in services.list_budgets(actor=admin)] == ["org", "user", "route", "key"]
    org_budget = budgets[("org", "tokens", "day")]
    assert (org_budget.used, org_budget.remaining, org_budget.percent) == (1_500_000, 500_000, 75)
    assert org_budget.state == "warn"  # past its 50 % warning
    assert org_budget.resets_at == window("day", NOW)[1]
    dev = budgets[("user", "usd", "month")]
    assert dev.as_dict() | {"resets_at": 0} == {
        "id": dev_month.id,
        "scope": "user",
        "subject": "dev@a.test",
        "metric": "usd",
        "period": "month",
        "amount": 50.0,
        "warn_percent": 90.0,
        "used": 12.5,
        "remaining": 37.5,
        "percent": 25.0,
        "state": "ok",
        "resets_at": 0,
    }
    assert dev.resets_at == window("month", NOW)[1]
    route = budgets[("route", "tokens", "month")]
    assert (route.used, route.remaining, route.state) == (25, 0, "exceeded")
    key = budgets[("key", "usd", "day")]
    assert (key.used, key.subject, key.state) == (0, "shared", "exceeded")  # a budget of 0

    # The auditor reads them too; deleting needs an admin of the same org.
    assert len(services.list_budgets(actor=people["auditor"])) == 4
    with pytest.raises(services.NotFound):
        services.delete_budget(dev_month.id, actor=people["admin_b"])
    services.delete_budget(dev_month.id, actor=admin)
    assert not Budget.select().where(Budget.id == dev_month.id).exists()
    with pytest.raises(services.NotFound):
        services.delete_budget(dev_month.id, actor=admin)
    actions = [e.action for e in AuditEvent.select().where(AuditEvent.allowed)]
    assert actions.count("set budget") == 5 and actions.count("delete budget") == 1


def test_budget_and_limit_input_is_checked(people: dict[str, Principal]) -> None:
    admin = people["admin"]

    def budget(**kwargs: object) -> str:
        arguments: dict[str, object] = {
            "scope": "org",
            "metric": "tokens",
            "period": "day",
            "amount": 10,
        }
        arguments.update(kwargs)
        with pytest.raises(services.ServiceError) as refused:
            services.set_budget(actor=admin, **arguments)  # type: ignore[arg-type]
        return str(refused.value)

    assert "no user 'nobody@a.test'" in budget(scope="user", subject="nobody@a.test")
    assert "no user" in budget(scope="user", subject="admin@b.test")  # another org's user
    assert "no route named 'missing'" in budget(scope="route", subject="missing")
    assert "no route named 'b-route'" in budget(scope="route", subject="b-route")
    assert "no key named 'b-key'" in budget(scope="key", subject="b-key")
    assert "needs a user's email" in budget(scope="user", subject="")
    assert "needs a route name" in budget(scope="route")
    assert "amount must be from 0" in budget(amount=-1)
    assert "finite" in budget(amount=math.nan)
    assert "finite" in budget(amount=math.inf)
    assert "must be a number" in budget(amount="10")
    assert "must be a number" in budget(amount=True)
    assert "amount must be from 0" in budget(amount=1e16)
    assert "warn_percent" in budget(warn_percent=101)
    assert "warn_percent" in budget(warn_percent=-0.5)
    assert "scope must be one of org, user, route, key" in budget(scope="team")
    assert "metric must be" in budget(metric="requests")
    assert "period must be" in budget(period="minute")
    assert Budget.select().count() == 0

    def limit(**kwargs: object) -> str:
        arguments: dict[str, object] = {"scope": "org", "rpm": 10}
        arguments.update(kwargs)
        with pytest.raises(services.ServiceError) as refused:
            services.set_rate_limit(actor=admin, **arguments)  # type: ignore[arg-type]
        return str(refused.value)

    for bad in (0, -5, 1.5, "60", True, 2**31):
        assert "rpm must be a whole number" in limit(rpm=bad)
        assert "tpm must be a whole number" in limit(rpm=None, tpm=bad)
    assert "scope must be one of org, user, route" in limit(scope="key", subject="shared")
    assert "no user 'nobody@a.test'" in limit(scope="user", subject="nobody@a.test")
    assert "no route named 'nope'" in limit(scope="route", subject="nope")
    assert RateLimit.select().count() == 0


def test_only_admins_change_and_only_readers_list(people: dict[str, Principal]) -> None:
    admin, auditor, dev = people["admin"], people["auditor"], people["dev"]
    budget = services.set_budget(scope="org", metric="usd", period="month", amount=100, actor=admin)
    limit = services.set_rate_limit(scope="org", rpm=600, actor=admin)
    assert limit is not None
    before = refusals("org-a")
    for who in (auditor, dev):
        with pytest.raises(services.Forbidden):
            services.set_budget(scope="org", metric="usd", period="day", amount=1, actor=who)
        with pytest.raises(services.Forbidden):
            services.delete_budget(budget.id, actor=who)
        with pytest.raises(services.Forbidden):
            services.set_rate_limit(scope="org", rpm=1, actor=who)
        with pytest.raises(services.Forbidden):
            services.delete_rate_limit(limit.id, actor=who)
    with pytest.raises(services.Forbidden):
        services.list_budgets(actor=dev)
    with pytest.raises(services.Forbidden):
        services.list_rate_limits(actor=dev)
    # Every refused attempt is in the audit log.
    assert refusals("org-a") == before + 10
    assert [b.amount for b in services.list_budgets(actor=auditor)] == [100]
    assert [r.rpm for r in services.list_rate_limits(actor=auditor)] == [600]
    # Another org's admin: neither sees nor touches them.
    assert services.list_budgets(actor=people["admin_b"]) == []
    with pytest.raises(services.NotFound):
        services.delete_rate_limit(limit.id, actor=people["admin_b"])
    with pytest.raises(services.NotFound):
        services.list_budgets("org-a", actor=people["admin_b"])
    # The operator at the command line names the org, and only that org's rows are found.
    with pytest.raises(services.NotFound):
        services.delete_budget(budget.id, org_name="org-b")
    services.delete_budget(budget.id, org_name="org-a")
    assert Budget.select().count() == 0


def test_rate_limits_set_clear_and_count_this_minute(people: dict[str, Principal]) -> None:
    admin = people["admin"]
    org_id, dev_id = admin.org_id, str(people["dev"].user_id)
    user_limit = services.set_rate_limit(
        scope="user", subject="dev@a.test", rpm=60, tpm=100_000, actor=admin
    )
    assert user_limit is not None and user_limit.subject == "dev@a.test"
    route_limit = services.set_rate_limit(scope="route", subject="claude", tpm=5000, actor=admin)
    assert route_limit is not None and route_limit.rpm is None
    count(org_id, "requests", "minute", "user", dev_id, 12)
    count(org_id, "tokens", "minute", "user", dev_id, 4321)
    count(org_id, "requests", "minute", "route", "claude", 3)
    limits = {r.scope: r for r in services.list_rate_limits(actor=admin, now=NOW)}
    assert limits["user"].as_dict() | {"resets_at": 0} == {
        "id": user_limit.id,
        "scope": "user",
        "subject": "dev@a.test",
        "rpm": 60,
        "tpm": 100_000,
        "used_requests": 12,
        "used_tokens": 4321,
        "remaining_requests": 48,
        "remaining_tokens": 95679,
        "resets_at": 0,
    }
    assert limits["user"].resets_at == window("minute", NOW)[1]
    assert limits["route"].as_dict()["remaining_requests"] is None
    assert limits["route"].used_requests == 3
    # None lifts one limit; both None removes the row.
    lifted = services.set_rate_limit(scope="user", subject="dev@a.test", rpm=60, actor=admin)
    assert lifted is not None and lifted.id == user_limit.id and lifted.tpm is None
    assert services.set_rate_limit(scope="user", subject="dev@a.test", actor=admin) is None
    assert [r.scope for r in services.list_rate_limits(actor=admin)] == ["route"]
    services.delete_rate_limit(route_limit.id, actor=admin)
    assert RateLimit.select().count() == 0
    actions = [e.action for e in AuditEvent.select().where(AuditEvent.allowed)]
    assert actions.count("set limit") == 3 and actions.count("delete limit") == 2


def test_my_budgets_are_the_ones_that_apply_to_me(people: dict[str, Principal]) -> None:
    admin, dev = people["admin"], people["dev"]
    for scope, subject in (
        ("org", None),
        ("user", "dev@a.test"),
        ("user", "other@a.test"),  # someone else's
        ("route", "claude"),
        ("route", "secret-route"),  # its key is not granted to dev
        ("route", "for-other"),  # a route made for someone else
        ("key", "shared"),
        ("key", "granted"),
    ):
        services.set_budget(
            scope=scope, subject=subject, metric="tokens", period="day", amount=100, actor=admin
        )
    services.set_rate_limit(scope="org", rpm=1000, actor=admin)
    services.set_rate_limit(scope="user", subject="dev@a.test", rpm=10, actor=admin)
    services.set_rate_limit(scope="user", subject="other@a.test", rpm=20, actor=admin)
    services.set_rate_limit(scope="route", subject="haiku", tpm=99, actor=admin)
    services.set_rate_limit(scope="route", subject="secret-route", tpm=98, actor=admin)
    count(dev.org_id, "tokens", "day", "user", str(dev.user_id), 40)

    mine = services.my_budgets(dev, now=NOW)
    assert [(b.scope, b.subject) for b in mine.budgets] == [
        ("org", ""),
        ("user", "dev@a.test"),
        ("route", "claude"),
        ("key", "shared"),
    ]
    assert mine.budgets[1].remaining == 60
    assert [(r.scope, r.subject) for r in mine.limits] == [
        ("org", ""),
        ("user", "dev@a.test"),
        ("route", "haiku"),
    ]
    # Granting the key brings its route and the key's budget in.
    services.grant_key("granted", ["dev@a.test"], "org-a")
    mine = services.my_budgets(dev)
    assert ("route", "secret-route") in [(b.scope, b.subject) for b in mine.budgets]
    assert ("key", "granted") in [(b.scope, b.subject) for b in mine.budgets]
    assert ("route", "secret-route") in [(r.scope, r.subject) for r in mine.limits]
    other = services.my_budgets(people["other"])
    assert ("route", "for-other") in [(b.scope, b.subject) for b in other.budgets]
    assert set(other.as_dict()) == {"budgets", "limits"}


def test_route_fallbacks(people: dict[str, Principal]) -> None:
    admin, dev = people["admin"], people["dev"]
    route = services.add_route("sonnet", "shared", fallbacks=["claude", "haiku"], actor=admin)
    assert route.fallbacks == ("claude", "haiku")
    assert route.as_dict()["fallbacks"] == ["claude", "haiku"]
    assert orjson.loads(Route.get_by_id(route.id).fallbacks) == ["claude", "haiku"]
    plain = services.add_route("opus", "shared", actor=admin)
    assert plain.fallbacks == () and Route.get_by_id(plain.id).fallbacks == "[]"

    def refused(fallbacks: object, name: str = "x", actor: Principal = admin) -> str:
        with pytest.raises(services.ServiceError) as error:
            services.add_route(name, "shared", fallbacks=fallbacks, actor=actor)  # type: ignore[arg-type]
        return str(error.value)

    assert "no route named 'nope'" in refused(["claude", "nope"])
    assert "no route named 'b-route'" in refused(["b-route"])  # another org's
    assert "cannot be its own fallback" in refused(["claude", "x"])
    assert "twice" in refused(["claude", "claude"])
    assert "at most 5" in refused(["claude"] * 6)
    assert "list of route names" in refused("claude")
    assert "list of route names" in refused([1])
    # A member's own route falls back only to names that member can see.
    assert "no route named 'for-other'" in refused(["for-other"], "mine", dev)
    mine = services.add_route("mine", "shared", fallbacks=["claude"], actor=dev)
    assert mine.fallbacks == ("claude",)

    changed = services.update_route(plain.id, {"fallbacks": ["sonnet"]}, actor=admin)
    assert changed.fallbacks == ("sonnet",)
    with pytest.raises(services.ServiceError, match="own fallback"):
        services.update_route(plain.id, {"fallbacks": ["opus"]}, actor=admin)
    with pytest.raises(services.ServiceError, match="own fallback"):
        services.update_route(plain.id, {"name": "sonnet"}, actor=admin)  # renamed onto it
    with pytest.raises(services.ServiceError, match="no route named"):
        services.update_route(plain.id, {"fallbacks": ["gone"]}, actor=admin)
    cleared = services.update_route(plain.id, {"fallbacks": []}, actor=admin)
    assert cleared.fallbacks == ()
    change = orjson.loads(
        AuditEvent.select()
        .where(AuditEvent.action == "update route")
        .order_by(AuditEvent.id.desc())
        .get()
        .change
    )
    assert change == {"fallbacks": [["sonnet"], []]}
    # Members cannot touch an org route's fallbacks.
    with pytest.raises(services.Forbidden):
        services.update_route(route.id, {"fallbacks": []}, actor=dev)


def test_key_concurrency_caps(people: dict[str, Principal]) -> None:
    admin, auditor, dev = people["admin"], people["auditor"], people["dev"]
    capped = services.add_key("capped", "openai", SECRET, KEYRING, max_concurrent=4, actor=admin)
    assert capped.max_concurrent == 4 and capped.as_dict()["max_concurrent"] == 4
    assert services.add_key("uncapped", "openai", SECRET, KEYRING, actor=admin).max_concurrent == 0
    for bad in (-1, 1.5, "3", True, 10**6):
        with pytest.raises(services.ServiceError, match="max_concurrent"):
            services.add_key("bad", "openai", SECRET, KEYRING, max_concurrent=bad, actor=admin)  # type: ignore[arg-type]
        with pytest.raises(services.ServiceError, match="max_concurrent"):
            services.update_key("capped", max_concurrent=bad, actor=admin)  # type: ignore[arg-type]
    assert services.update_key("capped", max_concurrent=10, actor=admin).max_concurrent == 10
    assert [k.max_concurrent for k in services.list_keys(actor=admin) if k.name == "capped"] == [10]
    with pytest.raises(services.Forbidden):
        services.update_key("capped", max_concurrent=1, actor=dev)
    with pytest.raises(services.Forbidden):
        services.update_key("capped", max_concurrent=1, actor=auditor)
    with pytest.raises(services.NotFound):
        services.update_key("capped", max_concurrent=1, actor=people["admin_b"])
    assert services.update_key("capped", max_concurrent=0, org_name="org-a").max_concurrent == 0
    change = (
        AuditEvent.select()
        .where((AuditEvent.action == "update key") & AuditEvent.allowed)
        .order_by(AuditEvent.id)
    )
    assert [orjson.loads(e.change) for e in change][-2:] == [
        {"max_concurrent": [4, 10]},
        {"max_concurrent": [10, 0]},
    ]


def test_rules_of_a_deleted_route_or_key_go_with_it(people: dict[str, Principal]) -> None:
    admin = people["admin"]
    for scope, subject in (("route", "haiku"), ("route", "claude"), ("key", "shared")):
        services.set_budget(
            scope=scope, subject=subject, metric="tokens", period="day", amount=10, actor=admin
        )
    services.set_rate_limit(scope="route", subject="haiku", rpm=5, actor=admin)
    # Another route named "claude" (a member's own) keeps that name's rules alive.
    services.add_route("claude", "shared", owner="dev@a.test", org_name="org-a")
    org_route = Route.get((Route.name == "claude") & (Route.scope == "org"))
    services.delete_route(org_route.id, actor=admin)
    haiku = Route.get(Route.name == "haiku")
    services.delete_route(haiku.id, actor=admin)
    assert {(b.scope, b.subject) for b in Budget.select()} == {
        ("route", "claude"),
        ("key", "shared"),
    }
    assert RateLimit.select().count() == 0
    services.delete_key("shared", org_name="org-a", force=True, actor=admin)
    assert Budget.select().count() == 0  # the key's, and the last "claude" route's
    assert AuditEvent.select().where(AuditEvent.action == "delete route rules").count() == 2
