"""A proxied call on a cloud key (Bedrock, ...): its request as the cloud's module makes it.

``ProxyCall._forward`` hands the request it would send (the API's body, for the route's
upstream model) to :func:`cloud_request`, which asks the key's cloud
(``tvgate.providers.clouds``) for the URL, the credential headers and the body, gives the
scrubber every secret the cloud derived, and puts the cloud's reader of the answer in front
of the relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvgate.providers.clouds import _CLOUDS, CloudCall, CloudError, CloudReader
from tvgate.proxy.upstream import UpstreamListener

if TYPE_CHECKING:
    from tvgate.providers import ProviderAPI
    from tvgate.proxy.call import ProxyCall
    from tvgate.routing import RouteEntry

#: The providers whose keys are a cloud's.
CLOUDS = frozenset(_CLOUDS)


async def cloud_request(
    call: ProxyCall, entry: RouteEntry, api: ProviderAPI, secret: str, body: bytes
) -> tuple[str, list[tuple[str, str]], bytes, UpstreamListener | CloudReader] | str:
    """(URL, headers, body, listener) of the call on the cloud key of ``entry``, or why it
    cannot be made."""
    cloud = _CLOUDS[entry.key.provider]
    settings = call.gateway.settings
    try:
        request = await cloud.request(
            CloudCall(
                entry.key,
                secret,
                api,
                call.upstream_model,
                body,
                call.handler.request.headers,
                call.gateway.http,
                settings.allows_private_upstream(entry.key.owner_id is not None),
            )
        )
    except CloudError as exc:
        return call.scrubber.text(str(exc))
    for value in request.secrets:
        call.scrubber.add(value)
    listener = call.relay if request.listener is None else request.listener(call.relay)
    return request.url, request.headers, request.body, listener
