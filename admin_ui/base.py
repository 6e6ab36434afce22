"""UIHandler: what every page gets — its signed-in principal, safe headers, HTML errors."""

from __future__ import annotations

from typing import Any

from tvgate.identity import Principal
from tvgate.identity.sessions import session_principal
from tvgate.web import BaseHandler

SESSION_COOKIE = "tvgate_session"

#: Nothing inline, nothing from elsewhere: the pages work on an offline network, and an
#: injected <script> would not run even if escaping ever failed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class UIHandler(BaseHandler):
    current_user: Principal | None

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Cache-Control", "no-store")

    # Pages are signed in by cookie, so forms carry an XSRF token (BaseHandler turns the
    # check off for the token-authenticated API and proxy).
    def check_xsrf_cookie(self) -> None:
        super(BaseHandler, self).check_xsrf_cookie()

    @property
    def secure_cookies(self) -> bool:
        return self.request.protocol == "https" or self.gateway.settings.public_url.startswith(
            "https://"
        )

    async def prepare(self) -> None:
        self.current_user = None
        session_id = self.get_signed_cookie(SESSION_COOKIE, max_age_days=31)
        if session_id:
            settings = self.gateway.settings
            sid = session_id.decode()
            self.current_user = await self.gateway.runner.run(
                lambda: session_principal(
                    sid, settings.session_idle_timeout, settings.session_max_age
                )
            )

    def get_current_user(self) -> Principal | None:
        return self.current_user

    def get_login_url(self) -> str:
        return "/ui/login"

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        message = self._reason if status_code < 500 else "Something went wrong in tvgate."
        self.render("error.html", status=status_code, message=message)
