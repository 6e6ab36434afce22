"""What a cloud's credential module answers the proxy for one call, and how it is asked.

A cloud key's row holds its non-secret settings (``ProviderKey.settings``, a JSON object)
and one encrypted secret, a JSON object text parsed only by the cloud's module at call
time. The module checks both when a key is added (``check_settings``, ``check_secret``) and,
for each call, answers the URL and headers that reach the cloud (``prepare``), minting
what it must (an OAuth token) without blocking the IOLoop. Every secret string it handles
goes to ``CloudCall.scrub`` before anything can echo it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tornado.curl_httpclient import CurlAsyncHTTPClient

from tvgate.providers.base import ProviderAPI


class CloudError(Exception):
    """The call cannot be sent with this key (its secret unreadable, a token refused):
    ``status`` for the client, and a message that names fields, never their values."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class CloudCall:
    """One call on a cloud key, as its module needs it."""

    #: The key's settings (the JSON object text stored) and its base URL (the endpoint).
    settings: str
    base_url: str
    #: The decrypted secret text.
    secret: str
    #: The API the body is for (the client's, or the route's when translated).
    api: ProviderAPI
    #: The route's upstream model (Azure's deployment name).
    model: str
    stream: bool
    body: bytes
    #: Masks a secret string in whatever comes back (``KeyScrubber.add``).
    scrub: Callable[[str], None]
    #: For a token endpoint: the gateway's provider HTTP client and its rules.
    http: CurlAsyncHTTPClient
    allow_private: bool
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class CloudRequest:
    """Where the call goes and what it carries: the auth headers are set over the client's."""

    url: str
    auth: list[tuple[str, str]]
    body: bytes


class CloudCredentials(Protocol):
    """A cloud's credential module."""

    def check_settings(
        self, settings: dict[str, Any], base_url: str | None
    ) -> tuple[dict[str, Any], str, list[str]]:
        """The settings and base URL a key is stored with (ValueError saying what is
        wrong), and the URLs among the settings that must pass the base URL rules."""
        ...

    def check_secret(self, secret: str) -> tuple[str, str]:
        """The secret text to store (ValueError naming a missing field, never a value) and
        the part of it whose last characters the key's fingerprint shows."""
        ...

    async def prepare(self, call: CloudCall) -> CloudRequest:
        """The request of ``call`` (``CloudError`` when it cannot be made)."""
        ...
