"""A caller's own Claude subscription through tvgate: where it may go, and as what route.

Claude Code signed in with a claude.ai subscription (Pro/Max) sends an OAuth bearer
(``Authorization: Bearer sk-ant-oat…``) and an ``anthropic-beta`` OAuth capability; its
user names themselves to tvgate in ``x-tvgate-token`` (``tvgate.identity.authenticator``
reads the two apart, and the token signs in like any other). Where the caller's org turns
``subscription_passthrough`` on, such a call goes to the Anthropic API
(``TVGATE_SUBSCRIPTION_BASE_URL``) on a route no admin made: no upstream model (the model
as the client sent it), no key of tvgate's (the client's bearer is the credential), no
fallbacks, no translation. Every other header is passed on as on any route: the beta
header unchanged, tvgate's own ``x-tvgate-*`` dropped (``tvgate.proxy.upstream``).

The call is governed by the budgets and rate limits of the user and the org (it has no
route or key of tvgate's to count against), traced like any other with
``client_credential = "subscription"``, and the bearer is masked in whatever comes back
from upstream, as a provider key is. The bearer lives in the call alone: nothing is cached
by it or under it, and it is never stored, logged or exported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvgate.identity import Principal
from tvgate.models import PROVIDER_ANTHROPIC, SCOPE_ORG
from tvgate.providers import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES, ProviderAPI
from tvgate.routing import KeyRef, OrgPolicy, OrgSnapshot, RouteEntry

if TYPE_CHECKING:
    from tvgate.gateway import Gateway
    from tvgate.proxy.client import ClientSide

#: The APIs a subscription's calls may use: the ones Claude Code calls with it.
SUBSCRIPTION_APIS = frozenset({ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS})


class SubscriptionRefused(Exception):
    """The caller's subscription may not pass through here: the client's status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def subscription_route(
    gateway: Gateway, principal: Principal, endpoint: ProviderAPI, client: ClientSide
) -> tuple[OrgSnapshot, RouteEntry]:
    """The org's snapshot and the route a call of ``principal``'s own subscription takes to
    ``TVGATE_SUBSCRIPTION_BASE_URL``; raises ``SubscriptionRefused`` on an endpoint that
    takes none (another API's, or a cloud mode's path) or where the org's switch is off."""
    snapshot = await gateway.router.snapshot(principal.org_id)
    route = _route(
        principal,
        snapshot.policy,
        endpoint,
        client.request_path,
        serves=client.serves_subscriptions,
        base_url=gateway.settings.subscription_base_url,
    )
    return snapshot, route


def _route(
    principal: Principal,
    policy: OrgPolicy,
    endpoint: ProviderAPI,
    path: str,
    *,
    serves: bool,
    base_url: str,
) -> RouteEntry:
    if not serves or endpoint.api not in SUBSCRIPTION_APIS:
        raise SubscriptionRefused(
            400,
            "a Claude subscription passes through tvgate on /v1/messages and "
            f"/v1/messages/count_tokens only, not on {path}; send your tvgate token as the "
            "credential (Authorization: Bearer tvg_… or x-api-key) to call it",
        )
    if not policy.subscription_passthrough:
        org = principal.org_name
        raise SubscriptionRefused(
            403,
            f"Claude subscription passthrough is off for org {org!r}, so your subscription "
            "cannot be used through tvgate: an admin turns it on (tvgate policy set --org "
            f"{org} --subscription-passthrough on, or the Policy page); meanwhile sign in to "
            "tvgate with your tvgate token instead (ANTHROPIC_AUTH_TOKEN=tvg_…) and use the "
            "org's routes",
        )
    key = KeyRef(
        id=0,
        org_id=principal.org_id,
        name="",
        provider=PROVIDER_ANTHROPIC,
        base_url=base_url,
        ciphertext="",
        owner_id=None,
    )
    return RouteEntry(
        id=0,
        name="",
        upstream_model="",
        scope=SCOPE_ORG,
        user_id=None,
        key=key,
        is_pattern=False,
        literal_prefix=0,
        matcher=None,
        translate=False,
    )


def subscription_auth(bearer: str) -> list[tuple[str, str]]:
    """The header the subscription's bearer goes upstream in: where the client sent it."""
    return [("Authorization", "Bearer " + bearer)]
