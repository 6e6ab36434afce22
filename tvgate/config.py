"""Settings: one object built from a TOML file, then ``TVGATE_*`` environment variables.

Every setting has a default that runs tvgate on one machine with nothing else
installed (SQLite, the local keyring, tokens minted by tvgate). A TOML file
(``--config FILE`` or ``TVGATE_CONFIG``) overrides defaults; an environment
variable named ``TVGATE_`` + the setting's name in upper case overrides both.
Any other ``TVGATE_`` variable is a mistake (a misspelled setting is otherwise
silently ignored) unless it is one of ``NON_SETTING_NAMES``: ``serve`` and the
other commands warn about it at start.

When nothing names the data directory, :func:`discover_data_dir` finds the one a
user expects: ``./data``, or that of the tvgate checkout the command runs inside.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from tvgate.forwarded import parse_networks

ENV_PREFIX = "TVGATE_"
#: ``TVGATE_`` variables the project uses that are not settings: the settings file, the
#: token users export for their tools (the UI's "Connect your tool" blocks), and the
#: PostgreSQL server of the test suite and of the benchmark.
NON_SETTING_NAMES = frozenset(
    {"TVGATE_CONFIG", "TVGATE_TOKEN", "TVGATE_TEST_PG_DSN", "TVGATE_BENCH_PG_DSN"}
)
#: Log levels ``log_level`` accepts (in any case).
LOG_LEVELS = ("debug", "info", "warning", "error")


class UpstreamRules(TypedDict):
    """Where this gateway lets a provider key point: the keyword arguments of the services'
    ``add_key`` and ``update_key`` that come from the settings (``Settings.upstream_rules``)."""

    allow_private: bool
    allow_private_user: bool
    gateway_urls: tuple[str, ...]


class ConfigError(ValueError):
    """A setting has a value tvgate cannot use."""


@dataclasses.dataclass(slots=True)
class Settings:
    """Every knob of a tvgate process. Field docs double as the README's settings table."""

    #: host:port the gateway listens on.
    listen: str = "127.0.0.1:8080"
    #: Directory for the SQLite file, the local master key, the trace spool (``--data-dir``);
    #: unset: ``./data``, or ``data/`` of the tvgate checkout the command runs inside.
    data_dir: str = "./data"
    #: ``sqlite:///path`` or ``postgresql://user@host:port/db``; empty: SQLite in data_dir.
    database_url: str = ""
    #: Where provider keys are encrypted: ``local`` (AES-256-GCM) or ``vault``.
    keyring: str = "local"
    #: Base64 32-byte master key of the local keyring; empty: a 0600 file in data_dir.
    master_key: str = ""
    #: Vault (or OpenBao) address, ``https://vault.example.com:8200``; needed by the vault
    #: keyring, and by a local gateway that should also read vault ciphertexts (migration).
    vault_addr: str = ""
    #: A Vault token for the gateway (renewed before expiry while it is renewable); prefer
    #: AppRole in production. Never shown in logs or messages.
    vault_token: str = dataclasses.field(default="", repr=False)
    #: AppRole role_id; with vault_secret_id, tvgate logs in, renews its token, and logs in
    #: again when renewal is no longer possible.
    vault_role_id: str = ""
    #: AppRole secret_id (a credential: keep it out of TOML files in version control).
    vault_secret_id: str = dataclasses.field(default="", repr=False)
    #: Mount path of the transit secrets engine.
    vault_transit_mount: str = "transit"
    #: Name of the transit key (created with ``derived=true`` by ``tvgate vault setup``).
    vault_transit_key: str = "tvgate"
    #: PEM file of the CA that signed Vault's TLS certificate; empty: the system's CAs.
    vault_ca_cert: str = ""
    #: Seconds to wait for Vault to connect or answer before the key store counts as unavailable.
    vault_timeout: float = 5.0
    #: Seconds to wait for a TCP/TLS connection to a provider.
    connect_timeout: float = 10.0
    #: Where a Claude subscription's calls go when an org passes them through
    #: (``subscription_passthrough``): the Anthropic API, which checks the OAuth bearer.
    subscription_base_url: str = "https://api.anthropic.com"
    #: Seconds an upstream transfer may go without receiving a byte before it is aborted.
    idle_timeout: int = 300
    #: Seconds a cloud key's credential exchange (a token endpoint, STS) may take, whole.
    token_timeout: float = 30.0
    #: Largest request body accepted, in bytes, checked before and after decompression.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Simultaneous upstream transfers per process (curl's max_clients).
    max_clients: int = 1000
    #: Allow upstream base URLs that are plain http or resolve to loopback/private addresses.
    allow_private_upstreams: bool = False
    #: The same for users' own keys (any member may add one where the org allows user keys),
    #: independent of allow_private_upstreams, which is for admins' and the operator's keys.
    allow_private_user_upstreams: bool = False
    #: Seconds a route, key, token or price lookup is cached in memory; changes made in another
    #: process are in force after at most this long.
    cache_ttl: float = 5.0
    #: Seconds a decrypted provider key stays in memory.
    key_cache_ttl: float = 300.0
    #: Bytes the gateway may hold for one slow client before it pauses the upstream.
    client_buffer_bytes: int = 1024 * 1024
    #: Bytes of one answer kept for its trace (a JSON body, or a stream's assembled answer);
    #: past that the capture is cut and the trace marked truncated, its usage still read.
    capture_max_bytes: int = 8 * 1024 * 1024
    #: Seconds a new connection may take to send its first request's headers before it is
    #: closed (later requests on a kept-alive connection may wait up to an hour).
    header_timeout: float = 10.0
    #: Connections open at once from one peer address; 0: no cap. Peers in
    #: trusted_proxies (nginx, which carries many clients) are not capped.
    max_connections_per_address: int = 256
    #: Seconds a database connection may go unused before it is closed.
    db_idle_timeout: float = 60.0
    #: Seconds after which a database connection in steady use is closed between two uses
    #: (and opened again), so a PostgreSQL smart shutdown is never held up for long.
    db_max_age: float = 600.0
    #: Calls open at once across every gateway process sharing the database; 0: no cap.
    max_concurrent_calls: int = 0
    #: Seconds a call waits for a free slot under a concurrency cap before a 429.
    queue_timeout: float = 10.0
    #: Seconds between a process's batches to the shared budget, rate and slot counters:
    #: the accuracy of budgets across processes (docs/governance.md).
    governance_sync_interval: float = 1.0
    #: Traces waiting to be written; when full, the request path never blocks (see traces).
    trace_queue_size: int = 10000
    #: Largest number of traces written in one database transaction.
    trace_batch_size: int = 500
    #: Log level: debug, info, warning, error.
    log_level: str = "info"
    #: Base URL printed for users (e.g. behind nginx); empty: derived from ``listen``.
    public_url: str = ""
    #: Org every principal acts in, whatever their memberships say; empty: not pinned.
    pinned_org: str = ""
    #: Visdom Trace server that checks ``tvs_`` tokens and sign-ins; empty: not used.
    visdom_url: str = ""
    #: Seconds a Visdom Trace token that checked out is trusted without asking again.
    visdom_cache_ttl: float = 60.0
    #: Seconds a rejected Visdom Trace token stays rejected without asking again.
    visdom_negative_ttl: float = 5.0
    #: Seconds between the Visdom Trace pusher's rounds (``tvgate visdom connect``).
    visdom_push_interval: float = 2.0
    #: Seconds a tool session may be idle before its ``session_end`` is sent.
    visdom_idle_timeout: float = 1800.0
    #: Seconds one POST to Visdom Trace's ingestion may take, its whole answer included.
    visdom_push_timeout: float = 30.0
    #: Expected ``iss`` of JWTs; empty: JWT sign-in is off.
    jwt_issuer: str = ""
    #: Expected ``aud`` of JWTs; empty: not checked.
    jwt_audience: str = ""
    #: Comma-separated algorithms accepted (RS256, ES256, EdDSA, HS256...); never ``none``.
    jwt_algorithms: str = "RS256,ES256,EdDSA"
    #: JWKS URL of the issuer (cached; refetched on an unknown ``kid``).
    jwt_jwks_url: str = ""
    #: Least seconds between two JWKS fetches (an unknown ``kid`` triggers one).
    jwt_jwks_refetch_interval: float = 60.0
    #: PEM file with the issuer's public key, instead of a JWKS URL.
    jwt_public_key: str = ""
    #: Shared secret for HS256 tokens.
    jwt_secret: str = ""
    #: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
    jwt_leeway: float = 30.0
    #: Claim holding the stable user id.
    jwt_claim_user_id: str = "sub"
    #: Claim holding the email address.
    jwt_claim_email: str = "email"
    #: Claim holding the org name (empty claim: ``pinned_org`` must be set).
    jwt_claim_org: str = "org"
    #: Claim holding the role (owner/admin → admin, auditor → auditor, else member).
    jwt_claim_role: str = "role"
    #: Link a JWT to a tvgate user made without an outside id (``users add``) by its email,
    #: when the token says ``email_verified: true``; Visdom Trace sign-ins never are.
    link_users_by_email: bool = False
    #: Seconds a ``tvg_`` token lasts at most when someone signed in with a JWT mints it
    #: (tvgate cannot ask a JWT issuer later whether the person is still there).
    jwt_token_max_age: float = 86400.0
    #: Secret that signs web UI session cookies; empty: a 0600 file in data_dir.
    cookie_secret: str = ""
    #: Seconds a web UI session may sit unused before it ends.
    session_idle_timeout: float = 8 * 3600.0
    #: Seconds a web UI session lasts at most.
    session_max_age: float = 7 * 86400.0
    #: Failed sign-ins allowed per client address and email in 15 minutes (successes do not
    #: count); counted in the database, so every worker and gateway sees the same count.
    login_attempts: int = 10
    #: Failed sign-ins allowed from one client address in 15 minutes whatever the emails
    #: (password spraying); counted in each worker's memory.
    login_attempts_per_address: int = 50
    #: Comma-separated addresses or CIDR networks of the reverse proxies (nginx) whose
    #: ``X-Forwarded-For`` names the client; empty: none, the peer is the client.
    trusted_proxies: str = ""
    #: URL the push sink POSTs batches of traces to; empty: no push sink.
    sink_url: str = ""
    #: Secret for the push sink's HMAC-SHA256 signature.
    sink_secret: str = ""
    #: Traces per push.
    sink_batch_size: int = 100
    #: Seconds between pushes.
    sink_interval: float = 5.0
    #: OTLP/HTTP traces endpoint each call's span is exported to
    #: (``https://collector:4318/v1/traces``); empty: no spans.
    otlp_endpoint: str = ""
    #: Headers of each export, ``key=value,key=value`` (an API key): never logged.
    otlp_headers: str = dataclasses.field(default="", repr=False)
    #: Seconds one export may take, retries included, before its spans are counted dropped.
    otlp_timeout: float = 10.0
    #: Worker processes sharing the listening socket; 0: one per CPU core (``serve --workers``).
    workers: int = 0
    #: Seconds a stop (SIGTERM) waits for open calls and streams to finish before cutting them.
    drain_timeout: float = 30.0
    #: host:port where each worker also serves ``/metrics``, worker k on port + k; empty: none
    #: (``/metrics`` on ``listen`` answers for whichever worker took the connection).
    metrics_listen: str = ""

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0] or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def worker_count(self) -> int:
        """How many worker processes ``serve`` runs."""
        return self.workers or os.cpu_count() or 1

    @property
    def base_url(self) -> str:
        return self.public_url.rstrip("/") or f"http://{self.host}:{self.port}"

    def allows_private_upstream(self, users_own_key: bool) -> bool:
        """Whether a key may reach http and private upstreams: a user's own key has its
        own switch."""
        if users_own_key:
            return self.allow_private_user_upstreams
        return self.allow_private_upstreams

    @property
    def gateway_urls(self) -> tuple[str, ...]:
        """Where this gateway answers: its listen address and its public URL (a provider
        base URL that is one of these would make a route call the gateway itself)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address, as a URL writes it
        listen = f"http://{host}:{self.port}"
        return (listen, self.public_url) if self.public_url else (listen,)

    @property
    def upstream_rules(self) -> UpstreamRules:
        return UpstreamRules(
            allow_private=self.allow_private_upstreams,
            allow_private_user=self.allow_private_user_upstreams,
            gateway_urls=self.gateway_urls,
        )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).resolve() / 'tvgate.db'}"


def _coerce(name: str, field_type: Any, raw: Any) -> Any:
    """Turn a TOML value or an environment string into the field's type."""
    try:
        if field_type in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if field_type in (int, "int"):
            return int(raw)
        if field_type in (float, "float"):
            return float(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"setting {name!r}: cannot use {raw!r}") from None


