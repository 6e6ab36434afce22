"""The clouds that serve a provider's models under their own endpoints and credentials
(issue 20): Azure OpenAI (OpenAI's APIs), Google Vertex AI and AWS Bedrock (Claude).

A key whose provider is a cloud is checked when stored and sent by that cloud's credential
module (``base.CloudCredentials``), which answers for one call the upstream URL, the auth
headers and the body the cloud takes; the proxy asks :func:`credentials_for` the key's
provider, and uses the provider API module's own ``auth_headers`` and URL when it answers
None (Anthropic, OpenAI). A cloud adds its one entry to ``_CLOUDS``.
"""

from __future__ import annotations

from tvgate.models import PROVIDER_AZURE, PROVIDER_BEDROCK, PROVIDER_VERTEX
from tvgate.providers.clouds import azure, bedrock, vertex
from tvgate.providers.clouds.base import CloudCredentials

_CLOUDS: dict[str, CloudCredentials] = {
    PROVIDER_AZURE: azure.CREDENTIALS,
    PROVIDER_VERTEX: vertex.CREDENTIALS,
    PROVIDER_BEDROCK: bedrock.CREDENTIALS,
}


def credentials_for(provider: str) -> CloudCredentials | None:
    """The credential module of ``provider``'s keys (None: not a cloud)."""
    return _CLOUDS.get(provider)


#: The settings a key of each cloud has, in the order a form shows them (each module
#: checks its own).
CLOUD_SETTINGS: dict[str, tuple[str, ...]] = {
    PROVIDER_AZURE: ("style", "api_version", "authority"),
    PROVIDER_VERTEX: ("project", "region"),
    PROVIDER_BEDROCK: ("region", "role_arn", "external_id", "sts_endpoint"),
}
