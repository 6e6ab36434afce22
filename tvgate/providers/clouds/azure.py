"""Azure OpenAI: where a call on an Azure key goes, and the key or Entra ID token it carries.

A key of provider ``azure`` has the resource's endpoint as its base URL
(``https://{resource}.openai.azure.com``) and, in its settings, the ``style`` of endpoint
and the ``api_version``:

* ``deployments`` (the default): Chat Completions (and Completions, Embeddings) at
  ``/openai/deployments/{deployment}/chat/completions?api-version=…``, the route's
  upstream model being the deployment's name; the Responses API at
  ``/openai/responses?api-version=…``, which Azure serves beside the deployments, the
  deployment named by the body's ``model``.
* ``v1``: the OpenAI-compatible endpoint, ``/openai/v1/chat/completions`` and
  ``/openai/v1/responses``, the deployment in the body's ``model``; no api-version.

The secret is a JSON object: ``{"api_key": …}`` (sent as ``api-key``), or Microsoft
Entra ID client credentials ``{"tenant_id", "client_id", "client_secret"}``, for which a
token is minted with the client-credentials grant at
``{authority}/{tenant}/oauth2/v2.0/token`` (``authority`` in the settings, by default
``https://login.microsoftonline.com``) for the Cognitive Services scope, through the
gateway's own HTTP client (asynchronous, the provider calls' address rules, bounded in
size and time by ``tokenfetch``; an answer without a sane ``expires_in`` is refused), and
cached per credential until shortly before it expires. Each secret value and each token goes to
the call's scrubber before anything is sent.

The answers are OpenAI's: the provider API modules read their usage and errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from tvgate.providers.clouds import tokenfetch
from tvgate.providers.clouds.base import (
    CheckedKey,
    CloudCall,
    CloudError,
    CloudRequest,
    secret_object,
)
from tvgate.proxy.upstream import url_host

PROVIDER = "azure"
STYLES = ("deployments", "v1")
#: The version a deployments-style key gets when it names none: the first GA-or-preview
#: version that serves Chat Completions and the Responses API both.
DEFAULT_API_VERSION = "2025-04-01-preview"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
SCOPE = "https://cognitiveservices.azure.com/.default"
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?|preview|latest")
#: A tenant (a GUID or a domain) and a client id (a GUID), bounded.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,99}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9-]{1,100}")
_SETTINGS = frozenset({"style", "api_version", "authority"})
_SECRET_FIELDS = {"api_key": ("api_key",), "entra": ("tenant_id", "client_id", "client_secret")}
#: A token is minted again this long before it expires (or halfway, for a short one).
_REFRESH_AHEAD = 300.0
_TOKEN_CACHE_LIMIT = 1000


def _settings(text: str) -> dict[str, Any]:
    try:
        settings = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}
    return settings if isinstance(settings, dict) else {}


def _secret_fields(secret: str) -> dict[str, str]:
    """The secret's fields by kind; ValueError naming what is missing (never a value)."""
    fields = secret_object(
        secret,
        "an Azure OpenAI secret",
        '{"api_key": "…"} or {"tenant_id": "…", "client_id": "…", "client_secret": "…"}',
    )
    kind = "api_key" if "api_key" in fields else "entra"
    names = _SECRET_FIELDS[kind]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"an Azure OpenAI secret has no field {unknown[0]!r}")
    for name in names:
        value = fields.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"the Azure OpenAI secret's field {name!r} is missing or empty")
        if len(value) > 2048 or any(c.isspace() for c in value.strip()):
            raise ValueError(f"the Azure OpenAI secret's field {name!r} is not one word")
    out = {name: fields[name].strip() for name in names}
    if kind == "entra":
        if not _TENANT.fullmatch(out["tenant_id"]):
            raise ValueError("the Azure OpenAI secret's tenant_id is not a tenant id or domain")
        if not _CLIENT_ID.fullmatch(out["client_id"]):
            raise ValueError("the Azure OpenAI secret's client_id is not a client id")
    return out


@dataclass(slots=True)
class _Token:
    value: str
    refresh_at: float