#: A ``name = tvgate`` line of setup.cfg or pyproject.toml: the folder is a tvgate checkout.
_CHECKOUT_NAME = re.compile(r"""^name\s*=\s*["']?tvgate["']?\s*$""", re.MULTILINE)


def _is_checkout(folder: Path) -> bool:
    for manifest in ("setup.cfg", "pyproject.toml"):
        try:
            if _CHECKOUT_NAME.search((folder / manifest).read_text(errors="replace")):
                return True
        except OSError:
            continue
    return False


def _ours(path: Path, *, others_may_write: int) -> bool:
    """``path`` belongs to the user running the command, and no one else may write it
    (``others_may_write``: the mode bits that would let them)."""
    try:
        status = path.stat()
    except OSError:
        return False
    return status.st_uid == os.geteuid() and not status.st_mode & others_may_write


def discover_data_dir(cwd: Path) -> str:
    """The data directory when no setting names one: ``./data`` if it exists; else, run
    from a folder inside a tvgate checkout, the checkout's ``data/`` if it holds a
    database (the one ``make run`` created); else ``./data``, which serve and migrate
    create and other commands refuse to (tvgate.cli).

    A database found this way is used only if it is the user's own: a ``data/tvgate.db``
    someone else could have put or changed in a parent folder (``/tmp``, a shared
    folder) would receive the user's keys and tokens, or hand them routes and keys of
    the other's choosing. So the file must be the user's and writable by them alone
    (tvgate creates it 0600), and its folder the user's and not writable by all (a
    group-writable one is what a umask of 002 makes, and another user's file put there
    is refused by the first rule)."""
    if (cwd / "data").is_dir():
        return "./data"
    for folder in cwd.parents:
        data = folder / "data"
        if (
            (data / "tvgate.db").is_file()
            and _is_checkout(folder)
            and _ours(data / "tvgate.db", others_may_write=0o022)
            and _ours(data, others_may_write=0o002)
        ):
            return str(data)
    return "./data"


