"""BaseHandler: what every tvgate handler gets — its services, its caller, and errors.

Every surface (the proxy, the JSON API, the web UI) signs a token in through one
method, ``BaseHandler.authenticate_token`` (JupyterHub's single ``get_current_user``;
``token_required`` is the per-handler flag), runs service calls through one,
``run_service``, and maps what refuses a request to its HTTP status in one place,
``refusal_of``. Each surface still answers in its own format: its ``write_error``
renders the ``Refusal`` it is given (the provider's error envelope here, the API's JSON
in ``tvgate.api.base``, an HTML page in ``admin_ui.base``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tornado
from tornado import httputil
from tornado.httputil import HTTPHeaders, format_timestamp
from tornado.web import HTTPError, RequestHandler

from tvgate.db import DatabaseUnavailable
from tvgate.forwarded import client_address
from tvgate.gateway import Gateway
from tvgate.identity import (
    ORG_HEADER,
    IdentityError,
    IdentityUnavailable,
    MissingCredential,
    Principal,
    credential_from_headers,
)
from tvgate.identity.authenticator import subscription_credentials
from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI
from tvgate.providers import ProviderAPI, provider_api
from tvgate.providers.misdirected import ERROR_CODE, ERROR_TYPE, envelope_api, unknown_endpoint
from tvgate.services import ServiceError

#: Strict-Transport-Security when ``public_url`` is https: a year, subdomains too.
HSTS = "max-age=31536000; includeSubDomains"
#: What a request without a credential is told, on every surface.
NO_CREDENTIAL = "no credential: send your tvgate token as x-api-key or Authorization: Bearer"

T = TypeVar("T")

#: The Server header of every answer, as Tornado writes it.
_SERVER = f"TornadoServer/{tornado.version}"


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """The Date header's text for a Unix second (its format has no finer unit)."""
    return format_timestamp(second)


class Refusal(HTTPError):
    """A request refused, with the message for the client (shown in the surface's format)."""

    def __init__(self, status: int, message: str, *, reason: str | None = None) -> None:
        super().__init__(status, reason=reason)
        self.message = message


def refusal_of(exc: BaseException) -> tuple[int, str] | None:
    """The HTTP status and message of an error that refuses a request, whichever surface
    it reached; None for anything else (a bug: 500, its detail only in the log)."""
    if isinstance(exc, ServiceError):
        return exc.status, str(exc)
    if isinstance(exc, IdentityError):
        return exc.status, exc.public
    if isinstance(exc, DatabaseUnavailable):
        return 503, "database unavailable; try again shortly"
    return None


