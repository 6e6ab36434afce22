"""The clouds that serve a provider's models under their own credentials (Google Vertex AI
for Claude): a provider name's credential module (``CloudCredentials``), which answers
for one call the upstream URL, the auth headers and the body the cloud takes, or None for
a provider tvgate calls directly (Anthropic, OpenAI)."""

from __future__ import annotations

from tvgate.models import PROVIDER_VERTEX
from tvgate.providers.clouds import vertex
from tvgate.providers.clouds.base import CloudCredentials

_CLOUDS: dict[str, CloudCredentials] = {PROVIDER_VERTEX: vertex.VERTEX}


def credentials_for(provider: str) -> CloudCredentials | None:
    """The credential module of ``provider``'s keys, if it is a cloud."""
    return _CLOUDS.get(provider)
