"""The registry of provider API modules: which module serves a path, an API, a provider.

What tvgate knows of each API lives in that API's module, behind one protocol
(``tvgate.providers.base.ProviderAPI``): ``anthropic`` (Messages and its token
counter), ``openai_chat`` (Chat Completions, and what every OpenAI operation
shares), ``openai_responses`` and ``openai_legacy`` (Completions, Embeddings). The
proxy looks the module up here, by the client's path (``ENDPOINTS``), by an API's
name (``api_for``) or by a route's provider (``provider_api``), and asks it; nothing
outside these modules branches on a provider's name.

A cloud that serves a provider's models (Azure OpenAI: OpenAI's; Google Vertex AI: Claude)
speaks that provider's API to tvgate's clients (``speaks``): its routes are that
provider's routes to the proxy and the translators, and what differs on the wire (the URL, the credentials, the body's few
fields, the error envelope) is its module's in ``tvgate.providers.clouds``.

Errors that tvgate itself raises must look like the API the client speaks, so
that an SDK surfaces them as it would the provider's own: the Anthropic
envelope on ``/v1/messages``, the OpenAI envelope on ``/v1/chat/completions``
and the others. After the first byte of a stream has gone out, an error can
only be told in-band, as an event in that API's stream format.
"""

from __future__ import annotations

from tvgate.models import (
    PROVIDER_ANTHROPIC,
    PROVIDER_AZURE,
    PROVIDER_BEDROCK,
    PROVIDER_OPENAI,
    PROVIDER_VERTEX,
)
from tvgate.providers import anthropic, openai_chat, openai_legacy, openai_responses
from tvgate.providers.base import (
    ANTHROPIC_COUNT_TOKENS,
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    ProviderAPI,
)

__all__ = [
    "ANTHROPIC_COUNT_TOKENS",
    "ANTHROPIC_MESSAGES",
    "DEFAULT_BASE_URLS",
    "ENDPOINTS",
    "OPENAI_CHAT",
    "OPENAI_COMPLETIONS",
    "OPENAI_EMBEDDINGS",
    "OPENAI_RESPONSES",
    "ProviderAPI",
    "api_for",
    "provider_api",
    "speaks",
]

_APIS: tuple[ProviderAPI, ...] = (
    anthropic.MESSAGES,
    anthropic.COUNT_TOKENS,
    openai_chat.CHAT,
    openai_responses.RESPONSES,
    openai_legacy.EMBEDDINGS,
    openai_legacy.COMPLETIONS,
)
#: Keyed by the client's path after ``/v1/``.
ENDPOINTS: dict[str, ProviderAPI] = {api.client_path: api for api in _APIS}
_BY_NAME: dict[str, ProviderAPI] = {api.api: api for api in _APIS}
#: Each provider's main API, whose envelope an error not tied to an endpoint takes.
_BY_PROVIDER: dict[str, ProviderAPI] = {
    api.provider: api for api in (anthropic.MESSAGES, openai_chat.CHAT)
}
DEFAULT_BASE_URLS: dict[str, str] = {p: api.default_base_url for p, api in _BY_PROVIDER.items()}
#: The clouds (issue 20), by the provider whose APIs each serves under its own endpoints
#: and credentials (``tvgate.providers.clouds``): a route on one speaks that provider's.
_CLOUD_SPEAKS: dict[str, str] = {
    PROVIDER_AZURE: PROVIDER_OPENAI,
    PROVIDER_VERTEX: PROVIDER_ANTHROPIC,
    PROVIDER_BEDROCK: PROVIDER_ANTHROPIC,
}


def speaks(provider: str) -> str:
    """The provider whose APIs a key of ``provider`` serves: itself, or for a cloud
    (``azure``, ``vertex``, ``bedrock``) the provider whose models it serves (``openai``,
    ``anthropic``)."""
    return _CLOUD_SPEAKS.get(provider, provider)


def api_for(name: str) -> ProviderAPI:
    """The module of the API named ``name`` (``anthropic.messages``); ValueError if none."""
    api = _BY_NAME.get(name)
    if api is None:
        raise ValueError(f"no provider API {name!r}")
    return api


def provider_api(provider: str) -> ProviderAPI:
    """The main API of ``provider`` (a key's or a route's); ValueError if none."""
    api = _BY_PROVIDER.get(speaks(provider))
    if api is None:
        raise ValueError(f"no provider {provider!r}")
    return api