class AzureCredentials:
    """The ``CloudCredentials`` of Azure OpenAI."""

    def __init__(self) -> None:
        #: Minted tokens by (authority, tenant, client, digest of the secret).
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}
        #: Mints under way: calls that need the same token wait for the one request.
        self._minting: dict[tuple[str, str, str, str], asyncio.Future[_Token]] = {}

    def check_key(self, settings: dict[str, Any], secret: str, base_url: str | None) -> CheckedKey:
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise ValueError(
                f"an Azure OpenAI key has no setting {unknown[0]!r} "
                f"(it has {', '.join(sorted(_SETTINGS))})"
            )
        style = settings.get("style", "deployments")
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}")
        version = settings.get("api_version", DEFAULT_API_VERSION if style != "v1" else "")
        if not isinstance(version, str) or (version and not _API_VERSION.fullmatch(version)):
            raise ValueError(
                "api_version must be an Azure OpenAI API version (2024-10-21, "
                "2025-04-01-preview), or preview or latest for the v1 endpoint"
            )
        if style == "deployments" and version in ("", "preview", "latest"):
            raise ValueError("a deployments-style key needs a dated api_version (2024-10-21)")
        checked: dict[str, Any] = {"style": style}
        if version:
            checked["api_version"] = version
        urls: dict[str, str] = {}
        authority = settings.get("authority")
        if authority is not None:
            if not isinstance(authority, str) or not authority or len(authority) > 500:
                raise ValueError("authority must be the Entra ID authority's URL")
            checked["authority"] = authority.rstrip("/")
            urls = {"authority": checked["authority"]}
        if not base_url:
            raise ValueError(
                "an Azure OpenAI key needs its resource's endpoint as the base URL "
                "(https://RESOURCE.openai.azure.com)"
            )
        # The endpoint as the portal shows it; a URL copied with the API's path is mended.
        endpoint = base_url.rstrip("/")
        for suffix in ("/openai/v1", "/openai"):
            endpoint = endpoint.removesuffix(suffix)
        fields = _secret_fields(secret.strip())
        shown = fields.get("api_key") or fields["client_secret"]
        return CheckedKey(checked, orjson.dumps(fields).decode(), shown, endpoint, urls)

    async def prepare(self, request: CloudRequest) -> CloudCall:
        try:
            fields = _secret_fields(request.secret)
        except ValueError as exc:
            raise CloudError(502, f"the key cannot be used: {exc}; ask an admin") from None
        for value in fields.values():
            request.scrubber.add(value)
        settings = _settings(request.key.settings)
        if "api_key" in fields:
            auth = [("api-key", fields["api_key"])]
        else:
            token = await self._token(
                request, fields, settings.get("authority") or DEFAULT_AUTHORITY
            )
            request.scrubber.add(token)
            auth = [("Authorization", "Bearer " + token)]
        return CloudCall(_url(request, settings), auth, request.body)

    async def _token(self, request: CloudRequest, fields: dict[str, str], authority: str) -> str:
        digest = hashlib.sha256(fields["client_secret"].encode()).hexdigest()
        cache_key = (authority, fields["tenant_id"], fields["client_id"], digest)
        token = self._tokens.get(cache_key)
        if token is not None and time.monotonic() < token.refresh_at:
            return token.value
        minting = self._minting.get(cache_key)
        if minting is None:
            minting = asyncio.ensure_future(self._mint(request, fields, authority))
            self._minting[cache_key] = minting
            try:
                token = await minting
            finally:
                self._minting.pop(cache_key, None)
            if len(self._tokens) >= _TOKEN_CACHE_LIMIT:
                self._tokens.pop(next(iter(self._tokens)))
            self._tokens[cache_key] = token
            return token.value
        return (await asyncio.shield(minting)).value

    async def _mint(self, request: CloudRequest, fields: dict[str, str], authority: str) -> _Token:
        url = f"{authority}/{quote(fields['tenant_id'], safe='')}/oauth2/v2.0/token"
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": fields["client_id"],
                "client_secret": fields["client_secret"],
                "scope": SCOPE,
            }
        ).encode()
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        where = f"Entra ID ({url_host(url)})"
        answer = await tokenfetch.fetch(request, url, headers, form, "the Entra ID token endpoint")
        obj = tokenfetch.json_object(answer, where)
        token = obj.get("access_token")
        if answer.status != 200 or not isinstance(token, str) or not token:
            raise CloudError(502, _refusal(where, answer.status, obj))
        seconds = tokenfetch.lifetime(obj.get("expires_in"), where)
        # Kept until shortly before it expires; a token of under a second is used once.
        ahead = min(_REFRESH_AHEAD, seconds / 2)
        return _Token(token, time.monotonic() + max(0.0, seconds - ahead))


def _refusal(where: str, status: int, obj: dict[str, Any]) -> str:
    """Why Entra ID minted no token, from its error code and AADSTS numbers (its
    description may quote what was sent, so it is not repeated)."""
    error = obj.get("error")
    codes = obj.get("error_codes")
    # Its code alone, in the characters codes have (the endpoint may be anyone's).
    said = re.sub(r"[^\w.-]", "", error)[:60] if isinstance(error, str) else ""
    said = said or "no token in the answer"
    if isinstance(codes, list) and all(isinstance(c, int) for c in codes[:3]):
        said += "".join(f" AADSTS{c}" for c in codes[:3])
    return (
        f"{where} minted no token for the key's client credentials "
        f"(HTTP {status}: {said}); ask an admin"
    )


def _url(request: CloudRequest, settings: dict[str, Any]) -> str:
    """The call's URL on the resource (see the module docstring)."""
    base, path = request.key.base_url.rstrip("/"), request.api.upstream_path
    version = settings.get("api_version", "")
    if settings.get("style") == "v1":
        url = f"{base}/openai/v1{path}"
    elif path == "/responses":
        url = f"{base}/openai/responses"
    else:
        url = f"{base}/openai/deployments/{quote(request.upstream_model, safe='')}{path}"
    return f"{url}?{urlencode({'api-version': version})}" if version else url


CREDENTIALS = AzureCredentials()
