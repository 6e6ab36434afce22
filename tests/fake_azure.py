"""A fake Azure OpenAI resource, with the Microsoft Entra ID token endpoint beside it.

`FakeAzure` is a `FakeProvider` (tests/fake_provider.py) whose OpenAI wire it reuses
(the same deterministic answers, SSE framing and ``x-fake-scenario`` behaviours), behind
what Azure OpenAI adds and checks:

* Paths. Deployments: ``POST /openai/deployments/{deployment}/chat/completions``
  (``/completions``, ``/embeddings``) and ``POST /openai/responses`` (the Responses API is
  not under a deployment: the deployment is the body's ``model``), each with an
  ``api-version`` query. The v1 OpenAI-compatible endpoint: ``/openai/v1/chat/completions``,
  ``/openai/v1/responses`` (and ``/embeddings``, ``/completions``, ``GET /models``), the
  deployment in the body's ``model``, ``api-version`` optional (``preview``/``latest``).
  Any other path: 404 ``{"error": {"code": "404", "message": "Resource not found"}}``.
* ``api-version``: missing on a deployments path, 404 "Resource not found" (what Azure
  answers); not one of ``API_VERSIONS``, 400 "API version not supported"; the Responses API
  before ``2025-03-01-preview``, 400.
* Credentials: an ``api-key`` header among ``api_keys``, or ``Authorization: Bearer`` with
  a token this fake's token endpoint minted and that has not expired; anything else 401
  in Azure's envelope. The token endpoint, ``POST /{tenant}/oauth2/v2.0/token``, runs the
  client-credentials grant as Entra ID does: form fields ``grant_type=client_credentials``,
  ``client_id``, ``client_secret`` and ``scope=https://cognitiveservices.azure.com/.default``
  for an app registered in ``apps`` ((tenant, client id) -> secret); errors as Entra ID's
  (``invalid_client`` AADSTS7000215 for a wrong secret and so on).
* Deployments (``deployments``: name -> model): an unknown one is 404
  ``DeploymentNotFound``; the answer's ``model`` is the deployment's model
  (``gpt-4o-2024-11-20``), not its name, as Azure answers.
* Chat Completions answers carry Azure's ``prompt_filter_results`` and each choice's
  ``content_filter_results``; a stream starts with Azure's chunk of no choices that holds
  only ``prompt_filter_results``. The scenario ``content_filter`` is Azure's 400
  ``content_filter`` error (``innererror.code`` ``ResponsibleAIPolicyViolation``).
* Headers as Azure's: ``apim-request-id``, ``x-ms-region``, ``x-ratelimit-*``; no
  ``openai-organization``.

Every request is recorded (``requests``, as `FakeProvider` does), the token endpoint's
too; ``minted`` holds the tokens minted, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from tests import fake_provider
from tests.fake_provider import SCENARIOS, FakeProvider, _Ctx, _Frame, _Handler, _HTTPError, _Reply

#: The data-plane API versions the fake serves (GA and previews, as Azure lists them).
API_VERSIONS = frozenset(
    {
        "2024-06-01",
        "2024-10-21",
        "2025-01-01-preview",
        "2025-03-01-preview",
        "2025-04-01-preview",
    }
)
#: The first API version that has the Responses API.
RESPONSES_SINCE = "2025-03-01-preview"
#: What the v1 endpoint's optional api-version may be.
V1_VERSIONS = frozenset({"preview", "latest"})
SCOPE = "https://cognitiveservices.azure.com/.default"
DEFAULT_DEPLOYMENTS = {
    "gpt4o-prod": "gpt-4o-2024-11-20",
    "mini": "gpt-4o-mini-2024-07-18",
    "embed": "text-embedding-3-small",
}
REGION = "Sweden Central"
_DEPLOYMENT_OPS = ("chat/completions", "completions", "embeddings")
_V1_OPS = ("chat/completions", "completions", "embeddings", "responses", "models")

_SAFE = {"filtered": False, "severity": "safe"}
CONTENT_FILTER_RESULTS: dict[str, Any] = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_FILTER_RESULTS: list[dict[str, Any]] = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **CONTENT_FILTER_RESULTS,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]
CONTENT_FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy. Please modify your prompt and retry. To learn more about our content filtering "
    "policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
KEY_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API endpoint "
    "for your resource."
)
TOKEN_DENIED = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired."
)
DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment "
    "within the last 5 minutes, please wait a moment and try again."
)


class _AzureError(_HTTPError):
    """An error of Azure's own (not the model's): ``{"error": payload}``."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(status, "azure", str(payload.get("message", "")))
        self.payload = payload


