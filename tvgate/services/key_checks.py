"""What a provider key's secret, settings and limits must be before they are stored:
the checks ``tvgate.services.keys`` runs when a key is added, changed or rotated (a cloud
key's by its credential module, ``tvgate.providers.clouds``), and the checks of the URLs a
key's secret is sent to. Pure functions: they raise ``ServiceError`` (or audit a refused
URL through ``tvgate.services.upstreams``) and touch nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import orjson

from tvgate.identity import Principal
from tvgate.models import PROVIDER_OPENAI
from tvgate.providers import DEFAULT_BASE_URLS
from tvgate.providers.clouds import credentials_for
from tvgate.providers.clouds.base import CheckedKey
from tvgate.services.access import ServiceError
from tvgate.services.upstreams import _key_base_url, _refuse_base_url

#: A key's cap on its concurrent calls at most.
MAX_CONCURRENT_LIMIT = 100_000
#: A cloud key's settings at most, as JSON.
SETTINGS_LIMIT = 4096
#: A cloud key's secret at most (a service account's key file is about 2.3 KB).
SECRET_LIMIT = 16 * 1024


def checked_key(provider: str, settings: Any, secret: Any, base_url: str | None) -> CheckedKey:
    """A key's settings, secret and base URL as stored: a cloud's as its credential module
    checks them (``tvgate.providers.clouds``), any other's secret one word, its base URL the
    provider's by default, and no settings."""
    if settings is not None and not isinstance(settings, dict):
        raise ServiceError("settings must be an object")
    if not isinstance(secret, str):
        raise ServiceError("the key's secret must be a string")
    cloud = credentials_for(provider)
    if cloud is None:
        if settings:
            raise ServiceError(f"a key of provider {provider} has no settings")
        secret = check_secret(secret)
        return CheckedKey({}, secret, secret, base_url or DEFAULT_BASE_URLS[provider])
    if len(orjson.dumps(settings or {})) > SETTINGS_LIMIT:
        raise ServiceError(f"settings must be under {SETTINGS_LIMIT} bytes as JSON")
    if len(secret) > SECRET_LIMIT:
        raise ServiceError(f"the key's secret must be under {SECRET_LIMIT} characters")
    try:
        return cloud.check_key(settings or {}, secret, base_url)
    except ValueError as exc:
        raise ServiceError(str(exc)) from None


def url_checker(
    actor: Principal | None,
    org_id: int,
    action: str,
    name: str,
    own: bool,
    allow_private: bool,
    allow_private_user: bool,
    gateway_urls: Collection[str],
) -> Callable[[str, str], str]:
    """The checks a key's base URL (and any other URL its secret goes to) passes, for
    ``action`` on key ``name``: the URL as stored, or the refusal audited and raised."""

    def checked_url(url: str, what: str) -> str:
        return _key_base_url(
            url,
            own=own,
            allow_private=allow_private,
            allow_private_user=allow_private_user,
            gateway_urls=gateway_urls,
            refused=lambda error: _refuse_base_url(actor, org_id, action, name, error),
            what=what,
        )

    return checked_url


def check_secret_urls(checked: CheckedKey, checked_url: Callable[[str, str], str]) -> None:
    """The URLs a cloud key's secret is sent to besides its base URL (a token endpoint)
    pass the checks a base URL does (``checked_url``), a refusal naming the field."""
    for name, url in checked.secret_urls.items():
        try:
            checked_url(url, name)
        except ServiceError as exc:
            raise ServiceError(f"the key's token endpoint is refused: {exc}") from None


def check_chat_only(value: Any, provider: str) -> bool:
    if not isinstance(value, bool):
        raise ServiceError("chat_only must be true or false")
    if value and provider != PROVIDER_OPENAI:
        raise ServiceError("chat_only is for an OpenAI-compatible upstream (vLLM, Ollama)")
    return value


def check_max_concurrent(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_CONCURRENT_LIMIT
    ):
        raise ServiceError(
            f"max_concurrent must be a whole number from 0 (no cap) to {MAX_CONCURRENT_LIMIT}"
        )
    return value


def check_secret(secret: str) -> str:
    secret = secret.strip()
    if not secret or any(c.isspace() for c in secret) or len(secret) > 4096:
        raise ServiceError("the key must be one line without spaces")
    return secret


def merged_settings(stored: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """A cloud key's settings with those ``given`` over the ``stored`` ones (None removes)."""
    merged = {**stored, **(given or {})}
    return {name: value for name, value in merged.items() if value is not None}


def default_base_url(provider: str, settings: dict[str, Any], secret: str) -> str | None:
    """The base URL a cloud key of these settings gets when it names none (None: none, or
    the settings do not check)."""
    cloud = credentials_for(provider)
    if cloud is None:
        return None
    try:
        return cloud.check_key(settings, secret, None).base_url
    except ValueError:
        return None