class BaseHandler(RequestHandler):
    #: Sign the request in by its token before the handler runs (JupyterHub's per-handler
    #: auth flags): the JSON API and ``/v1/models`` do. The proxy signs in once the body is
    #: read (an oversized body gets its 413 first); the UI by its session cookie.
    token_required = False
    #: What ``run_service`` and ``token_required`` refuse a request with: this surface's
    #: ``write_error`` renders it.
    refusal_type: type[Refusal] = Refusal
    #: The caller, once signed in by ``authenticate_token``.
    principal: Principal
    #: The credential the request came with (only ever passed on to be sealed).
    credential: str
    #: The surface passes a caller's own Claude subscription on (the proxy's endpoints):
    #: such a request names its caller in ``x-tvgate-token`` instead of ``Authorization``.
    takes_subscription = False
    #: The bearer of the caller's own subscription, when the request carries one: only ever
    #: sent to the provider, never stored or logged (tvgate.proxy.subscription).
    subscription = ""

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.application.settings["gateway"]
        return gateway

    def clear(self) -> None:
        # Tornado's clear(), which every request runs, less its formatting of the Date
        # header through email.utils (27,000 instructions): the same text serves a second.
        self._headers = HTTPHeaders(
            {
                "Server": _SERVER,
                "Content-Type": "text/html; charset=UTF-8",
                "Date": _http_date(int(time.time())),
            }
        )
        self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = httputil.responses[200]

    def set_default_headers(self) -> None:
        # Served over https (nginx in front): browsers must never try plain http here,
        # where a network attacker could strip TLS and read the session cookie.
        if self.gateway.settings.public_url.startswith("https://"):
            self.set_header("Strict-Transport-Security", HSTS)

    def prepare(self) -> Awaitable[None] | None:
        return self._require_token() if self.token_required else None

    async def _require_token(self) -> None:
        try:
            await self.authenticate_token()
        except IdentityError as exc:
            raise self.refusal_type(exc.status, exc.public) from None

    async def authenticate_token(
        self, token: str | None = None, org: str | None = None
    ) -> Principal:
        """Who the request's token is (``x-api-key`` or a Bearer ``Authorization``, or
        ``x-tvgate-token`` beside a subscription's bearer where the surface takes one) in
        the org its ``x-tvgate-org`` names; or ``token`` in ``org`` when given (a sign-in
        form's). Sets ``principal`` and ``credential`` (and ``subscription``); raises an
        ``IdentityError``, which carries its status."""
        if token is None:
            headers = self.request.headers
            org = headers.get(ORG_HEADER)
            passed = subscription_credentials(headers) if self.takes_subscription else None
            if passed is None:
                token = credential_from_headers(headers)
            else:
                token, self.subscription = passed
        if not token:
            raise MissingCredential(NO_CREDENTIAL)
        try:
            self.principal = await self.gateway.auth.authenticate(token, org)
        except DatabaseUnavailable:
            raise IdentityUnavailable("the database is unavailable") from None
        self.credential = token
        return self.principal

    async def run_service(self, fn: Callable[[], T]) -> T:
        """Run one service call in the database pool; a refusal (``refusal_of``) becomes
        this surface's ``Refusal``."""
        try:
            return await self.gateway.runner.run(fn)
        except Exception as exc:
            refused = refusal_of(exc)
            if refused is None:
                raise
            raise self.refusal_type(*refused) from None

    @property
    def client_ip(self) -> str:
        """The client's address: X-Forwarded-For's, only when the peer is a trusted proxy."""
        return client_address(
            self.request.remote_ip or "",
            self.request.headers.get_list("X-Forwarded-For"),
            self.gateway.trusted_proxies,
        )

    def check_xsrf_cookie(self) -> None:
        # The proxy and the JSON API authenticate every request by a token in a header,
        # never by a cookie, so a cross-site form cannot act as a user here. Pages that
        # use cookies (admin_ui) restore the check.
        return None

    def error_api(self) -> ProviderAPI:
        """Which API's envelope an error on this request should use."""
        if "anthropic-version" in self.request.headers or self.request.path.startswith(
            ("/anthropic/", "/proxy/anthropic/", "/vertex/")
        ):
            return provider_api(PROVIDER_ANTHROPIC)
        return provider_api(PROVIDER_OPENAI)

    def send_api_error(
        self, status: int, message: str, api: ProviderAPI | None = None, **headers: str
    ) -> None:
        """Answer with ``status`` and the JSON error envelope of ``api`` (else the request's)."""
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.set_header(name.replace("_", "-"), value)
        self.finish((api or self.error_api()).error_body(status, message))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Refusals, unhandled exceptions and tornado's own HTTPErrors: the envelope, never
        # a traceback.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Refusal):
            reason = exc.message
        else:
            reason = self._reason if status_code < 500 else "internal error in tvgate"
        self.set_header("Content-Type", "application/json")
        self.finish(self.error_api().error_body(status_code, reason))


class NotFoundHandler(BaseHandler):
    """Any path tvgate does not serve: the endpoint does not exist, in the envelope of the
    API the request looks like, with a hint at the base URL (``tvgate.providers.misdirected``)."""

    def prepare(self) -> None:
        request = self.request
        unknown = unknown_endpoint(
            request.method or "GET", request.path, self.gateway.settings.base_url
        )
        api = envelope_api(unknown, self.error_api(), "x-api-key" in request.headers)
        self.clear()
        self.set_status(unknown.status)
        self.set_header("Content-Type", "application/json")
        self.finish(
            api.error_body(unknown.status, unknown.message, kind=ERROR_TYPE, code=ERROR_CODE)
        )
