"""AWS Bedrock keys: Claude through ``InvokeModel`` and ``InvokeModelWithResponseStream``.

A Bedrock key's settings: ``region`` (required), and ``role_arn`` (with ``external_id``
and ``sts_endpoint``, optional) for a role to assume. Its secret is one JSON object: an
access key (``access_key_id``, ``secret_access_key``, ``session_token`` optional), which
signs every call with SigV4 (botocore's signer, never tvgate's own), or assumes the role
through STS (the role's short-lived credentials are cached per key until five minutes
before they expire, one AssumeRole at a time); or ``api_key``, a Bedrock API key sent as
a bearer token. The secret is parsed here, at call time, and only here; an error names a
field, never a value.

The body is the Anthropic Messages body less ``model`` (which goes in the path) and
``stream`` (the path says it), with ``anthropic_version`` (``bedrock-2023-05-31``) and the
client's ``anthropic-beta`` header as ``anthropic_beta``, unless the client sent them.
The answer is read back into Anthropic's own wire (:class:`BedrockAnswer`, the call's
``reader`` in front of the relay): the event
stream as SSE, Bedrock's ``{"message"}`` errors in the Anthropic envelope with AWS's
message kept. Signing costs ~150 us of CPU for a small body and ~300 us for 190 KB
(measured on the 2-core test machine), so it runs on the IOLoop.
"""

from __future__ import annotations

import asyncio
import calendar
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tvgate.providers.base import ANTHROPIC_COUNT_TOKENS
from tvgate.providers.clouds import tokenfetch
from tvgate.providers.clouds.base import (
    CheckedKey,
    CloudCall,
    CloudError,
    CloudRequest,
    secret_object,
)
from tvgate.providers.clouds.eventstream import CONTENT_TYPE, EventStreamToSSE, anthropic_type
from tvgate.proxy.upstream import UpstreamListener, url_host

ANTHROPIC_VERSION = "bedrock-2023-05-31"
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]{0,16}:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}")
_SETTINGS = frozenset({"region", "role_arn", "external_id", "sts_endpoint"})
_KEY_FIELDS = ("access_key_id", "secret_access_key", "session_token")
#: The longest field of a secret (a session token is ~1-2 KB).
_MAX_FIELD = 8192
#: STS credentials are renewed this long before they expire.
_RENEW_BEFORE = 300.0
_ROLE_SECONDS = 3600
_MAX_CACHED_ROLES = 4096
#: The largest Bedrock error body read to tell the client.
_MAX_ERROR = 64 * 1024


class BedrockCredentials:
    """The credential module of ``bedrock`` keys."""

    def check_key(self, settings: dict[str, Any], secret: str, base_url: str | None) -> CheckedKey:
        checked = _settings(settings)
        secret = secret.strip()
        fields = _secret_fields(secret)
        if "role_arn" in checked and "api_key" in fields:
            raise ValueError("a key that assumes a role needs an access key, not an api_key")
        return CheckedKey(
            checked,
            secret,
            # The access key id, as AWS's console shows it; the API key itself otherwise.
            fields.get("access_key_id") or fields["api_key"],
            base_url or f"https://bedrock-runtime.{checked['region']}.amazonaws.com",
            # A given STS endpoint is sent the (signed) access key: checked as base URLs are.
            {"sts_endpoint": checked["sts_endpoint"]} if "sts_endpoint" in checked else {},
        )

    async def prepare(self, request: CloudRequest) -> CloudCall:
        try:
            settings = _settings(orjson.loads(request.key.settings))
            fields = _secret_fields(request.secret)
        except ValueError as exc:  # orjson's JSONDecodeError is one
            message = f"this route's Bedrock key cannot be used ({exc}); ask an admin"
            raise CloudError(502, message) from None
        for value in fields.values():
            request.scrubber.add(value)
        body, stream = _bedrock_body(request.body, request.client_headers.get("anthropic-beta", ""))
        action = "invoke-with-response-stream" if stream else "invoke"
        count = request.api.api == ANTHROPIC_COUNT_TOKENS
        if count:
            # CountTokens counts an InvokeModel body (which needs max_tokens), as a string.
            document = orjson.loads(body)
            document.setdefault("max_tokens", 1)
            invoke = orjson.dumps(document).decode()
            body, action = (
                orjson.dumps({"input": {"invokeModel": {"body": invoke}}}),
                "count-tokens",
            )
        model = quote(request.upstream_model, safe="")
        url = f"{request.key.base_url.rstrip('/')}/model/{model}/{action}"
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", CONTENT_TYPE if stream else "application/json"),
        ]
        if "api_key" in fields:
            headers.append(("Authorization", "Bearer " + fields["api_key"]))
        else:
            credentials = _credentials(fields)
            if "role_arn" in settings:
                credentials = await _ROLES.assume(request, settings, credentials)
                for value in (credentials.access_key, credentials.secret_key, credentials.token):
                    request.scrubber.add(value)
            headers = sign(credentials, "bedrock", settings["region"], url, headers, body)
        return CloudCall(
            url,
            headers,
            body,
            reader=lambda relay: BedrockAnswer(relay, max_error=_MAX_ERROR, count=count),
        )


