"""A fake AWS Bedrock runtime (and STS) that checks what the real one checks.

``FakeBedrock`` serves ``POST /model/{modelId}/invoke`` and
``/model/{modelId}/invoke-with-response-stream`` (also under ``/scenario/<name>``, which
picks the fake provider's scenario), and STS's ``AssumeRole`` at ``POST /sts/``. Like AWS:

* every request is authenticated: a SigV4 ``Authorization`` is recomputed with botocore's
  own signer over the request as received (method, path, query, the signed headers, the
  body's SHA-256) with the secret of the access key it names, its session token checked,
  its scope's region and service checked, its ``X-Amz-Date`` within 5 minutes; or a
  ``Bearer`` Bedrock API key. A failure is a 403 with ``x-amzn-ErrorType`` and
  ``{"message": ...}`` worded as AWS words it;
* the body is Bedrock's: a JSON object with ``anthropic_version: bedrock-2023-05-31``
  and without ``model`` or ``stream`` (a 400 ``ValidationException`` otherwise);
* the answer is Anthropic's, made by the fake Anthropic provider (``tests.fake_provider``)
  for the model in the path, so every scenario works here too: JSON for ``invoke``, real
  event-stream frames for the stream (``:event-type chunk``, payload ``{"bytes": base64 of
  the event}``, both CRCs; the last chunk carries ``amazon-bedrock-invocationMetrics``),
  an in-band error as an ``exception`` frame, errors as Bedrock's.

STS mints a session (``ASIA…`` key, secret, token) for a role it knows, when the caller
signs with a key it knows (service ``sts``) and gives the role's external id.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import orjson
import tornado.web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError

from tests.served import ServedApp
from tvgate.providers.clouds.eventstream import CONTENT_TYPE, chunk_frame, exception_frame
from tvgate.traces.sse import SSEParser

REGION = "us-east-1"
BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
BAD_TOKEN = "The security token included in the request is invalid."
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
#: Anthropic error types (the fake provider's) as Bedrock's HTTP errors and stream exceptions.
_ERRORS = {
    "invalid_request_error": (400, "ValidationException"),
    "not_found_error": (404, "ResourceNotFoundException"),
    "rate_limit_error": (429, "ThrottlingException"),
    "overloaded_error": (503, "ServiceUnavailableException"),
    "api_error": (500, "InternalServerException"),
}


@dataclass
class Recorded:
    """A request Bedrock accepted: its path, headers and body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class _Key:
    secret: str
    token: str | None = None


