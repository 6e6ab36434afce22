"""Settings: one object built from a TOML file, then ``TVGATE_*`` environment variables.

Every setting has a default that runs tvgate on one machine with nothing else
installed (SQLite, the local keyring, tokens minted by tvgate). A TOML file
(``--config FILE`` or ``TVGATE_CONFIG``) overrides defaults; an environment
variable named ``TVGATE_`` + the setting's name in upper case overrides both.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "TVGATE_"


class ConfigError(ValueError):
    """A setting has a value tvgate cannot use."""


@dataclasses.dataclass(slots=True)
class Settings:
    """Every knob of a tvgate process. Field docs double as the README's settings table."""

    #: host:port the gateway listens on.
    listen: str = "127.0.0.1:8080"
    #: Directory for the SQLite file, the local master key, the trace spool.
    data_dir: str = "./data"
    #: ``sqlite:///path`` or ``postgresql://user@host:port/db``; empty: SQLite in data_dir.
    database_url: str = ""
    #: Where provider keys are encrypted: ``local`` (AES-256-GCM) or ``vault``.
    keyring: str = "local"
    #: Base64 32-byte master key of the local keyring; empty: a 0600 file in data_dir.
    master_key: str = ""
    #: Seconds to wait for a TCP/TLS connection to a provider.
    connect_timeout: float = 10.0
    #: Seconds an upstream transfer may go without receiving a byte before it is aborted.
    idle_timeout: int = 300
    #: Largest request body accepted, in bytes, checked before and after decompression.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Simultaneous upstream transfers per process (curl's max_clients).
    max_clients: int = 1000
    #: Allow upstream base URLs that are plain http or resolve to loopback/private addresses.
    allow_private_upstreams: bool = False
    #: Seconds a route, key or token lookup is cached in memory; changes made in another
    #: process are in force after at most this long.
    cache_ttl: float = 5.0
    #: Seconds a decrypted provider key stays in memory.
    key_cache_ttl: float = 300.0
    #: Bytes the gateway may hold for one slow client before it pauses the upstream.
    client_buffer_bytes: int = 1024 * 1024
    #: Traces waiting to be written; when full, the request path never blocks (see traces).
    trace_queue_size: int = 10000
    #: Largest number of traces written in one database transaction.
    trace_batch_size: int = 500
    #: Log level: debug, info, warning, error.
    log_level: str = "info"
    #: Base URL printed for users (e.g. behind nginx); empty: derived from ``listen``.
    public_url: str = ""
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
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Refuse settings that would fail later in a less clear way."""
    if ":" not in settings.listen:
        raise ConfigError("listen must be host:port")
    try:
        settings.port  # noqa: B018 - parses the port
    except ValueError:
        raise ConfigError(f"listen: bad port in {settings.listen!r}") from None
    if settings.keyring not in ("local", "vault"):
        raise ConfigError("keyring must be 'local' or 'vault'")
    url = settings.resolved_database_url
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError("database_url must start with sqlite:/// or postgresql://")
    if settings.max_body_bytes <= 0 or settings.max_clients <= 0 or settings.idle_timeout <= 0:
        raise ConfigError("max_body_bytes, max_clients and idle_timeout must be positive")
    if settings.workers < 0 or settings.drain_timeout < 0:
        raise ConfigError("workers and drain_timeout must not be negative")
    if settings.metrics_listen:
        _host, sep, port = settings.metrics_listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"metrics_listen must be host:port, not {settings.metrics_listen!r}")