CREDENTIALS = BedrockCredentials()


def _settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A Bedrock key's settings, checked and bounded; ValueError saying what is wrong."""
    if not isinstance(settings, dict):
        raise ValueError("a Bedrock key's settings must be an object with its region")
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ValueError(f"unknown Bedrock settings: {', '.join(unknown)}")
    region = settings.get("region")
    if not isinstance(region, str) or not _REGION.fullmatch(region):
        raise ValueError("a Bedrock key needs its AWS region (--region, like us-east-1)")
    checked: dict[str, Any] = {"region": region}
    for name, pattern, example in (
        ("role_arn", _ROLE_ARN, "arn:aws:iam::123456789012:role/NAME"),
        ("external_id", _EXTERNAL_ID, "2 to 1224 of letters, digits and +=,.@:/-"),
    ):
        value = settings.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ValueError(f"{name} must look like {example}")
        checked[name] = value
    sts = settings.get("sts_endpoint")
    if sts is not None:
        if not isinstance(sts, str) or not re.fullmatch(r"https?://[^\s?#]{1,200}", sts):
            raise ValueError("sts_endpoint must be an http(s) URL without query")
        checked["sts_endpoint"] = sts
    if ("external_id" in checked or "sts_endpoint" in checked) and "role_arn" not in checked:
        raise ValueError("external_id and sts_endpoint are for a key that assumes a role_arn")
    return checked


def _secret_fields(secret: str) -> dict[str, str]:
    """The secret's fields: ``api_key``, or an access key; ValueError naming what is wrong."""
    fields = secret_object(
        secret,
        "a Bedrock secret",
        '{"access_key_id": ..., "secret_access_key": ..., "session_token": ... (optional)} '
        'or {"api_key": ...}',
    )
    allowed = {"api_key"} if "api_key" in fields else set(_KEY_FIELDS)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"unknown fields in the Bedrock secret: {', '.join(unknown)}")
    required = ("api_key",) if "api_key" in fields else _KEY_FIELDS[:2]
    for name in required:
        if name not in fields:
            raise ValueError(f"the Bedrock secret has no {name}")
    for name, value in fields.items():
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_FIELD or value.isspace():
            raise ValueError(f"the Bedrock secret's {name} must be a non-empty string")
    return fields


def _credentials(fields: dict[str, str]) -> Credentials:
    return Credentials(
        fields["access_key_id"], fields["secret_access_key"], fields.get("session_token")
    )