@dataclass
class FakeBedrock:
    """Bedrock runtime and STS on 127.0.0.1, answering with the fake Anthropic provider."""

    upstream_url: str
    upstream_key: str
    region: str = REGION
    keys: dict[str, _Key] = field(default_factory=dict)
    api_keys: set[str] = field(default_factory=set)
    #: role ARN -> the external id its trust policy asks for ("" for none)
    roles: dict[str, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    #: Every AssumeRole it answered, by role ARN.
    assumed: list[str] = field(default_factory=list)
    url: str = ""
    _served: ServedApp | None = None

    def add_key(self, token: str | None = None) -> tuple[str, str]:
        """A new access key (id, secret) it accepts (with ``token`` as its session token)."""
        key_id = "AKIA" + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        self.keys[key_id] = _Key(secret, token)
        return key_id, secret

    def add_api_key(self) -> str:
        key = "ABSK" + secrets.token_urlsafe(40)
        self.api_keys.add(key)
        return key

    def start(self) -> FakeBedrock:
        self._served = ServedApp("fake-bedrock")
        self.url = self._served.url
        self._served.start(
            [
                (r"/sts/", _STSHandler, {"fake": self}),
                (
                    r"(/scenario/[a-z_0-9]+)?/model/([^/]+)/"
                    r"(invoke|invoke-with-response-stream|count-tokens)",
                    _InvokeHandler,
                    {"fake": self},
                ),
            ]
        )
        return self

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()

    def __enter__(self) -> FakeBedrock:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _AWSError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeBedrock) -> None:
        self.fake = fake

    def check_xsrf_cookie(self) -> None:
        return None

    def aws_error(self, error: _AWSError) -> None:
        self.set_status(error.status)
        self.set_header("x-amzn-ErrorType", f"{error.kind}:http://internal.amazon.com/coral/")
        self.set_header("x-amzn-RequestId", secrets.token_hex(16))
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"message": error.message}))

    def authenticate(self, service: str) -> str:
        """The access key id (or "bearer") that signed the request; _AWSError if none did."""
        header = self.request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            if service == "bedrock" and header[7:] in self.fake.api_keys:
                return "bearer"
            raise _AWSError(403, "UnrecognizedClientException", BAD_TOKEN)
        found = _AUTH.fullmatch(header)
        if found is None:
            raise _AWSError(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        key = self.fake.keys.get(found["key"])
        if key is None:
            raise _AWSError(403, "UnrecognizedClientException", BAD_TOKEN)
        if found["region"] != self.fake.region or found["service"] != service:
            raise _AWSError(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region and service '{service}'.",
            )
        names = found["signed"].split(";")
        token = self.request.headers.get("X-Amz-Security-Token")
        if token != key.token or (token and "x-amz-security-token" not in names):
            raise _AWSError(403, "UnrecognizedClientException", BAD_TOKEN)
        stamp = self.request.headers.get("X-Amz-Date", "")
        try:
            signed_at = time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%SZ")) - time.timezone
        except ValueError:
            raise _AWSError(403, "IncompleteSignatureException", "X-Amz-Date is missing") from None
        if abs(time.time() - signed_at) > 300 or not stamp.startswith(found["date"]):
            raise _AWSError(403, "InvalidSignatureException", f"Signature expired: {stamp}")
        if "host" not in names:
            raise _AWSError(403, "InvalidSignatureException", "'Host' must be a signed header")
        request = AWSRequest(
            method=self.request.method,
            url=f"http://{self.request.host}{self.request.uri}",
            data=self.request.body,
            headers={name: self.request.headers.get(name, "") for name in names},
        )
        request.context["timestamp"] = stamp
        signer = SigV4Auth(
            Credentials(found["key"], key.secret, key.token), service, found["region"]
        )
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        if not hmac.compare_digest(expected, found["signature"]):
            raise _AWSError(403, "InvalidSignatureException", BAD_SIGNATURE)
        return found["key"]


class _STSHandler(_Handler):
    def post(self) -> None:
        try:
            self.authenticate("sts")
        except _AWSError as error:
            self._sts_error(error)
            return
        form = {k: v[0] for k, v in urllib.parse.parse_qs(self.request.body.decode()).items()}
        role = form.get("RoleArn", "")
        if form.get("Action") != "AssumeRole" or role not in self.fake.roles:
            self._sts_error(_AWSError(403, "AccessDenied", f"not authorized to assume {role}"))
            return
        if form.get("ExternalId", "") != self.fake.roles[role]:
            self._sts_error(_AWSError(403, "AccessDenied", "the external id does not match"))
            return
        key_id, secret = "ASIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
        token = "FwoG" + secrets.token_urlsafe(200)
        self.fake.keys[key_id] = _Key(secret, token)
        self.fake.assumed.append(role)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        self.set_header("Content-Type", "text/xml")
        self.finish(
            '<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleResult><Credentials>"
            f"<AccessKeyId>{key_id}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>"
            f"<SessionToken>{token}</SessionToken><Expiration>{expires}</Expiration>"
            "</Credentials></AssumeRoleResult></AssumeRoleResponse>"
        )

    def _sts_error(self, error: _AWSError) -> None:
        self.set_status(error.status)
        self.set_header("Content-Type", "text/xml")
        self.finish(
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{error.kind}</Code>"
            f"<Message>{error.message}</Message></Error></ErrorResponse>"
        )


class _InvokeHandler(_Handler):
    async def post(self, scenario: str | None, model: str, action: str) -> None:
        try:
            self.authenticate("bedrock")
            raw = self.request.body
            if action == "count-tokens":
                raw = _counted_body(raw)
            body = _bedrock_body(raw)
        except _AWSError as error:
            self.aws_error(error)
            return
        stream = action == "invoke-with-response-stream"
        self.fake.requests.append(Recorded(self.request.path, dict(self.request.headers), body))
        headers = {
            "x-api-key": self.fake.upstream_key,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        }
        headers.update(
            {k: v for k, v in self.request.headers.items() if k.lower().startswith("x-fake-")}
        )
        if body.get("anthropic_beta"):
            headers["anthropic-beta"] = ",".join(body["anthropic_beta"])
        anthropic_body = {k: v for k, v in body.items() if not k.startswith("anthropic_")}
        anthropic_body["model"] = urllib.parse.unquote(model)
        if stream:
            anthropic_body["stream"] = True
        path = "/v1/messages"
        if action == "count-tokens":
            path += "/count_tokens"
            anthropic_body.pop("max_tokens", None)
        relay = _Relay(self, stream, counting=action == "count-tokens")
        request = HTTPRequest(
            self.fake.upstream_url + (scenario or "") + path,
            method="POST",
            headers=headers,
            body=orjson.dumps(anthropic_body),
            header_callback=relay.header,
            streaming_callback=relay.chunk,
            request_timeout=120,
        )
        try:
            await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError, StreamClosedError):
            self.request.connection.close()  # type: ignore[union-attr]
            return
        relay.end()


