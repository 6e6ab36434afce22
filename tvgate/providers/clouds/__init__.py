"""Cloud providers' keys: how a call on a Bedrock, Vertex AI or Azure OpenAI key goes out.

A cloud key is a key like any other (one encrypted secret, its non-secret settings in
``ProviderKey.settings``), but its calls are addressed and signed by the cloud's own rules.
Each cloud's module (``bedrock``, ...) implements :class:`CloudCredentials`, which the proxy
asks (``tvgate.proxy.call``) for one call's URL, headers and body instead of the API's
``auth_headers`` and ``upstream_url``; the services ask it to check a key's settings and
secret when it is added. :func:`credentials_for` looks a cloud up by a key's provider.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tornado.curl_httpclient import CurlAsyncHTTPClient
    from tornado.httputil import HTTPHeaders

    from tvgate.providers import ProviderAPI
    from tvgate.proxy.upstream import UpstreamListener
    from tvgate.routing import KeyRef


class CloudError(Exception):
    """A cloud call cannot be made (its credentials are unusable, the token service failed):
    the message names what, never a secret."""


@dataclass(frozen=True, slots=True)
class CloudCall:
    """What one call on a cloud key is: the key, its decrypted secret, the API the body is
    in, the route's upstream model, the final body and the client's headers."""

    key: KeyRef
    secret: str
    api: ProviderAPI
    model: str
    body: bytes
    client_headers: HTTPHeaders
    http: CurlAsyncHTTPClient
    allow_private: bool


@dataclass(frozen=True, slots=True)
class CloudRequest:
    """The call as it goes out: URL, the headers that carry its credentials (and override the
    client's), the body; ``secrets``: every secret string it derives from the key (each
    field, minted tokens) for the scrubber; ``listener``: what reads the provider's answer
    into the API's own wire before the relay does (None: it is already)."""

    url: str
    headers: list[tuple[str, str]]
    body: bytes
    secrets: tuple[str, ...] = ()
    listener: Callable[[UpstreamListener], CloudReader] | None = field(default=None)


@runtime_checkable
class CloudReader(Protocol):
    """An upstream listener in front of the relay; ``end`` is told the transfer ended."""

    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def on_upstream_chunk(self, chunk: bytes) -> bool: ...

    def end(self) -> None: ...


class CloudCredentials(Protocol):
    """One cloud's rules for its keys and calls."""

    def check_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The key's settings, checked and bounded (a ValueError saying what is wrong)."""
        ...

    def check_secret(self, secret: str, settings: dict[str, Any]) -> str:
        """What the key's fingerprint is taken from (a part AWS or Azure show anyway); a
        ValueError naming the missing or wrong field (never a value) of a bad secret."""
        ...

    def default_base_url(self, settings: dict[str, Any]) -> str:
        """Where a key with these settings sends its calls when it names no base URL."""
        ...

    async def request(self, call: CloudCall) -> CloudRequest:
        """The call's URL, credential headers and body (may raise CloudError)."""
        ...


def _clouds() -> dict[str, CloudCredentials]:
    from tvgate.providers.clouds import bedrock

    return {"bedrock": bedrock.BEDROCK}


_CLOUDS: dict[str, CloudCredentials] = _clouds()


def credentials_for(provider: str) -> CloudCredentials | None:
    """The cloud whose keys are of ``provider``; None for a provider that is no cloud."""
    return _CLOUDS.get(provider)
