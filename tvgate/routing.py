"""Route resolution: which provider, upstream model and key a principal gets for a name.

Each org's routes and keys are held in memory as an immutable snapshot, loaded
in the database pool on first use and refreshed in the background every
``cache_ttl`` seconds, so a request never waits on the database in the steady
state. A change made in this process invalidates the snapshot at once.

Precedence: an exact name beats a pattern; within each, a user-owned route
beats a route an admin made for that user, which beats an org route; among
patterns of the same scope the longest literal prefix wins.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from tornado.ioloop import PeriodicCallback

from tvgate.db import DatabaseRunner, finished_read
from tvgate.governance.policy import NO_GOVERNANCE, Governance, load_governance
from tvgate.identity import Principal
from tvgate.models import (
    SCOPE_ORG,
    SCOPE_OWNED,
    SCOPE_USER,
    KeyGrant,
    Org,
    ProviderKey,
    Route,
    User,
)
from tvgate.rows import from_row

log = logging.getLogger("tvgate.routing")

_SCOPE_RANK = {SCOPE_OWNED: 0, SCOPE_USER: 1, SCOPE_ORG: 2}
_GLOB_CHARS = re.compile(r"[*?\[]")


class RouteNotFound(Exception):
    """No route of that name is usable by this principal."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        listed = ", ".join(available) if available else "none"
        super().__init__(f"no route named {name!r} for you; routes you may use: {listed}")


@dataclass(frozen=True, slots=True)
class KeyRef:
    """What the proxy needs of a provider key; the secret stays encrypted here."""

    id: int
    org_id: int
    name: str
    provider: str
    base_url: str
    ciphertext: str
    owner_id: int | None
    #: For an org key: usable by everyone in the org, or only by ``granted``.
    available_to_all: bool = True
    granted: frozenset[int] = frozenset()
    #: Calls that may be open on this key at once across every process; 0: no cap.
    max_concurrent: int = 0
    #: The upstream serves Chat Completions but not Responses (vLLM, Ollama).
    chat_only: bool = False
    #: A cloud key's non-secret settings, as the JSON object text the key row holds.
    settings: str = "{}"

    def usable_by(self, principal: Principal, allow_user_keys: bool) -> bool:
        if self.owner_id is not None:
            # A user's own key is theirs alone, and only while the org allows user keys.
            return allow_user_keys and self.owner_id == principal.user_id
        return self.available_to_all or principal.user_id in self.granted


@dataclass(frozen=True, slots=True)
class RouteEntry:
    id: int
    name: str
    upstream_model: str
    scope: str
    user_id: int | None
    key: KeyRef
    is_pattern: bool
    literal_prefix: int
    matcher: re.Pattern[str] | None
    #: Names of the routes tried, in order, when this one's provider fails.
    fallbacks: tuple[str, ...] = ()
    #: A client of another API than the key's provider is served by translation.
    translate: bool = True

    def visible_to(self, principal: Principal, policy: OrgPolicy) -> bool:
        if self.scope == SCOPE_ORG:
            visible = True
        elif self.scope == SCOPE_USER:
            visible = self.user_id == principal.user_id
        else:
            visible = policy.allow_user_routes and self.user_id == principal.user_id
        # The key must be usable by this principal now, whatever held when the route was made.
        return visible and self.key.usable_by(principal, policy.allow_user_keys)

    def upstream_model_for(self, requested: str) -> str:
        return self.upstream_model or requested


@dataclass(frozen=True, slots=True)
class OrgPolicy:
    allow_user_routes: bool = False
    allow_user_keys: bool = False
    #: Members' own Claude subscriptions may pass through (tvgate.proxy.subscription).
    subscription_passthrough: bool = False


@dataclass(slots=True)
class OrgSnapshot:
    org_id: int
    policy: OrgPolicy
    exact: dict[str, list[RouteEntry]] = field(default_factory=dict)
    patterns: list[RouteEntry] = field(default_factory=list)
    governance: Governance = NO_GOVERNANCE
    loaded_at: float = 0.0

    def resolve(self, principal: Principal, name: str) -> RouteEntry | None:
        candidates = [r for r in self.exact.get(name, ()) if r.visible_to(principal, self.policy)]
        if not candidates:
            candidates = [
                r
                for r in self.patterns
                if r.matcher is not None
                and r.matcher.match(name)
                and r.visible_to(principal, self.policy)
            ]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (_SCOPE_RANK[r.scope], -r.literal_prefix, r.id))

    def named(self, principal: Principal, name: str) -> RouteEntry | None:
        """The route called ``name`` (a fallback names a route, it does not match a model)."""
        candidates = [
            r
            for r in (self.exact.get(name) or [p for p in self.patterns if p.name == name])
            if r.visible_to(principal, self.policy)
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (_SCOPE_RANK[r.scope], r.id))

    def available(self, principal: Principal) -> list[RouteEntry]:
        """Every route this principal may use, one per name, in name order."""
        seen: dict[str, RouteEntry] = {}
        entries = [r for rs in self.exact.values() for r in rs] + self.patterns
        for entry in entries:
            if not entry.visible_to(principal, self.policy):
                continue
            best = seen.get(entry.name)
            if best is None or _SCOPE_RANK[entry.scope] < _SCOPE_RANK[best.scope]:
                seen[entry.name] = entry
        return [seen[name] for name in sorted(seen)]


