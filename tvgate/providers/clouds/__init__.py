"""The clouds that sell the providers' models under their own endpoints and credentials:
Azure OpenAI (and, beside it, Bedrock and Vertex AI; issue 20).

A key whose provider is a cloud is sent by that cloud's credential module, which answers
for one call the upstream URL and the auth headers (``base.CloudCredentials``); the proxy
asks :func:`credentials_for` the key's provider, and uses the provider API module's own
``auth_headers`` and URL when it answers None.
"""

from __future__ import annotations

from tvgate.providers.clouds import azure
from tvgate.providers.clouds.base import CloudCredentials

_CLOUDS: dict[str, CloudCredentials] = {
    azure.PROVIDER: azure.CREDENTIALS,
}


def credentials_for(provider: str) -> CloudCredentials | None:
    """The credential module of the cloud ``provider`` (None: not a cloud)."""
    return _CLOUDS.get(provider)
