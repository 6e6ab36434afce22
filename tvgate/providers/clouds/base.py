"""What every cloud's credential module answers, and the shapes it answers in.

A cloud key (Azure OpenAI's, Vertex AI's) is a key like any other: one secret, encrypted
by the keyring (a JSON object text parsed only by the cloud's module at call time), plus
settings that are not secret (``ProviderKey.settings``: an API version, a project, a
region). Its module checks both when the key is stored (``check_key``: a ``ValueError``
names what is wrong, never a secret's value) and, for each call, turns the call the proxy
would make to the provider whose API the cloud speaks into the cloud's (``prepare``): the
URL, the auth headers (which may be minted without blocking the IOLoop, through the
gateway's HTTP client or in a thread, and cached), the body the cloud takes, and the
answer's mapping back (``CloudCall.map_error``: the cloud's error envelope as the API's;
``CloudCall.reader``: a cloud whose answer is not in the API's wire at all, Bedrock's
event stream, reads it into that wire before the relay sees a byte).
Every secret string it sends or derives is given to the call's scrubber, so none can come
back to the client, a trace or a log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httputil import HTTPHeaders

from tvgate.providers.base import ProviderAPI
from tvgate.proxy.scrub import KeyScrubber
from tvgate.proxy.upstream import UpstreamListener

if TYPE_CHECKING:
    from tvgate.routing import KeyRef
    from tvgate.translate.pairs import Translation


class CloudError(Exception):
    """The cloud's call cannot be made (its credential cannot be minted, the key's secret
    or settings are unusable): ``status`` and a message the client may read, which names
    no secret."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def secret_object(secret: str, described: str, shape: str) -> dict[str, Any]:
    """A cloud key's secret as the JSON object it must be; ValueError saying what it should
    look like (``described``: "a Bedrock secret", ``shape``: its fields), never quoting it."""
    try:
        fields = orjson.loads(secret)
    except orjson.JSONDecodeError:
        raise ValueError(f"{described} is a JSON object: {shape}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{described} is a JSON object")
    return fields


@dataclass(frozen=True, slots=True)
class CheckedKey:
    """A key as it is stored: its settings (a JSON object's members), its secret
    (normalised), the text whose last four characters may be shown of it (``shown``), its
    base URL, and the other URLs its secret is sent to, by the field that names them (a
    token endpoint: ``{"token_uri": URL}``, checked as base URLs are)."""

    settings: dict[str, Any]
    secret: str
    shown: str
    base_url: str
    secret_urls: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CloudRequest:
    """One call as the proxy would make it to the provider whose API the cloud speaks."""

    #: The key (its id, base URL and settings, the JSON object text checked when stored).
    key: KeyRef
    secret: str
    #: The API of the call (the client's, or the route's when translated).
    api: ProviderAPI
    #: The route's upstream model (Azure's deployment name, Vertex's model id).
    upstream_model: str
    #: The body as that API takes it (``model`` in it).
    body: bytes
    client_headers: HTTPHeaders
    scrubber: KeyScrubber
    #: For a token endpoint: the gateway's provider HTTP client and its rules.
    http: CurlAsyncHTTPClient
    allow_private: bool
    connect_timeout: float
    #: The whole exchange with a token endpoint or STS may take this long (seconds).
    token_timeout: float = 30.0


def _unmapped(status: int, body: bytes) -> bytes:
    return body


@runtime_checkable
class CloudReader(Protocol):
    """An upstream listener in front of the relay, reading the cloud's answer into the API's
    wire; ``end`` is told the transfer ended (what it held back goes on then)."""

    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def on_upstream_chunk(self, chunk: bytes) -> bool: ...

    def end(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CloudCall:
    """The call as the cloud takes it (its auth headers set over the client's), and how
    its error answers become the API's (as they are, for a cloud that answers in the API's
    own envelope)."""

    url: str
    auth: list[tuple[str, str]]
    body: bytes
    #: The cloud's error answer (status, body) as the API's error body.
    map_error: Callable[[int, bytes], bytes] = _unmapped
    #: What reads the cloud's answer, in front of the relay (None: the relay, the answer
    #: being in the API's wire already).
    reader: Callable[[UpstreamListener], CloudReader] | None = None

    def listener(self, relay: UpstreamListener) -> UpstreamListener:
        """Who the exchange hands the answer to: the cloud's reader before ``relay``."""
        return relay if self.reader is None else self.reader(relay)

    def answer(self, api: ProviderAPI, inner: Translation | None) -> Translation | None:
        """What reads the answer: ``inner`` (the pair's translation, if any) when the cloud
        answers in the API's envelope, else a ``MappedAnswer`` around it."""
        if self.map_error is _unmapped:
            return inner
        return MappedAnswer(self, api, inner)


class CloudCredentials(Protocol):
    """A cloud's credential module."""

    def check_key(self, settings: dict[str, Any], secret: str, base_url: str | None) -> CheckedKey:
        """The key as stored, given its settings, secret and the base URL the admin gave
        (None: the cloud's default, where it has one); ValueError saying what is wrong
        (never a secret's value)."""
        ...

    async def prepare(self, request: CloudRequest) -> CloudCall:
        """The call as the cloud takes it; CloudError when it cannot be made."""
        ...


class MappedAnswer:
    """A cloud's answer as the client's: its error answers in the envelope of the API the
    cloud speaks (``CloudCall.map_error``), then through the pair's translation when the
    client speaks another API (``inner``); everything else as the API's own bytes."""

    def __init__(self, call: CloudCall, api: ProviderAPI, inner: Translation | None = None) -> None:
        self.body = call.body
        self._map_error = call.map_error
        self._api = api
        self._inner = inner

    @property
    def notes(self) -> list[str]:
        return self._inner.notes if self._inner is not None else []

    def response(self, body: bytes) -> bytes:
        return self._inner.response(body) if self._inner is not None else body

    def feed(self, chunk: bytes) -> bytes:
        return self._inner.feed(chunk) if self._inner is not None else chunk

    def finish(self) -> bytes:
        return self._inner.finish() if self._inner is not None else b""

    def error_event(self, message: str) -> bytes:
        if self._inner is not None:
            return self._inner.error_event(message)
        return self._api.stream_error_event(message)

    def error_answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        mapped = self._map_error(status, body)
        if self._inner is not None:
            return self._inner.error_answer(status, mapped)
        return status, mapped

    def document(self, answer: dict[str, Any]) -> dict[str, Any]:
        return self._inner.document(answer) if self._inner is not None else answer
