"""BaseHandler: what every tvgate handler gets — its services, and errors in the right envelope."""

from __future__ import annotations

from typing import Any

from tornado.web import RequestHandler

from tvgate.forwarded import client_address
from tvgate.gateway import Gateway
from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI
from tvgate.providers import error_body
from tvgate.providers.misdirected import (
    ERROR_CODE,
    ERROR_TYPE,
    envelope_is_anthropic,
    unknown_endpoint,
)

#: Strict-Transport-Security when ``public_url`` is https: a year, subdomains too.
HSTS = "max-age=31536000; includeSubDomains"


class BaseHandler(RequestHandler):
    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.application.settings["gateway"]
        return gateway

    def set_default_headers(self) -> None:
        # Served over https (nginx in front): browsers must never try plain http here,
        # where a network attacker could strip TLS and read the session cookie.
        if self.gateway.settings.public_url.startswith("https://"):
            self.set_header("Strict-Transport-Security", HSTS)

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

    def error_provider(self) -> str:
        """Which API's envelope an error on this request should use."""
        if "anthropic-version" in self.request.headers or self.request.path.startswith(
            "/anthropic/"
        ):
            return PROVIDER_ANTHROPIC
        return PROVIDER_OPENAI

    def send_api_error(
        self, status: int, message: str, provider: str | None = None, **headers: str
    ) -> None:
        """Answer with ``status`` and the provider's JSON error envelope."""
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.set_header(name.replace("_", "-"), value)
        self.finish(error_body(provider or self.error_provider(), status, message))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Unhandled exceptions and tornado's own HTTPErrors: the envelope, never a traceback.
        reason = self._reason if status_code < 500 else "internal error in tvgate"
        self.set_header("Content-Type", "application/json")
        self.finish(error_body(self.error_provider(), status_code, reason))


class NotFoundHandler(BaseHandler):
    """Any path tvgate does not serve: the endpoint does not exist, in the envelope of the
    API the request looks like, with a hint at the base URL (``tvgate.providers.misdirected``)."""

    def prepare(self) -> None:
        request = self.request
        unknown = unknown_endpoint(
            request.method or "GET", request.path, self.gateway.settings.base_url
        )
        anthropic = envelope_is_anthropic(
            unknown, self.error_provider(), "x-api-key" in request.headers
        )
        self.clear()
        self.set_status(unknown.status)
        self.set_header("Content-Type", "application/json")
        self.finish(
            error_body(
                PROVIDER_ANTHROPIC if anthropic else PROVIDER_OPENAI,
                unknown.status,
                unknown.message,
                kind=ERROR_TYPE,
                code=ERROR_CODE,
            )
        )