def load_settings(
    config_file: str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from defaults, then the TOML file, then the environment."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    if path:
        try:
            with open(path, "rb") as fh:
                document = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, raw in document.items():
            if key not in fields:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, fields[key].type, raw)
    for name, field in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, field.type, raw)
    if "data_dir" not in values:
        values["data_dir"] = discover_data_dir(Path.cwd())
    settings = Settings(**values)
    validate(settings)
    return settings


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``TVGATE_`` variable that is no setting (say, a misspelled one),
    naming the setting it probably meant."""
    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    warnings = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known or name in NON_SETTING_NAMES:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"ignoring {name}: no such setting{hint}")
    return warnings


def otlp_header_pairs(text: str) -> dict[str, str]:
    """The ``otlp_headers`` setting as a dict; raises ConfigError naming the bad pair only
    by its position (a value is a secret)."""
    headers: dict[str, str] = {}
    for index, pair in enumerate(text.split(","), 1):
        if not pair.strip():
            continue
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ConfigError(f"otlp_headers: pair {index} is not name=value")
        headers[name] = value.strip()
    return headers


def _check_port(setting: str, address: str, lowest: int = 1) -> None:
    """``address`` is host:port with a port from ``lowest`` to 65535 (a larger one would be
    cut to 16 bits by the socket layer: 80800 listened on 15264)."""
    _host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ConfigError(
            f"{setting} must be host:port with a port from {lowest} to 65535, not {address!r}"
        )


def validate(settings: Settings) -> None:
    """Refuse settings that would fail later in a less clear way."""
    # Port 0: a port the kernel chooses, which serve logs and writes to --port-file.
    _check_port("listen", settings.listen, lowest=0)
    if settings.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"log_level must be one of {', '.join(LOG_LEVELS)}, not {settings.log_level!r}"
        )
    if settings.keyring not in ("local", "vault"):
        raise ConfigError("keyring must be 'local' or 'vault'")
    if bool(settings.vault_role_id) != bool(settings.vault_secret_id):
        raise ConfigError("vault_role_id and vault_secret_id go together (AppRole)")
    if settings.keyring == "vault":
        if not settings.vault_addr:
            raise ConfigError("keyring 'vault' needs vault_addr")
        if not (settings.vault_token or settings.vault_role_id):
            raise ConfigError(
                "keyring 'vault' needs vault_role_id + vault_secret_id or vault_token"
            )
    if settings.vault_addr and not settings.vault_addr.startswith(("http://", "https://")):
        raise ConfigError("vault_addr must be an http(s) URL")
    if settings.vault_timeout <= 0:
        raise ConfigError("vault_timeout must be positive")
    subscription = settings.subscription_base_url
    if (
        not subscription.startswith(("https://", "http://"))
        or "?" in subscription
        or "#" in subscription
    ):
        raise ConfigError("subscription_base_url must be an http(s) URL without query or fragment")
    if settings.token_timeout <= 0:
        raise ConfigError("token_timeout must be positive")
    url = settings.resolved_database_url
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError("database_url must start with sqlite:/// or postgresql://")
    algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
    if settings.jwt_issuer:
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise ConfigError("jwt_algorithms must list real algorithms; 'none' is never accepted")
        if not (settings.jwt_jwks_url or settings.jwt_public_key or settings.jwt_secret):
            raise ConfigError("JWT sign-in needs jwt_jwks_url, jwt_public_key or jwt_secret")
    if settings.jwt_token_max_age <= 0:
        raise ConfigError("jwt_token_max_age must be a positive number of seconds")
    if (
        min(
            settings.visdom_push_interval,
            settings.visdom_idle_timeout,
            settings.visdom_push_timeout,
        )
        <= 0
    ):
        raise ConfigError(
            "visdom_push_interval, visdom_idle_timeout and visdom_push_timeout must be positive"
        )
    if settings.sink_url and not settings.sink_secret:
        raise ConfigError("sink_url needs sink_secret, so receivers can check what they get")
    if settings.max_body_bytes <= 0 or settings.max_clients <= 0 or settings.idle_timeout <= 0:
        raise ConfigError("max_body_bytes, max_clients and idle_timeout must be positive")
    if settings.capture_max_bytes <= 0 or settings.header_timeout <= 0:
        raise ConfigError("capture_max_bytes and header_timeout must be positive")
    if settings.max_connections_per_address < 0:
        raise ConfigError("max_connections_per_address must not be negative")
    if settings.db_idle_timeout <= 0 or settings.db_max_age <= 0:
        raise ConfigError("db_idle_timeout and db_max_age must be positive")
    if settings.max_concurrent_calls < 0 or settings.queue_timeout < 0:
        raise ConfigError("max_concurrent_calls and queue_timeout must not be negative")
    if not 0.05 <= settings.governance_sync_interval <= 60:
        raise ConfigError("governance_sync_interval must be between 0.05 and 60 seconds")
    if settings.workers < 0 or settings.drain_timeout < 0:
        raise ConfigError("workers and drain_timeout must not be negative")
    try:
        parse_networks(settings.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from None
    if settings.login_attempts <= 0:
        raise ConfigError("login_attempts must be positive")
    if settings.login_attempts_per_address <= 0:
        raise ConfigError("login_attempts_per_address must be positive")
    if settings.metrics_listen:
        _check_port("metrics_listen", settings.metrics_listen)
    if settings.otlp_endpoint and not settings.otlp_endpoint.startswith(("http://", "https://")):
        raise ConfigError("otlp_endpoint must be an http(s) URL")
    if settings.otlp_timeout <= 0:
        raise ConfigError("otlp_timeout must be positive")
    otlp_header_pairs(settings.otlp_headers)
