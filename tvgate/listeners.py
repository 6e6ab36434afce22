"""The listening sockets: bound first at start, each worker's own, and a taken address refused.

``bind_listeners`` binds the listening sockets before anything else at start
(before the database is opened or a first admin is created), and refuses an
address another process listens on.

With several workers one SO_REUSEPORT socket is bound per worker on the same
port, and the supervisor keeps them open. The kernel spreads new connections
over the sockets evenly (one shared socket would let whichever worker wakes
first take the whole accept queue: Tornado accepts in bursts). Because the
parent holds each socket, connections queued for a worker that crashed wait for
its replacement instead of being refused. SO_REUSEPORT would as gladly let a
second ``tvgate serve`` (of the same user) join that group, and the kernel would
then spread connections over two gateways with different settings: a probe
socket without SO_REUSEPORT, which any listener on the address refuses, comes
first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import socket
from pathlib import Path

from tornado.netutil import bind_sockets

from tvgate.config import Settings

#: Listen backlog (the kernel caps it at net.core.somaxconn).
_BACKLOG = 1024


#: A listening socket's local address.
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The LISTEN state in /proc/net/tcp.
_TCP_LISTEN = "0A"


class ListenError(Exception):
    """The gateway cannot listen on its address; the message is one line for the operator."""


def bind_listeners(settings: Settings) -> list[list[socket.socket]]:
    """Each worker's listening sockets, or ListenError when the address is taken. On port 0
    the kernel chooses a free port, which every worker shares (``bound_settings``).

    Two starts at the same moment could both pass the probe: after binding, any other
    process's listener on the address makes this start fail too (both fail, rather than
    share the port)."""
    try:
        if settings.worker_count == 1:
            return [bind_sockets(settings.port, settings.host, backlog=_BACKLOG)]
        port = settings.port
        if port:
            _probe(port, settings.host)
        groups: list[list[socket.socket]] = []
        for _ in range(settings.worker_count):
            groups.append(bind_sockets(port, settings.host, backlog=_BACKLOG, reuse_port=True))
            # Port 0: the first worker's port, chosen by the kernel, is every worker's.
            port = groups[0][0].getsockname()[1]
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(_in_use(settings, set(_listeners(settings.port)))) from None
        raise ListenError(f"cannot listen on {settings.listen}: {exc.strerror}") from None
    ours = [sock for group in groups for sock in group]
    addresses = {ipaddress.ip_address(sock.getsockname()[0]) for sock in ours}
    inodes = {os.fstat(sock.fileno()).st_ino for sock in ours}
    others = {
        inode
        for inode, address in _listeners(port).items()
        if inode not in inodes and _overlaps(address, addresses)
    }
    if others:
        for sock in ours:
            sock.close()
        raise ListenError(_in_use(settings, others))
    return groups


def bound_settings(settings: Settings, listeners: list[list[socket.socket]]) -> Settings:
    """``settings`` with the port ``listeners`` are bound to (the kernel's choice when
    ``listen`` has port 0)."""
    if settings.port:
        return settings
    port = listeners[0][0].getsockname()[1]
    return dataclasses.replace(settings, listen=f"{settings.host}:{port}")


def write_port_file(path: str, port: int) -> None:
    """The bound port, for whoever started ``serve`` on port 0; renamed into place, so that a
    reader never sees half of it."""
    partial = f"{path}.partial"
    Path(partial).write_text(f"{port}\n")
    os.replace(partial, path)


def _overlaps(address: _Address, ours: set[_Address]) -> bool:
    """Whether a listener on ``address`` would take connections meant for ``ours``."""
    return any(
        a.version == address.version
        and (a == address or a.is_unspecified or address.is_unspecified)
        for a in ours
    )


def _probe(port: int, host: str) -> None:
    """OSError (EADDRINUSE) when anything listens on host:port, SO_REUSEPORT or not.

    With SO_REUSEADDR and without SO_REUSEPORT a bind conflicts with every listening
    socket on the address, but not with the TIME_WAIT connections of a gateway that
    just stopped."""
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def _listeners(port: int) -> dict[int, _Address]:
    """The sockets listening on ``port`` on this machine: inode -> local address (Linux's
    /proc/net/tcp and tcp6; empty where they cannot be read)."""
    found: dict[int, _Address] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_address, local_port = fields[1].split(":")
            if fields[3] == _TCP_LISTEN and int(local_port, 16) == port:
                found[int(fields[9])] = _kernel_address(local_address)
    return found


def _kernel_address(text: str) -> _Address:
    """An address as /proc/net/tcp writes it: hex, each 32-bit word in host (little-endian)
    byte order."""
    raw = bytes.fromhex(text)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _in_use(settings: Settings, inodes: set[int]) -> str:
    return f"{settings.listen} is already in use ({_holder(inodes)}); stop it or set TVGATE_LISTEN"


def _holder(inodes: set[int]) -> str:
    """Which process holds one of these sockets, as "pid 1234: tvgate serve"; best effort
    (another user's processes cannot be looked into): "another process"."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in targets for fd in (entry / "fd").iterdir()):
                holders.add(int(entry.name))
    # A supervisor and its workers all hold the sockets: name the supervisor.
    roots = {pid for pid in holders if _parent(pid) not in holders} or holders
    if not roots:
        return "another process"
    pid = min(roots)
    return f"pid {pid}: {_program(pid)}"


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _program(pid: int) -> str:
    """The holder's name: "tvgate serve", or its program's name; never its arguments,
    which may hold secrets."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" in argv and any(b"tvgate" in arg for arg in argv[:3]):
            return "tvgate serve"
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "ended since"