class _TokenError(_HTTPError):
    """An Entra ID token endpoint error: a flat OAuth error object."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(status, error, description)
        self.payload = {
            "error": error,
            "error_description": f"AADSTS{code}: {description}",
            "error_codes": [code],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": secrets.token_hex(16),
            "correlation_id": secrets.token_hex(16),
        }


def _not_found() -> _AzureError:
    return _AzureError(404, {"code": "404", "message": "Resource not found"})


class _AzureHandler(_Handler):
    """An Azure OpenAI resource's paths, then the OpenAI wire of `FakeProvider`."""

    provider: FakeAzure
    scenarios = SCENARIOS | {"content_filter"}

    def prepare(self) -> None:
        super().prepare()
        self.kind, self.deployment, self.azure_model = "", "", ""
        path = self.request.path.rstrip("/")
        parts = path.split("/")
        if len(parts) == 5 and parts[2:] == ["oauth2", "v2.0", "token"]:
            self.kind, self.tenant = "token", parts[1]
        elif path.startswith("/openai/deployments/"):
            deployment, _, op = path.removeprefix("/openai/deployments/").partition("/")
            if op in _DEPLOYMENT_OPS:
                self.kind, self.deployment = "deployments", urllib.parse.unquote(deployment)
                self.request.path = "/v1/" + op
        elif path == "/openai/responses":
            self.kind, self.request.path = "deployments", "/v1/responses"
        elif path.removeprefix("/openai/v1/") in _V1_OPS:
            self.kind, self.request.path = "v1", path.removeprefix("/openai")

    async def _serve(self) -> None:
        try:
            if self.kind == "token":
                self._mint()
                return
            self._check_path()
        except _HTTPError as error:
            self._write_error_body(error)
            return
        await super()._serve()

    # ---- Entra ID

    def _mint(self) -> None:
        if self.request.method != "POST":
            raise _TokenError(405, "invalid_request", 900561, "The endpoint only accepts POST.")
        form = {
            k: v[0] for k, v in urllib.parse.parse_qs(self.request.body.decode("latin-1")).items()
        }
        apps = self.provider.apps
        if form.get("grant_type") != "client_credentials":
            raise _TokenError(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            )
        if not any(tenant == self.tenant for tenant, _ in apps):
            raise _TokenError(400, "invalid_request", 90002, f"Tenant '{self.tenant}' not found.")
        client_id = form.get("client_id", "")
        if (self.tenant, client_id) not in apps:
            raise _TokenError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        if form.get("client_secret") != apps[(self.tenant, client_id)]:
            raise _TokenError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID.",
            )
        if form.get("scope") != SCOPE:
            raise _TokenError(
                400, "invalid_scope", 1002012, "The provided value for scope is not valid."
            )
        lifetime = self.provider.token_lifetime
        token = "eyJ0eXAiOiJKV1QifQ." + secrets.token_urlsafe(48)
        self.provider.mint(token, time.time() + lifetime)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(
            json.dumps(
                {
                    "token_type": "Bearer",
                    "expires_in": lifetime,
                    "ext_expires_in": lifetime,
                    "access_token": token,
                }
            )
        )

    # ---- the resource

    def _check_path(self) -> None:
        if not self.kind:
            raise _not_found()
        version = self.get_query_argument("api-version", None)
        if self.kind == "deployments":
            if version is None:
                raise _not_found()
            if version not in API_VERSIONS:
                raise _AzureError(
                    400, {"code": "BadRequest", "message": "API version not supported"}
                )
            if self.request.path == "/v1/responses" and version < RESPONSES_SINCE:
                raise _AzureError(
                    400,
                    {
                        "code": "BadRequest",
                        "message": "Azure OpenAI Responses API is enabled only for api-version "
                        f"{RESPONSES_SINCE} and later",
                    },
                )
        elif version is not None and version not in V1_VERSIONS:
            raise _AzureError(400, {"code": "BadRequest", "message": "API version not supported"})

    @property
    def sent_key(self) -> str:
        """The credential the request carried (``api-key``, else the bearer token), or ""."""
        return self.request.headers.get("api-key", "").strip() or super().sent_key

    def _authenticate(self, api: str) -> None:
        headers = self.request.headers
        key = headers.get("api-key", "").strip()
        authorization = headers.get("Authorization", "")
        if key:
            if key not in self.provider.api_keys:
                raise _AzureError(401, {"code": "401", "message": KEY_DENIED})
            return
        if authorization.lower().startswith("bearer "):
            if not self.provider.token_valid(authorization[7:].strip()):
                raise _AzureError(401, {"code": "401", "message": TOKEN_DENIED})
            return
        raise _AzureError(401, {"code": "401", "message": KEY_DENIED})

    def _route(self) -> Callable[[_Ctx], _Reply]:
        route = super()._route()
        if self.request.path == "/v1/models":
            return route
        return lambda ctx: self._filtered(route(self._deployed(ctx)), ctx)

    def _deployed(self, ctx: _Ctx) -> _Ctx:
        """The context with the deployment's model: Azure answers with it, not the name."""
        name = self.deployment or str(ctx.body.get("model", ""))
        model = self.provider.deployments.get(name)
        if model is None:
            raise _AzureError(404, {"code": "DeploymentNotFound", "message": DEPLOYMENT_NOT_FOUND})
        return dataclasses.replace(ctx, model=model)

    def _filtered(self, reply: _Reply, ctx: _Ctx) -> _Reply:
        """A Chat Completions answer with Azure's content filter results in it."""
        if ctx.path != "/v1/chat/completions":
            return reply
        if reply.frames is None:
            body = dict(reply.body)
            body["prompt_filter_results"] = PROMPT_FILTER_RESULTS
            body["choices"] = [
                {**choice, "content_filter_results": CONTENT_FILTER_RESULTS}
                for choice in body["choices"]
            ]
            return dataclasses.replace(reply, body=body)
        first = {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
        }
        frames = [_Frame(fake_provider._data_sse(first)), *reply.frames]
        return dataclasses.replace(reply, frames=frames)

    def _raise_scenario_error(self, scenario: str) -> None:
        if scenario == "content_filter":
            inner = {**CONTENT_FILTER_RESULTS, "jailbreak": {"filtered": True, "detected": True}}
            raise _AzureError(
                400,
                {
                    "message": CONTENT_FILTER_MESSAGE,
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": inner,
                    },
                },
            )
        super()._raise_scenario_error(scenario)

    def _write_error_body(self, error: _HTTPError) -> None:
        if not isinstance(error, _AzureError | _TokenError):
            super()._write_error_body(error)
            return
        self.clear()
        self.set_status(error.status)
        self._set_openai_headers(limited=False)
        self.set_header("Content-Type", "application/json")
        payload = error.payload if isinstance(error, _TokenError) else {"error": error.payload}
        self.finish(json.dumps(payload))

    def _set_openai_headers(self, *, limited: bool = False) -> None:
        request_id = self.upstream_request_id
        self._set_headers(
            {
                "apim-request-id": request_id,
                "x-request-id": request_id,
                "x-ms-region": REGION,
                "x-ms-rai-invoked": "true",
                "x-ms-deployment-name": self.deployment,
                "x-ratelimit-remaining-requests": "0" if limited else "99",
                "x-ratelimit-limit-requests": "100",
                "x-ratelimit-remaining-tokens": "99000",
                "x-ratelimit-limit-tokens": "100000",
                "x-content-type-options": "nosniff",
            }
        )

    @property
    def upstream_request_id(self) -> str:
        digest = hashlib.sha256(self.fake_id.encode()).hexdigest()
        return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


class FakeAzure(FakeProvider):
    """A fake Azure OpenAI resource (and Entra ID token endpoint) on 127.0.0.1."""

    handler_class = _AzureHandler

    def __init__(
        self,
        api_keys: set[str],
        *,
        apps: dict[tuple[str, str], str] | None = None,
        deployments: dict[str, str] | None = None,
        token_lifetime: int = 3599,
    ) -> None:
        super().__init__(None)
        self.api_keys = api_keys
        self.apps = apps or {}
        self.deployments = dict(DEFAULT_DEPLOYMENTS if deployments is None else deployments)
        self.token_lifetime = token_lifetime
        #: Every token minted, in order, with when it expires.
        self.minted: list[tuple[str, float]] = []
        self._tokens_lock = threading.Lock()

    def mint(self, token: str, expires_at: float) -> None:
        with self._tokens_lock:
            self.minted.append((token, expires_at))

    def token_valid(self, token: str) -> bool:
        with self._tokens_lock:
            return any(t == token and at > time.time() for t, at in self.minted)

    @property
    def token_requests(self) -> int:
        """How many requests reached the token endpoint."""
        with self._cond:
            return sum(1 for r in self.requests if r.path.endswith("/oauth2/v2.0/token"))