def _entry(route: Route, key: ProviderKey, granted: frozenset[int]) -> RouteEntry:
    glob = _GLOB_CHARS.search(route.name)
    return from_row(
        RouteEntry,
        route,
        key=from_row(KeyRef, key, granted=granted),
        is_pattern=glob is not None,
        literal_prefix=glob.start() if glob else len(route.name),
        # Compiled once per snapshot, never per request.
        matcher=re.compile(fnmatch.translate(route.name)) if glob else None,
        fallbacks=tuple(_fallback_names(route.fallbacks)),
    )


def _fallback_names(stored: str) -> list[str]:
    try:
        names = orjson.loads(stored or "[]")
    except orjson.JSONDecodeError:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def load_snapshot(org_id: int) -> OrgSnapshot:
    """Read an org's enabled routes and their enabled keys (runs in the database pool)."""
    org = Org.get_by_id(org_id)
    snapshot = OrgSnapshot(
        org_id=org_id,
        policy=from_row(OrgPolicy, org),
        governance=load_governance(org_id),
    )
    grants: dict[int, set[int]] = {}
    for grant in (
        KeyGrant.select(KeyGrant.key, KeyGrant.user)
        .join(ProviderKey)
        .where(ProviderKey.org == org_id)
    ):
        grants.setdefault(grant.key_id, set()).add(grant.user_id)
    disabled_users = {
        u.id for u in User.select(User.id).where((User.org == org_id) & User.disabled)
    }
    query = (
        Route.select(Route, ProviderKey)
        .join(ProviderKey)
        # The key's org too: a route row pointing at another org's key (written straight
        # into the database) must not lend that key out; the key's context would decrypt.
        .where(
            (Route.org == org_id)
            & (ProviderKey.org == org_id)
            & Route.enabled
            & ~ProviderKey.disabled
        )
    )
    for route in query:
        if route.user_id in disabled_users:
            continue  # a disabled user's routes are never used
        entry = _entry(route, route.key, frozenset(grants.get(route.key_id, ())))
        if entry.is_pattern:
            snapshot.patterns.append(entry)
        else:
            snapshot.exact.setdefault(entry.name, []).append(entry)
    snapshot.loaded_at = time.monotonic()
    return snapshot


def snapshot_key_refs(snapshot: OrgSnapshot) -> set[tuple[int, str]]:
    """(key id, ciphertext) of every key a snapshot's routes use."""
    entries = [r for rs in snapshot.exact.values() for r in rs] + snapshot.patterns
    return {(r.key.id, r.key.ciphertext) for r in entries}


class Router:
    """Per-org snapshots, with background refresh."""

    def __init__(self, runner: DatabaseRunner, ttl: float) -> None:
        self.runner = runner
        self.ttl = ttl
        self._snapshots: dict[int, OrgSnapshot] = {}
        self._loading: dict[int, asyncio.Future[OrgSnapshot]] = {}
        #: Bumped by invalidate(): a load that started before a change must not be kept.
        self._generation: dict[int, int] = {}
        self._refresher: PeriodicCallback | None = None
        #: Called on the IOLoop with (previous, new) each time an org's snapshot is loaded.
        self.on_reload: Callable[[OrgSnapshot | None, OrgSnapshot], None] | None = None

    def start(self) -> None:
        """Refresh every known snapshot in the background, every TTL/2."""
        self._refresher = PeriodicCallback(self._refresh_all, max(50.0, self.ttl * 500))
        self._refresher.start()

    def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()

    async def snapshot(self, org_id: int) -> OrgSnapshot:
        snapshot = self._snapshots.get(org_id)
        if snapshot is not None:
            return snapshot
        return await self._load(org_id)

    async def _load(self, org_id: int) -> OrgSnapshot:
        while True:
            generation = self._generation.get(org_id, 0)
            loading = self._loading.get(org_id)
            if loading is None:
                loading = asyncio.ensure_future(self.runner.run(lambda: load_snapshot(org_id)))
                self._loading[org_id] = loading
                loading.add_done_callback(functools.partial(self._loaded, org_id, generation))
            snapshot = await loading
            if self._generation.get(org_id, 0) == generation:
                return snapshot
            # The org changed while this load read the database: read it again.

    def _loaded(self, org_id: int, generation: int, done: asyncio.Future[OrgSnapshot]) -> None:
        snapshot = finished_read(self._loading, org_id, done)
        if snapshot is None:
            return
        if self._generation.get(org_id, 0) != generation:
            return  # read before a change made in this process: stale already
        previous = self._snapshots.get(org_id)
        self._snapshots[org_id] = snapshot
        if self.on_reload is not None:
            self.on_reload(previous, snapshot)

    async def _refresh_all(self) -> None:
        deadline = time.monotonic() - self.ttl / 2
        for org_id, snapshot in list(self._snapshots.items()):
            if snapshot.loaded_at <= deadline:
                try:
                    await self._load(org_id)
                except Exception as exc:  # noqa: BLE001 - keep serving the last snapshot
                    log.warning("route refresh for org %d failed: %s", org_id, exc)

    async def resolve(self, principal: Principal, name: str) -> tuple[OrgSnapshot, RouteEntry]:
        """The org's snapshot and the route ``name`` resolves to in it."""
        snapshot = await self.snapshot(principal.org_id)
        entry = snapshot.resolve(principal, name)
        if entry is None:
            raise RouteNotFound(name, [r.name for r in snapshot.available(principal)])
        return snapshot, entry

    def invalidate(self, org_id: int) -> None:
        """Forget an org's snapshot: the next request loads the change, and a load already
        under way (which may have read the database before the change) is not kept."""
        self._generation[org_id] = self._generation.get(org_id, 0) + 1
        self._snapshots.pop(org_id, None)
        self._loading.pop(org_id, None)