def _counted_body(raw: bytes) -> bytes:
    """The InvokeModel body a CountTokens request counts."""
    try:
        counted = orjson.loads(raw)["input"]["invokeModel"]["body"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise _AWSError(400, "ValidationException", "input.invokeModel.body is required") from None
    if not isinstance(counted, str):
        raise _AWSError(400, "ValidationException", "input.invokeModel.body must be a string")
    return counted.encode()


def _bedrock_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _AWSError(
            400,
            "ValidationException",
            "Malformed input request, please reformat your input and try again.",
        ) from None
    if not isinstance(body, dict):
        raise _AWSError(
            400, "ValidationException", "Malformed input request: expected type: JSONObject"
        )
    for extra in ("model", "stream"):
        if extra in body:
            raise _AWSError(
                400,
                "ValidationException",
                f"Malformed input request: #: extraneous key [{extra}] is not permitted, "
                "please reformat your input and try again.",
            )
    if "anthropic_version" not in body:
        raise _AWSError(
            400,
            "ValidationException",
            "Malformed input request: #: required key [anthropic_version] not found, "
            "please reformat your input and try again.",
        )
    if body["anthropic_version"] != "bedrock-2023-05-31":
        raise _AWSError(400, "ValidationException", "Invalid API version")
    return body


class _Relay:
    """The fake provider's Anthropic answer, as Bedrock sends it."""

    def __init__(self, handler: _InvokeHandler, stream: bool, *, counting: bool = False) -> None:
        self.handler = handler
        self.stream = stream
        self.counting = counting
        self.status = 0
        self.body = bytearray()
        self.parser = SSEParser()
        self.started = time.monotonic()
        self.input_tokens = 0
        self.output_tokens = 0
        self.done = False

    def header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.status = int(line.split(" ")[1])

    def chunk(self, data: bytes) -> None:
        if self.status != 200 or not self.stream:
            self.body += data
            return
        handler = self.handler
        if not handler._headers_written:
            handler.set_header("Content-Type", CONTENT_TYPE)
            handler.set_header("x-amzn-RequestId", secrets.token_hex(16))
        for event in self.parser.feed(data):
            if self.done:
                return
            handler.write(self._frame(orjson.loads(event.data)))
            handler.flush()

    def _frame(self, event: dict[str, Any]) -> bytes:
        kind = event.get("type")
        if kind == "error":
            self.done = True
            error = event.get("error") or {}
            name = _ERRORS.get(str(error.get("type")), (500, "InternalServerException"))[1]
            return exception_frame(name[0].lower() + name[1:], error.get("message", ""))
        if kind == "message_start":
            self.input_tokens = event["message"]["usage"].get("input_tokens", 0)
        elif kind == "message_delta":
            self.output_tokens = event.get("usage", {}).get("output_tokens", 0)
        elif kind == "message_stop":
            ms = int((time.monotonic() - self.started) * 1000)
            event["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": self.input_tokens,
                "outputTokenCount": self.output_tokens,
                "invocationLatency": ms,
                "firstByteLatency": ms,
            }
        elif kind == "ping":
            return b""  # Bedrock sends no pings
        return chunk_frame(orjson.dumps(event))

    def end(self) -> None:
        handler = self.handler
        if self.status == 200 and self.stream:
            handler.finish()
            return
        if self.status == 200 and self.counting:
            handler.set_header("Content-Type", "application/json")
            counted = orjson.loads(self.body)["input_tokens"]
            handler.finish(orjson.dumps({"inputTokens": counted}))
            return
        if self.status == 200:
            answer = orjson.loads(self.body)
            usage = answer.get("usage", {})
            handler.set_header("Content-Type", "application/json")
            handler.set_header(
                "X-Amzn-Bedrock-Input-Token-Count", str(usage.get("input_tokens", 0))
            )
            handler.set_header(
                "X-Amzn-Bedrock-Output-Token-Count", str(usage.get("output_tokens", 0))
            )
            handler.finish(bytes(self.body))
            return
        try:
            error = orjson.loads(self.body).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
        status, kind = _ERRORS.get(str(error.get("type")), (500, "InternalServerException"))
        handler.aws_error(_AWSError(status, kind, error.get("message") or "Internal error"))
