"""UIHandler: what every page gets — its signed-in principal, safe headers, HTML errors."""

from __future__ import annotations

from typing import Any

from tornado.web import HTTPError

from tvgate.db import DatabaseUnavailable
from tvgate.identity import AuthError, IdentityUnavailable, Principal, SealedOrigin
from tvgate.identity.sessions import end_session, session_principal
from tvgate.models import OUTCOME_OK, ROLE_ADMIN, ROLE_AUDITOR
from tvgate.web import BaseHandler, Refusal

SESSION_COOKIE = "tvgate_session"

#: Roles that may open the org's admin pages (auditors read them; only admins change).
READERS = (ROLE_ADMIN, ROLE_AUDITOR)

#: Messages a redirect after a successful form may ask for, by code: a page shows only
#: these, never text from the URL (a link cannot make tvgate say something it did not).
NOTICES = {
    "saved": "Saved.",
    "deleted": "Deleted.",
    "key-added": "Key added. Its secret is stored encrypted and will not be shown again.",
    "key-rotated": "Secret replaced. The old one is no longer used for new requests.",
    "route-added": "Route added.",
    "token-revoked": "Token revoked.",
    "token-minted": "Token minted.",
}


class PageError(Refusal):
    """A page or action refused, with a message for the person (shown escaped)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)


#: Nothing inline, nothing from elsewhere: the pages work on an offline network, and an
#: injected <script> would not run even if escaping ever failed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class UIHandler(BaseHandler):
    current_user: Principal | None
    refusal_type = PageError

    def set_default_headers(self) -> None:
        super().set_default_headers()
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
            self.current_user = await self._session_user(session_id.decode())

    async def _session_user(self, sid: str) -> Principal | None:
        """The session's principal, once what it was opened with still holds."""
        gateway, settings = self.gateway, self.gateway.settings

        def lookup() -> tuple[Principal | None, SealedOrigin | None]:
            return session_principal(sid, settings.session_idle_timeout, settings.session_max_age)

        principal, origin = await gateway.runner.run(lookup)
        if principal is None or origin is None or not gateway.origins.due(origin):
            return principal
        try:
            await gateway.origins.confirm(origin)
        except AuthError:
            # The Visdom Trace sign-in behind it is gone: so is this session.
            await gateway.runner.run(lambda: end_session(sid))
            return None
        except (IdentityUnavailable, DatabaseUnavailable):
            raise PageError(
                503, "Your sign-in cannot be checked right now; try again shortly."
            ) from None
        principal, _origin = await gateway.runner.run(lookup)  # with the role it has now
        return principal

    def get_current_user(self) -> Principal | None:
        # prepare() sets current_user; before it (the XSRF check runs earlier) nobody is
        # signed in. Reading self.current_user here would recurse through the property.
        return None

    def get_login_url(self) -> str:
        return "/ui/login"

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Refusal):
            message = exc.message
        elif status_code == 403 and isinstance(exc, HTTPError) and "xsrf" in str(exc).lower():
            message = "This form has expired or did not come from tvgate. Reload the page."
        else:
            message = self._reason if status_code < 500 else "Something went wrong in tvgate."
        self.render("error.html", status=status_code, message=message)

    # --- what the pages share ---

    @property
    def user(self) -> Principal:
        """The signed-in principal (pages are @authenticated, so there is one)."""
        assert self.current_user is not None
        return self.current_user

    @property
    def is_admin(self) -> bool:
        return self.current_user is not None and self.current_user.role == ROLE_ADMIN

    def require(self, *roles: str) -> None:
        """Refuse the page (403) to a role not listed; the services check again."""
        if self.user.role not in roles:
            raise PageError(403, "Your role may not open this page.")

    def done(self, url: str, notice: str = "saved") -> None:
        """After a successful form: back to a page (post/redirect/get) with a notice."""
        sep = "&" if "?" in url else "?"
        self.redirect(f"{url}{sep}ok={notice}")

    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        notice = self.get_query_argument("ok", "") if self.request.method == "GET" else ""
        namespace.update(
            notice=NOTICES.get(notice, ""),
            is_admin=self.is_admin,
            is_reader=self.current_user is not None and self.current_user.role in READERS,
            nav_path=self.request.path,
            # For templates, which compare a role or an outcome with these.
            ROLE_AUDITOR=ROLE_AUDITOR,
            OUTCOME_OK=OUTCOME_OK,
        )
        return namespace


class PageNotFoundHandler(UIHandler):
    """Any ``/ui/…`` path no page has: the UI's own 404 page, not the proxy's JSON error."""

    async def prepare(self) -> None:
        await super().prepare()  # the signed-in person still sees the navigation
        raise PageError(404, f"tvgate has no page {self.request.path}.")


#: Last in the URL table, after every page.
not_found_handlers = [(r"/ui/.*", PageNotFoundHandler)]
