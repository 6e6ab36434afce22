"""The vault keyring: provider keys encrypted by the transit engine of Vault or OpenBao.

Owns the gateway's side of Vault: the hvac clients, the gateway's own token (an
AppRole login or a configured token, renewed before it expires, and replaced by a
new AppRole login when renewal is no longer possible), and the mapping of every
Vault failure onto :class:`KeyringUnavailable` (Vault cannot serve: unreachable,
timed out, sealed, 5xx, permission or key missing) or :class:`KeyringError` (this
ciphertext does not decrypt for this key: tampered, copied from another row,
or under a retired key version).

The transit key is ``derived``: every request carries a context built from the
key's org, id and owner, so Vault derives a different key per row and a
ciphertext copied onto another row, user or org fails to decrypt. tvgate stores
Vault's ciphertext as is (``vault:v<N>:…``), which also tells a process holding
both backends which one a ciphertext belongs to.

hvac is synchronous: these methods run in a thread pool (the gateway's
PlaintextCache, ``readyz``) or in the CLI, never on the IOLoop. Each thread has
its own hvac client (requests sessions are not meant to be shared); the token
is shared, under a lock when it changes. Messages never contain a token, a
secret_id, a plaintext or a ciphertext: they may end up in a log or a response.

A Vault that accepts connections and never answers (hung, frozen) would make every
request wait the full ``timeout``: after the first timeout the keyring is *stalled*
and refuses every request at once (KeyringUnavailable, a 503 for a call) while a
probe thread of its own asks Vault every ``PROBE_INTERVAL`` seconds; the first answer
ends the stall.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import hvac
import hvac.exceptions
import requests

from tvgate.config import Settings
from tvgate.keyring import KeyContext, KeyringError, KeyringUnavailable

log = logging.getLogger("tvgate.keyring.vault")
T = TypeVar("T")

#: Renew the token once this share of its lease has passed.
RENEW_AT = 2 / 3
#: A renewal that leaves less than this share of the login TTL means the token is near
#: its max TTL: log in again instead (AppRole), rather than ride it to the end.
RELOGIN_BELOW = 1 / 2

#: A context no key row can have (ids start at 1): what ``check()`` encrypts to prove
#: that the gateway can use its transit key.
PROBE_CONTEXT = KeyContext(org_id=0, key_id=0, owner_id=None)
#: Seconds between two probes of a Vault that timed out.
PROBE_INTERVAL = 1.0

#: Vault's transit ``error`` texts that are about the ciphertext or its context, as
#: opposed to the key store (which is unavailable, not the row broken).
_CIPHERTEXT_ERRORS = (
    "cipher: message authentication failed",
    "invalid ciphertext",
    "ciphertext or signature version is disallowed by policy",
    "ciphertext is not a valid",
    "invalid key version",
)


def context_b64(context: KeyContext) -> str:
    """The transit derivation context of a key: base64 of its org, id and owner."""
    return base64.b64encode(context.as_bytes()).decode()


class VaultKeyring:
    """Encrypt, decrypt and rewrap provider keys with one derived transit key."""

    name = "vault"

    def __init__(
        self,
        addr: str,
        *,
        token: str = "",
        role_id: str = "",
        secret_id: str = "",
        mount: str = "transit",
        key: str = "tvgate",
        ca_cert: str = "",
        timeout: float = 5.0,
        approle_mount: str = "approle",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (token or (role_id and secret_id)):
            raise KeyringUnavailable("the vault keyring needs a token or an AppRole login")
        self.addr = addr.rstrip("/")
        self.mount = mount.strip("/")
        self.key = key
        self.verify: bool | str = ca_cert or True
        self.timeout = timeout
        self.approle_mount = approle_mount
        self.clock = clock
        self._role_id = role_id
        self._secret_id = secret_id
        self._token = "" if self.uses_approle else token
        self._lock = threading.Lock()
        self._local = threading.local()
        # When to renew (-1: never), and the TTL a fresh login gives (to notice a token near
        # its max TTL). 0 makes the first call log in, or look the configured token up.
        self._renew_at = 0.0
        self._expires_at = math.inf
        self._renewable = False
        self._login_ttl = 0.0
        self._known = False  # token facts learnt (login response or lookup-self)
        self.token_accessor = ""  # not a secret: identifies the token in Vault's audit log
        self.logins = 0
        self.renewals = 0
        self._failure = ""  # the cause of the current outage, logged once
        #: Set from a timeout until the probe thread sees Vault answer again.
        self._stalled = threading.Event()
        self._probe_lock = threading.Lock()
        self._prober: threading.Thread | None = None
        #: Requests that timed out, and requests refused at once while stalled (metrics).
        self.timeouts = 0
        self.refused_fast = 0
        base = f"/v1/{quote(self.mount, safe='/')}"
        name = quote(self.key, safe="")
        self._paths = {op: f"{base}/{op}/{name}" for op in ("encrypt", "decrypt", "rewrap")}

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultKeyring:
        if not settings.vault_addr:
            raise KeyringUnavailable("the vault keyring needs vault_addr")
        return cls(
            settings.vault_addr,
            token=settings.vault_token,
            role_id=settings.vault_role_id,
            secret_id=settings.vault_secret_id,
            mount=settings.vault_transit_mount,
            key=settings.vault_transit_key,
            ca_cert=settings.vault_ca_cert,
            timeout=settings.vault_timeout,
        )

    @property
    def uses_approle(self) -> bool:
        return bool(self._role_id and self._secret_id)

    # --- the Keyring interface ---

    def encrypt(self, plaintext: str, context: KeyContext) -> str:
        body = {
            "plaintext": base64.b64encode(plaintext.encode()).decode(),
            "context": context_b64(context),
        }
        data = self._transit("encrypt", body)
        ciphertext = data.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext.startswith("vault:v"):
            raise KeyringUnavailable("vault answered encrypt without a ciphertext")
        return ciphertext

    def decrypt(self, ciphertext: str, context: KeyContext) -> str:
        if not ciphertext.startswith("vault:v"):
            raise KeyringError("not a vault keyring ciphertext")
        data = self._transit("decrypt", {"ciphertext": ciphertext, "context": context_b64(context)})
        try:
            return base64.b64decode(data["plaintext"], validate=True).decode()
        except (KeyError, TypeError, ValueError):
            raise KeyringError("key ciphertext does not decrypt for this key") from None

    def check(self) -> None:
        """Prove the gateway can use its key now: token valid, Vault unsealed, key there."""
        self.encrypt("probe", PROBE_CONTEXT)

    # --- rotation ---

    def rewrap(self, ciphertext: str, context: KeyContext) -> str:
        """The same secret under the newest key version; Vault never returns the plaintext."""
        data = self._transit("rewrap", {"ciphertext": ciphertext, "context": context_b64(context)})
        rewrapped = data.get("ciphertext")
        if not isinstance(rewrapped, str):
            raise KeyringUnavailable("vault answered rewrap without a ciphertext")
        return rewrapped

    def rewrap_batch(self, items: Sequence[tuple[str, KeyContext]]) -> list[str | None]:
        """Rewrap many ciphertexts in one request; None for an item that does not rewrap."""
        if not items:
            return []
        batch = [{"ciphertext": ct, "context": context_b64(ctx)} for ct, ctx in items]
        try:
            data = self._transit("rewrap", {"batch_input": batch})
        except KeyringError:
            # Vault fails the whole request when every item fails; find out item by item.
            return [self._rewrap_or_none(ct, ctx) for ct, ctx in items]
        results = data.get("batch_results")
        if not isinstance(results, list) or len(results) != len(items):
            raise KeyringUnavailable("vault answered a batch rewrap with the wrong item count")
        out: list[str | None] = []
        for result in results:
            rewrapped = result.get("ciphertext") if isinstance(result, dict) else None
            out.append(
                rewrapped if isinstance(rewrapped, str) and not result.get("error") else None
            )
        return out

    def _rewrap_or_none(self, ciphertext: str, context: KeyContext) -> str | None:
        try:
            return self.rewrap(ciphertext, context)
        except KeyringError:
            return None

    # --- the token ---

    def _client(self) -> hvac.Client:
        client: hvac.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = hvac.Client(url=self.addr, verify=self.verify, timeout=self.timeout)
            self._local.client = client
        return client

    def _ensure_token(self) -> str:
        """A token that is valid for a while yet: log in, renew, or log in again."""
        if self._token and (self._renew_at < 0 or self.clock() < self._renew_at):
            return self._token
        with self._lock:
            now = self.clock()
            if self._token and (self._renew_at < 0 or now < self._renew_at):
                return self._token
            if not self._token:
                self._login()
            elif not self._known:
                self._lookup_self()
            elif self._renewable and now < self._expires_at:
                self._renew()
            elif self.uses_approle:
                self._login()
            else:
                # A configured token that cannot be renewed: use it until Vault refuses it.
                self._renew_at = self._expires_at if now < self._expires_at else -1.0
            return self._token

    def _login(self) -> None:
        client = self._client()
        client.token = None
        response = self._guard(
            "log in to vault (AppRole)",
            lambda: client.auth.approle.login(
                self._role_id, self._secret_id, use_token=False, mount_point=self.approle_mount
            ),
        )
        auth = response.get("auth") or {}
        token = auth.get("client_token")
        if not isinstance(token, str) or not token:
            raise KeyringUnavailable("vault answered the AppRole login without a token")
        self._token = token
        self.token_accessor = str(auth.get("accessor", ""))
        self.logins += 1
        self._learn(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")), True)
        log.info("logged in to vault with AppRole (token accessor %s)", self.token_accessor)

    def _lookup_self(self) -> None:
        client = self._client()
        client.token = self._token
        response = self._guard("look up the vault token", client.auth.token.lookup_self)
        data = response.get("data") or {}
        self.token_accessor = str(data.get("accessor", ""))
        self._learn(float(data.get("ttl") or 0), bool(data.get("renewable")), True)
        if self._renewable and self._renew_at >= 0 and self.clock() >= self._renew_at:
            self._renew()

    def _renew(self) -> None:
        client = self._client()
        client.token = self._token
        try:
            response = self._guard("renew the vault token", client.auth.token.renew_self)
        except KeyringUnavailable:
            if not self.uses_approle:
                raise
            # Renewal is impossible (revoked, expired, past its max TTL): a new login is not.
            self._login()
            return
        auth = response.get("auth") or {}
        lease = float(auth.get("lease_duration") or 0)
        self.renewals += 1
        if self.uses_approle and lease < self._login_ttl * RELOGIN_BELOW:
            log.info("vault token is near its max TTL; logging in again")
            self._login()
            return
        self._learn(lease, bool(auth.get("renewable")), False)

    def _learn(self, ttl: float, renewable: bool, fresh: bool) -> None:
        now = self.clock()
        self._known = True
        self._renewable = renewable
        if fresh:
            self._login_ttl = ttl
        if ttl <= 0:
            # A token without expiry (a root or periodic-less token): nothing to renew.
            self._renew_at, self._expires_at = -1.0, math.inf
        else:
            self._renew_at, self._expires_at = now + ttl * RENEW_AT, now + ttl

    def _drop_token(self, token: str) -> None:
        """Vault refused this token: the next call logs in again (AppRole only)."""
        with self._lock:
            if self._token == token and self.uses_approle:
                self._token = ""
                self._known = False

    # --- requests ---

    def _transit(self, op: str, body: dict[str, Any], *, probe: bool = False) -> dict[str, Any]:
        if self._stalled.is_set() and not probe:
            self.refused_fast += 1
            raise KeyringUnavailable(
                f"cannot {op} with vault transit: vault did not answer within "
                f"{self.timeout:g} s; waiting for it to answer again"
            )
        path = self._paths[op]
        for attempt in (1, 2):
            token = self._ensure_token()
            client = self._client()
            client.token = token
            try:
                response = self._guard(
                    f"{op} with vault transit", partial(client.adapter.post, path, json=body)
                )
            except _Denied:
                if attempt == 1 and self.uses_approle:
                    # The token may have been revoked or expired early: log in once more.
                    self._drop_token(token)
                    continue
                raise KeyringUnavailable(
                    f"vault denied {op} on transit key {self.key!r}: check the tvgate policy "
                    "and the token"
                ) from None
            data = response.get("data") if isinstance(response, dict) else None
            if not isinstance(data, dict):
                raise KeyringUnavailable(f"vault answered {op} without data")
            return data
        raise KeyringUnavailable(f"vault denied {op}")  # pragma: no cover - loop returns

    def _guard(self, what: str, call: Callable[[], T]) -> T:
        """Run one Vault request; turn every failure into a message without secrets."""
        try:
            result = call()
        except hvac.exceptions.InvalidRequest as exc:
            text = " ".join(str(e) for e in (exc.errors or [])) or str(exc.args[0] or "")
            if any(marker in text for marker in _CIPHERTEXT_ERRORS):
                self._mark_available()  # Vault answered: it is the row that is wrong
                raise KeyringError("key ciphertext does not decrypt for this key") from None
            if "permission denied" in text or "invalid secret id" in text or "invalid role" in text:
                raise self._denied(what) from None
            if "encryption key not found" in text or "no handler" in text:
                cause = f"transit key {self.key!r} not found on mount {self.mount!r}"
            else:
                cause = "vault refused the request (HTTP 400)"
            raise self._unavailable(what, cause) from None
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise self._denied(what) from None
        except hvac.exceptions.VaultError as exc:
            cause = {
                hvac.exceptions.VaultDown: "vault is sealed or in standby",
                hvac.exceptions.VaultNotInitialized: "vault is not initialized",
                hvac.exceptions.InvalidPath: (
                    f"no such path in vault (is the transit mount {self.mount!r} enabled?)"
                ),
                hvac.exceptions.InternalServerError: "vault answered HTTP 500",
                hvac.exceptions.BadGateway: "vault answered HTTP 502",
                hvac.exceptions.RateLimitExceeded: "vault answered HTTP 429",
            }.get(type(exc), f"vault answered {type(exc).__name__}")
            raise self._unavailable(what, cause) from None
        except requests.exceptions.Timeout:
            self._stall()
            raise self._unavailable(
                what, f"vault did not answer within {self.timeout:g} s", _Timeout
            ) from None
        except requests.exceptions.RequestException as exc:
            raise self._unavailable(what, _unreachable_cause(exc)) from None
        self._mark_available()
        return result

    # --- a Vault that does not answer ---

    def _stall(self) -> None:
        """A request timed out: refuse the next ones at once, and probe until Vault answers."""
        self.timeouts += 1
        with self._probe_lock:
            self._stalled.set()
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(
                    target=self._probe_until_answered, name="tvgate-vault-probe", daemon=True
                )
                self._prober.start()

    def _probe_until_answered(self) -> None:
        """Ask Vault every PROBE_INTERVAL; any answer (even a refusal) ends the stall, as
        requests then fail or succeed quickly on their own."""
        body = {
            "plaintext": base64.b64encode(b"probe").decode(),
            "context": context_b64(PROBE_CONTEXT),
        }
        while True:
            time.sleep(PROBE_INTERVAL)
            try:
                self._transit("encrypt", body, probe=True)
            except _Timeout:
                continue
            except (KeyringUnavailable, KeyringError):
                pass  # Vault answered (sealed, refused): requests now fail quickly themselves
            with self._probe_lock:
                self._stalled.clear()
                self._prober = None
            return

    # Vault's state is logged when it changes (down, sealed, back), not on every request.

    def _mark_available(self) -> None:
        if self._failure:
            self._failure = ""
            log.warning("vault is available again")

    def _unavailable(
        self, what: str, cause: str, kind: type[KeyringUnavailable] = KeyringUnavailable
    ) -> KeyringUnavailable:
        message = f"cannot {what}: {cause}"
        if cause != self._failure:
            self._failure = cause
            # The address only in the log: the message also reaches /readyz.
            log.warning("%s (vault at %s)", message, self.addr)
        return kind(message)

    def _denied(self, what: str) -> _Denied:
        message = f"vault denied the request to {what}"
        if self._failure != "denied":
            self._failure = "denied"
            log.warning("%s", message)
        return _Denied(message)


def _unreachable_cause(exc: requests.exceptions.RequestException) -> str:
    """Why a request did not reach Vault, in words: refused, no such host, TLS."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "the TLS handshake with vault failed (is its CA in TVGATE_VAULT_CA_CERT?)"
    text = str(exc)
    if "Connection refused" in text:
        return "vault is unreachable: connection refused (is it running on that port?)"
    if "NameResolutionError" in text or "Name or service not known" in text:
        return "vault is unreachable: its host name does not resolve"
    return "vault is unreachable"


class _Denied(KeyringUnavailable):
    """Vault refused the token (403): the key store is unusable until the token is fixed."""


class _Timeout(KeyringUnavailable):
    """Vault accepted the request and did not answer within the timeout."""
