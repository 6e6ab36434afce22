"""What a graceful stop and a reload need of a running process, kept by its ``Gateway``.

The proxy calls and Responses WebSockets in flight (``InFlight``): a stop waits for the
calls, ends those still open at the drain timeout, and closes the sockets once idle. The
settings a SIGHUP applies without a restart (``RELOADABLE_SETTINGS``), and ``reload``,
which sets them on what the ``Gateway`` built. When a stop or a reload happens is
``tvgate.server``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tvgate.config import Settings
    from tvgate.gateway import Gateway

log = logging.getLogger("tvgate")

#: Settings a SIGHUP applies to a running process. Everything else (listen,
#: database, keyring, workers, queue sizes, max_clients) is built once at start
#: and needs a restart; a reload that changes one of those says so in the log.
RELOADABLE_SETTINGS = (
    "log_level",
    "cache_ttl",
    "key_cache_ttl",
    "connect_timeout",
    "idle_timeout",
    "max_body_bytes",
    "client_buffer_bytes",
    "capture_max_bytes",
    "drain_timeout",
    "queue_timeout",
)


class Interruptible(Protocol):
    """A call in progress that a stop can end (``ProxyCall``)."""

    def shut_down(self) -> None: ...


class Closable(Protocol):
    """An open client connection that a stop closes once it is idle."""

    def close_if_idle(self) -> None: ...


class InFlight:
    """Proxy calls in progress in this process, so that a stop can wait for them, and end
    those still open at the drain timeout; and the open Responses WebSockets
    (``tvgate.proxy.websocket``), closed at a stop once they have no call running, as an
    HTTP keep-alive connection is told ``Connection: close``."""

    def __init__(self) -> None:
        self.calls: set[Interruptible] = set()
        self.sockets: set[Closable] = set()
        #: True once the process stops: a socket serves no new call and is closed.
        self.stopping = False

    @property
    def count(self) -> int:
        return len(self.calls)

    def enter(self, call: Interruptible) -> None:
        self.calls.add(call)

    def leave(self, call: Interruptible) -> None:
        self.calls.discard(call)

    def stop_sockets(self) -> None:
        """The process stops: close every socket with no call running; the others close
        when their call ends."""
        self.stopping = True
        for socket in list(self.sockets):
            socket.close_if_idle()

    def shut_down(self) -> None:
        """End every call still open: each tells its client the gateway is stopping."""
        for call in list(self.calls):
            call.shut_down()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight or ``timeout`` seconds pass; True when idle."""
        deadline = time.monotonic() + timeout
        # Polling only runs during a stop, never on the request path.
        while self.count > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.count <= 0


def reload(gateway: Gateway, new: Settings) -> list[str]:
    """Apply the reloadable settings of ``new``; returns the changed ones that need a restart."""
    current = gateway.settings
    for name in RELOADABLE_SETTINGS:
        value = getattr(new, name)
        if getattr(current, name) != value:
            log.info("reload: %s changed", name)
            setattr(current, name, value)
    logging.getLogger().setLevel(current.log_level.upper())
    gateway.auth.proxy_tokens.ttl = current.cache_ttl
    gateway.keys.ttl = current.key_cache_ttl
    gateway.governor.queue_timeout = current.queue_timeout
    gateway.governor.prices_ttl = current.cache_ttl
    if gateway.router.ttl != current.cache_ttl:
        # The refresh period follows the TTL, so restart the refresher.
        gateway.router.stop()
        gateway.router.ttl = current.cache_ttl
        gateway.router.start()
    return [
        f.name
        for f in dataclasses.fields(new)
        if f.name not in RELOADABLE_SETTINGS and getattr(new, f.name) != getattr(current, f.name)
    ]
