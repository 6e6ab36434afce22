"""A credential endpoint run by someone hostile: a token endpoint (Google's JWT grant,
Entra ID's client credentials) or STS, misbehaving as the first segment of its path says.

A cloud key names where its credentials are exchanged (a service account's ``token_uri``,
an Azure key's ``authority``, a Bedrock key's ``sts_endpoint``), so the endpoint is the
admin's to choose; this is what tvgate must survive there. Every answer carries ``raw``
(a marker that must never reach a client or a log) and, where it says so, echoes what it
was sent (the secret in it, which must not come back either). ``/{mode}/...``:

* ``big``: a well-formed answer of 200 KB;
* ``drip``: a 200 whose body comes a byte at a time, forever (until the client leaves);
* ``badjson``: a 200 cut short (JSON, or STS's XML), echoing the request;
* ``redirect``: a 302 to ``/ok/...`` (a good answer, which must never be fetched);
* ``html``: a 200 sign-in page, echoing the request;
* ``noexpiry``: a token without ``expires_in`` (STS: credentials without ``Expiration``);
* ``absurd``: a token said to live 10^12 s (STS: expiring in the year 9999);
* ``echo``: a 400 OAuth error (STS: an ``InvalidGrant`` error) whose description quotes
  what it was sent (a signed JWT, a client secret);
* ``ok``: a well-formed answer.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import urllib.parse

import tornado.iostream
import tornado.web

from tests.served import ServedApp

MODES = ("big", "drip", "badjson", "redirect", "html", "noexpiry", "absurd", "echo")


def _sts(expiration: str | None, padding: str = "") -> str:
    expires = f"<Expiration>{expiration}</Expiration>" if expiration is not None else ""
    return (
        '<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<AssumeRoleResult><Credentials>"
        f"<AccessKeyId>ASIA{secrets.token_hex(8).upper()}</AccessKeyId>"
        f"<SecretAccessKey>{secrets.token_urlsafe(30)}</SecretAccessKey>"
        f"<SessionToken>FwoG{secrets.token_urlsafe(60)}</SessionToken>{expires}"
        f"</Credentials></AssumeRoleResult>{padding}</AssumeRoleResponse>"
    )


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: HostileTokenEndpoint) -> None:
        self.fake = fake

    async def post(self, mode: str, rest: str) -> None:
        with self.fake.lock:
            self.fake.hits.append(mode)
            self.fake.sent.append(self.request.body.decode("latin-1"))
        sts = rest.startswith("sts")
        raw, echoed = self.fake.raw, self.request.body.decode("latin-1")
        later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        token = {"access_token": "hostile-" + secrets.token_urlsafe(20), "token_type": "Bearer"}
        if mode == "redirect":
            self.redirect(f"{self.fake.url}/ok/{rest}", status=302)
            return
        if mode == "drip":
            await self._drip()
            return
        if mode == "html":
            self.set_header("Content-Type", "text/html")
            self.finish(
                f"<html><body><h1>Sign in</h1><p>{raw}</p><pre>{echoed}</pre></body></html>"
            )
            return
        self.set_header("Content-Type", "text/xml" if sts else "application/json")
        if mode == "echo":
            self.set_status(400)
            if sts:
                self.finish(
                    f"<ErrorResponse><Error><Code>InvalidGrant</Code><Message>sent {echoed}"
                    f"</Message></Error><Note>{raw}</Note></ErrorResponse>"
                )
            else:
                # The secret part first: a description cut short still quotes it.
                form = urllib.parse.parse_qs(echoed)
                signed = form.get("assertion", [""])[0].rsplit(".", 1)[-1]
                quoted = f"{signed}{form.get('client_secret', [''])[0]} from {echoed}"
                said = {"error": "invalid_grant", "error_description": quoted}
                self.finish(json.dumps({**said, "note": raw}))
        elif mode == "big":
            padding = raw * (200_000 // len(raw))
            if sts:
                self.finish(_sts(later, f"<Padding>{padding}</Padding>"))
            else:
                self.finish(json.dumps({**token, "expires_in": 3600, "padding": padding}))
        elif mode == "badjson":
            if sts:
                self.finish(f"<AssumeRoleResponse><Credentials><AccessKeyId>{raw}{echoed}")
            else:
                self.finish(f'{{"access_token": "{raw}", "echo": "{echoed}", "expires_in": 36')
        elif mode == "noexpiry":
            self.finish(_sts(None) if sts else json.dumps({**token, "note": raw}))
        elif mode == "absurd":
            if sts:
                self.finish(_sts("9999-12-31T23:59:59Z"))
            else:
                self.finish(json.dumps({**token, "expires_in": 10**12, "note": raw}))
        else:
            self.finish(_sts(later) if sts else json.dumps({**token, "expires_in": 3600}))

    async def _drip(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Content-Length", "100000")
        self.fake.dripping.set()
        try:
            for _ in range(600):
                self.write(b" ")
                await self.flush()
                await asyncio.sleep(0.2)
        except tornado.iostream.StreamClosedError:
            with self.fake.lock:
                self.fake.hung_up += 1


class HostileTokenEndpoint:
    """The endpoint: ``url``, what it was asked (``hits``: the mode of each request;
    ``sent``: its body), how many dripping answers the client hung up on (``hung_up``)."""

    def __init__(self) -> None:
        self.raw = "hostile-raw-" + secrets.token_hex(6)
        self.hits: list[str] = []
        #: The body of each request, as sent.
        self.sent: list[str] = []
        self.hung_up = 0
        self.dripping = threading.Event()
        self.lock = threading.Lock()
        self._served = ServedApp("hostile-token")
        self.url = self._served.url

    def start(self) -> HostileTokenEndpoint:
        self._served.start([(r"/([a-z]+)/(.*)", _Handler, {"fake": self})])
        return self

    def stop(self) -> None:
        self._served.stop()

    def __enter__(self) -> HostileTokenEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
