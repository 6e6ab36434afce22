"""Whether a route may serve a call, and how: one attempt's plan, before any key or slot.

A route whose key speaks the client's API is a passthrough; one of another API (another
provider's, or Chat Completions alone to a Responses client) is served through the
translator of that pair (``tvgate.translate.pairs``), and a token count on it is answered
with tvgate's estimate of the request it counts (``tvgate.proxy.estimate``). What refuses
the attempt, in this order: no pair for the two APIs, or translation off for the route
(400); a key tvgate may not call (502: a non-https base URL where private upstreams are not
allowed, a stored base URL with a query or fragment); a client field the route's API cannot
express (400 naming it). ``ProxyCall._attempt`` answers a refusal, or tries the next route.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from tvgate.providers import ProviderAPI
from tvgate.proxy.estimate import counted_api
from tvgate.routing import RouteEntry
from tvgate.translate.pairs import Pair, Translation, Untranslatable, pair_for, route_speaks


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the route may not serve the call: the client's status and message."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    """How the route serves the call: through ``pair`` and this call's ``translation``
    (both None for a passthrough); ``counted``: the API a token count counts a request of,
    when the call is one on a route of another API (then answered with an estimate)."""

    pair: Pair | None = None
    translation: Translation | None = None
    counted: ProviderAPI | None = None


def plan_attempt(
    client: ProviderAPI,
    entry: RouteEntry,
    model: str,
    raw: bytes,
    owner: Hashable,
    allows_private_upstream: Callable[[bool], bool],
) -> Plan | Refusal:
    """The plan of a ``client`` API call on ``entry`` (its upstream ``model``), or why there
    is none; ``raw``: the client's body, translated for ``owner`` (the caller) when the
    route speaks another API."""
    pair: Pair | None = None
    counted: ProviderAPI | None = None
    speaks = route_speaks(client, entry.key.provider, chat_only=entry.key.chat_only)
    if speaks is not None:
        # Another API than the client's: served through the pair's translator, if any;
        # a token count, by an estimate of the request it counts as translated.
        counted = counted_api(client)
        pair = pair_for(counted or client, speaks)
        if pair is None or not entry.translate:
            off = " (translation is off for this route)" if pair is not None else ""
            return Refusal(
                400,
                f"route {entry.name!r} goes to {speaks}, which does not serve "
                f"this {client.api} endpoint{off}",
            )
    refusal = _upstream_refusal(entry, allows_private_upstream)
    if refusal is not None:
        return refusal
    if pair is None:
        return Plan()
    try:
        translation = pair.start(raw, model, owner)
    except Untranslatable as exc:
        return Refusal(400, f"route {entry.name!r} goes to {entry.key.provider}: {exc}")
    return Plan(pair, translation, counted)


def _upstream_refusal(
    entry: RouteEntry, allows_private_upstream: Callable[[bool], bool]
) -> Refusal | None:
    """Why the key of ``entry`` may not be called, if it may not."""
    base_url = entry.key.base_url
    if not base_url.startswith("https://") and not allows_private_upstream(
        entry.key.owner_id is not None
    ):
        return Refusal(502, f"route {entry.name!r} has a non-https upstream, which is not allowed")
    if "?" in base_url or "#" in base_url:
        # Stored before base URLs with a query or a fragment were refused (add_key).
        return Refusal(502, f"route {entry.name!r} has a base URL with a query or fragment")
    return None
