"""Which address a request came from: the peer, or behind trusted proxies the client they saw.

Behind nginx every connection comes from nginx, so the peer address says nothing
about the browser. nginx appends the address it saw to ``X-Forwarded-For``; an
address in that header is believed only as far as the hops to its right are
proxies tvgate was told to trust (``trusted_proxies``). Anything a client writes
into the header itself ends up left of those hops and is never reached, so a
client cannot choose the address it is counted under. Tornado's ``xheaders``
would believe the header from any peer; tvgate keeps it off.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDR networks; ValueError names the one that is not."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, proxies: tuple[Network, ...]) -> bool:
    return any(address in network for network in proxies)


def client_address(peer: str, forwarded_for: list[str], proxies: tuple[Network, ...]) -> str:
    """The client's address: the right-most hop of ``X-Forwarded-For`` that is not a trusted
    proxy, when the peer is one; otherwise the peer itself."""
    current = _address(peer)
    if current is None or not _trusted(current, proxies):
        return str(current) if current is not None else peer
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            # Garbage in the header: stop at the last proxy that is known to be real.
            break
        current = address
        if not _trusted(current, proxies):
            break
    return str(current)


def is_trusted_peer(peer: str, proxies: tuple[Network, ...]) -> bool:
    """Whether the TCP peer ``peer`` is one of the trusted proxies."""
    address = _address(peer)
    return address is not None and _trusted(address, proxies)
