"""Sign-in and sign-out pages: Visdom Trace email and password, a token, or a local user.

Failed sign-ins are limited per (client address, email): ``identity.sessions.LoginThrottle``,
and per client address across emails (password spraying): ``AddressThrottle``, its
refusals audited; the address from ``BaseHandler.client_ip`` (X-Forwarded-For from
trusted proxies only).
"""

from __future__ import annotations

from admin_ui.base import SESSION_COOKIE, UIHandler
from tvgate import services
from tvgate.db import DatabaseUnavailable
from tvgate.identity import (
    VIA_PASSWORD,
    VIA_VISDOM,
    AuthError,
    IdentityUnavailable,
    NotLinked,
    OrgSelectionError,
    Principal,
)
from tvgate.identity.sessions import audit_address_locked, end_session, start_session
from tvgate.keyring import KeyringUnavailable


class SignInLocked(Exception):
    """This (address, email), or this address, failed too often lately; the form answers
    429."""


class LoginHandler(UIHandler):
    def get(self) -> None:
        if self.current_user is not None:
            self.redirect("/ui/")
            return
        self.render(
            "login.html", error="", email="", org="", visdom=self.gateway.visdom is not None
        )

    async def post(self) -> None:
        email = self.get_body_argument("email", "").strip()
        password = self.get_body_argument("password", "")
        token = self.get_body_argument("token", "").strip()
        org = self.get_body_argument("org", "").strip() or None
        address = self.client_ip
        try:
            principal, visdom_session = await self._throttled_sign_in(
                address, email, password, token, org
            )
        except SignInLocked:
            self._fail(
                429, "Too many sign-in attempts. Wait a few minutes and try again.", email, org
            )
            return
        except AuthError:
            self._fail(401, "Wrong email, password or token.", email, org)
            return
        except NotLinked as exc:
            # The sign-in is good but names an org or user tvgate has not linked to it: say
            # so, with the operator's command, rather than "wrong password".
            self._fail(403, f"Sign-in refused: {exc}.", email, org)
            return
        except OrgSelectionError as exc:
            self._fail(403, f"{exc}. Enter the org to sign in to.", email, org)
            return
        except (IdentityUnavailable, DatabaseUnavailable):
            self._fail(503, "Sign-in is unavailable right now; try again shortly.", email, org)
            return
        # A new session id at every sign-in: a session id planted before is never promoted.
        throttle, keyring = self.gateway.login_throttle, self.gateway.keyring

        def signed_in() -> str:
            throttle.succeeded(address, email)
            return start_session(principal, address, keyring, visdom_session)

        try:
            session_id = await self.gateway.runner.run(signed_in)
        except (KeyringUnavailable, DatabaseUnavailable):
            self._fail(503, "Sign-in is unavailable right now; try again shortly.", email, org)
            return
        self.set_signed_cookie(
            SESSION_COOKIE,
            session_id,
            expires_days=None,
            httponly=True,
            samesite="Lax",
            secure=self.secure_cookies,
            path="/ui/",
        )
        self.redirect("/ui/")

    async def _throttled_sign_in(
        self, address: str, email: str, password: str, token: str, org: str | None
    ) -> tuple[Principal, str | None]:
        """Sign in unless this address, or this (address, email), is locked; a wrong
        credential counts for both."""
        gateway = self.gateway
        throttle, spraying, runner = (
            gateway.login_throttle,
            gateway.address_throttle,
            gateway.runner,
        )
        if spraying.locked(address):
            await runner.run(lambda: audit_address_locked(address, email))
            raise SignInLocked
        if await runner.run(lambda: throttle.locked(address, email)):
            raise SignInLocked
        try:
            return await self._sign_in(email, password, token, org)
        except AuthError:
            spraying.failed(address)
            await runner.run(lambda: throttle.failed(address, email))
            raise

    async def _sign_in(
        self, email: str, password: str, token: str, org: str | None
    ) -> tuple[Principal, str | None]:
        """Who signs in, and the Visdom Trace session the web session will be held to."""
        gateway = self.gateway
        if token:
            principal = await self.authenticate_token(token, org)
            return principal, token if principal.via == VIA_VISDOM else None
        if not email or not password:
            raise AuthError("email and password, or a token, are required")
        local = await gateway.runner.run(lambda: services.verify_local_password(email, password))
        if local:
            chosen = [u for u in local if org is None or u.org.name == org]
            if len(chosen) != 1:
                names = ", ".join(sorted(u.org.name for u in local))
                raise OrgSelectionError(f"you are a member of several orgs ({names})")
            user = chosen[0]
            return Principal.of(user, via=VIA_PASSWORD), None
        if gateway.visdom is None:
            raise AuthError("no such local user")
        # The password goes to Visdom Trace once and is never stored; its session token is
        # kept only sealed by the keyring, to re-check the web session against.
        visdom_token = await gateway.visdom.login(email, password)
        return await self.authenticate_token(visdom_token, org), visdom_token

    def _fail(self, status: int, message: str, email: str, org: str | None) -> None:
        self.set_status(status)
        self.render(
            "login.html",
            error=message,
            email=email,
            org=org or "",
            visdom=self.gateway.visdom is not None,
        )


class LogoutHandler(UIHandler):
    async def post(self) -> None:
        session_id = self.get_signed_cookie(SESSION_COOKIE, max_age_days=31)
        if session_id:
            sid = session_id.decode()
            await self.gateway.runner.run(lambda: end_session(sid))
        self.clear_cookie(SESSION_COOKIE, path="/ui/")
        self.redirect("/ui/login")


default_handlers = [
    (r"/ui/login", LoginHandler),
    (r"/ui/logout", LogoutHandler),
]