def sign(
    credentials: Credentials,
    service: str,
    region: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> list[tuple[str, str]]:
    """``headers`` with the SigV4 ones (botocore's signer) for a POST of ``body`` to ``url``."""
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    SigV4Auth(credentials, service, region).add_auth(request)
    return list(request.headers.items())


def _bedrock_body(raw: bytes, beta_header: str) -> tuple[bytes, bool]:
    """The Anthropic body as Bedrock takes it, and whether it asks for a stream."""
    document = orjson.loads(raw)
    document.pop("model", None)
    stream = document.pop("stream", False) is True
    document.pop("stream_options", None)
    document.setdefault("anthropic_version", ANTHROPIC_VERSION)
    betas = [b.strip() for b in beta_header.split(",") if b.strip()]
    if betas and "anthropic_beta" not in document:
        document["anthropic_beta"] = betas
    return orjson.dumps(document), stream


@dataclass(frozen=True, slots=True)
class _Role:
    credentials: Credentials
    expires: float


class _RoleCache:
    """A role's STS credentials per key and base credentials, one AssumeRole at a time."""

    def __init__(self) -> None:
        self._roles: dict[tuple[int, str, str], _Role] = {}
        self._pending: dict[tuple[int, str, str], asyncio.Future[_Role]] = {}

    async def assume(
        self, call: CloudRequest, settings: dict[str, Any], base: Credentials
    ) -> Credentials:
        slot = (call.key.id, call.key.ciphertext, call.key.settings)
        role = self._roles.get(slot)
        if role is not None and role.expires - _RENEW_BEFORE > time.time():
            return role.credentials
        pending = self._pending.get(slot)
        if pending is None:
            pending = asyncio.ensure_future(_assume_role(call, settings, base))
            self._pending[slot] = pending
            try:
                role = await pending
            finally:
                del self._pending[slot]
            if len(self._roles) >= _MAX_CACHED_ROLES:
                self._roles.clear()
            self._roles[slot] = role
        else:
            role = await asyncio.shield(pending)
        return role.credentials


_ROLES = _RoleCache()


async def _assume_role(call: CloudRequest, settings: dict[str, Any], base: Credentials) -> _Role:
    region = settings["region"]
    url = settings.get("sts_endpoint") or f"https://sts.{region}.amazonaws.com/"
    form = {
        "Action": "AssumeRole",
        "Version": "2011-06-15",
        "RoleArn": settings["role_arn"],
        "RoleSessionName": f"tvgate-key-{call.key.id}",
        "DurationSeconds": str(_ROLE_SECONDS),
    }
    if "external_id" in settings:
        form["ExternalId"] = settings["external_id"]
    body = urlencode(form).encode()
    headers = sign(
        base,
        "sts",
        region,
        url,
        [("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")],
        body,
    )
    where = f"STS ({url_host(url)})"
    answer = await tokenfetch.fetch(call, url, dict(headers), body, "STS")
    text = answer.body.decode("utf-8", "replace")
    if answer.status != 200:
        code = re.sub(r"[^\w.-]", "", _xml_field(text, "Code"))[:60] or f"HTTP {answer.status}"
        message = " ".join(_xml_field(text, "Message").split())[:200] or "no message"
        raise CloudError(502, f"{where} refused to assume the key's role ({code}): {message}")
    values = [_xml_field(text, n) for n in ("AccessKeyId", "SecretAccessKey", "SessionToken")]
    expiration = _xml_field(text, "Expiration")
    if not all(values) or not expiration:
        raise CloudError(502, f"{where} answered AssumeRole without credentials")
    try:
        expires = calendar.timegm(time.strptime(expiration[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        raise CloudError(502, f"{where} answered AssumeRole with no expiry it can read") from None
    # Checked as a token's lifetime: none, past, or beyond reason is refused.
    tokenfetch.lifetime(expires - time.time(), where)
    return _Role(Credentials(values[0], values[1], values[2]), expires)


def _xml_field(text: str, name: str) -> str:
    """The text of the first ``<name>`` element (STS answers are small and flat)."""
    found = re.search(f"<{name}>([^<]{{1,{_MAX_FIELD}}})</{name}>", text)
    return found.group(1).strip() if found else ""


class BedrockAnswer:
    """Bedrock's answer as the Anthropic API would give it, in front of the relay: the event
    stream as SSE (frames decoded as they come, each bounded), an error as the Anthropic
    envelope with AWS's message and its type mapped; an answer JSON passes as it is."""

    __slots__ = ("_count", "_error", "_error_type", "_pending", "_relay", "_stream", "max_error")

    def __init__(self, relay: UpstreamListener, *, max_error: int, count: bool = False) -> None:
        self._relay = relay
        #: A CountTokens answer (``{"inputTokens"}``), kept whole to be told as Anthropic's.
        self._count: bytearray | None = bytearray() if count else None
        self._stream: EventStreamToSSE | None = None
        self._error: bytearray | None = None
        self._error_type = ""
        #: Decoded bytes the relay did not take yet (it paused the transfer; curl will
        #: hand the same chunk again).
        self._pending: bytes | None = None
        self.max_error = max_error

    def on_upstream_headers(self, status: int, headers: list[tuple[str, str]]) -> None:
        ctype = next((v for n, v in headers if n.lower() == "content-type"), "")
        rewrite = None
        if status < 300 and ctype.startswith(CONTENT_TYPE):
            self._stream = EventStreamToSSE()
            rewrite = "text/event-stream; charset=utf-8"
        elif status >= 400:
            self._error = bytearray()
            self._error_type = next((v for n, v in headers if n.lower() == "x-amzn-errortype"), "")
            rewrite = "application/json"
        elif self._count is not None:
            rewrite = "application/json"
        if rewrite is not None:
            headers = [
                (n, v) for n, v in headers if n.lower() not in ("content-type", "content-length")
            ]
            headers.append(("Content-Type", rewrite))
        self._relay.on_upstream_headers(status, headers)

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        if self._error is not None:
            if len(self._error) < self.max_error:
                self._error += chunk[: self.max_error - len(self._error)]
            return True
        if self._count is not None:
            if len(self._count) < self.max_error:
                self._count += chunk[: self.max_error - len(self._count)]
            return True
        if self._stream is None:
            return self._relay.on_upstream_chunk(chunk)
        decoded = self._pending if self._pending is not None else self._stream.feed(chunk)
        if not decoded:
            return True
        if self._relay.on_upstream_chunk(decoded):
            self._pending = None
            return True
        self._pending = decoded
        return False

    def end(self) -> None:
        if self._stream is not None:
            tail = self._stream.end()
            if tail:
                self._relay.on_upstream_chunk(tail)
        elif self._error is not None:
            self._relay.on_upstream_chunk(_anthropic_error(bytes(self._error), self._error_type))
            self._error = None
        elif self._count is not None:
            try:
                counted = orjson.loads(self._count).get("inputTokens")
            except (orjson.JSONDecodeError, AttributeError):
                counted = None
            self._count = None
            if isinstance(counted, int):
                self._relay.on_upstream_chunk(orjson.dumps({"input_tokens": counted}))


def _anthropic_error(body: bytes, aws_type: str) -> bytes:
    """A Bedrock error body (``{"message": ...}``) in the Anthropic envelope."""
    message = ""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict):
        value = document.get("message") or document.get("Message")
        message = value if isinstance(value, str) else ""
        aws_type = aws_type or str(document.get("__type") or "")
    if not message:
        message = body[:500].decode("utf-8", "replace") or "Bedrock answered with an error"
    return orjson.dumps(
        {"type": "error", "error": {"type": anthropic_type(aws_type), "message": message}}
    )
