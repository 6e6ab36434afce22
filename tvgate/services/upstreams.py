"""Which base URLs a provider key may point at: no query or fragment, no private address
unless the operator allows it, never this gateway itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection
from urllib.parse import urlparse

from tvgate.identity import Principal
from tvgate.proxy.upstream import is_public_address
from tvgate.services.access import ServiceError, _deny, audit


def check_base_url(
    url: str,
    *,
    allow_private: bool,
    switch: str = "TVGATE_ALLOW_PRIVATE_UPSTREAMS",
    what: str = "base URL",
) -> str:
    """A provider base URL tvgate may call: http(s), and https to a public host unless
    ``allow_private`` (the setting named ``switch``, as the operator sets it) is on.
    ``what`` names the URL in a refusal (a cloud key's ``token_uri``, say)."""
    try:
        parsed = urlparse(url)
    except ValueError:  # a malformed bracketed host, say
        raise ServiceError(f"{what} is not a valid URL") from None
    # Credentials first: the other refusals quote the URL, and refusals are audited.
    if parsed.username or parsed.password or "@" in parsed.path.split("/", 1)[0]:
        raise ServiceError(f"{what} must not carry credentials")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ServiceError(f"{what} {url!r} must be an http(s) URL")
    _check_no_query_or_fragment(url, what)
    if not allow_private:
        _check_public_upstream(parsed.scheme, parsed.hostname, switch, what)
    return url.rstrip("/")


def _check_no_query_or_fragment(url: str, what: str) -> None:
    # The proxy appends the endpoint's path to the base URL: after a "?" or a "#" that path
    # is a query or a fragment, and the base URL alone picks any path on the host.
    if "?" in url or "#" in url:
        raise ServiceError(f"{what} must not have a query or fragment ('?' or '#')")


def _check_public_upstream(scheme: str, hostname: str, switch: str, what: str) -> None:
    if scheme != "https":
        raise ServiceError(f"{what} must be https ({switch} is off)")
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        # A name: it is checked after DNS, on every connection (tvgate/proxy/upstream.py).
        private = hostname == "localhost"
    else:
        private = not is_public_address(hostname)
    if private:
        raise ServiceError(f"{what} points at a private address ({switch} is off)")


#: Host names under which a gateway listening on a loopback or unspecified address (a
#: 0.0.0.0 bind answers on every local address) reaches itself.
_LOCAL_HOST_NAMES = frozenset({"localhost", "localhost.", "localhost.localdomain"})


def check_not_this_gateway(url: str, gateway_urls: Collection[str], what: str = "base URL") -> None:
    """Refuse a base URL that is this gateway itself (its listen address under any local
    name, or its public URL): a route there would call the gateway in a loop. Other
    names for it (DNS aliases, another VM) are caught per request by the loop mark."""
    host, port = _host_and_port(url, what)
    for own_url in gateway_urls:
        own_host, own_port = _host_and_port(own_url, "the gateway's URL")
        if port == own_port and (host == own_host or (_is_local(host) and _is_local(own_host))):
            raise ServiceError(
                f"{what} {url!r} is this gateway itself: a route there would call tvgate in a loop"
            )


def _host_and_port(url: str, what: str) -> tuple[str, int]:
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        raise ServiceError(f"{what} {url!r} has a bad port") from None
    return (parsed.hostname or "").lower(), port or (443 if parsed.scheme == "https" else 80)


def _is_local(host: str) -> bool:
    """A loopback or unspecified address, or a name that always means this machine."""
    if host in _LOCAL_HOST_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _key_base_url(
    url: str,
    *,
    own: bool,
    allow_private: bool,
    allow_private_user: bool,
    gateway_urls: Collection[str],
    refused: Callable[[ServiceError], ServiceError],
    what: str = "base URL",
) -> str:
    """The base URL a key may call (the same checks for a new key and a changed one): http(s)
    without credentials, query or fragment; public https unless the setting of the key's
    kind allows private upstreams (``own``: a user's own key); never this gateway. A
    refusal goes through ``refused``, which audits it and returns the error to raise."""
    try:
        checked = check_base_url(
            url,
            allow_private=allow_private_user if own else allow_private,
            switch="TVGATE_ALLOW_PRIVATE_USER_UPSTREAMS"
            if own
            else "TVGATE_ALLOW_PRIVATE_UPSTREAMS",
            what=what,
        )
        check_not_this_gateway(checked, gateway_urls, what)
    except ServiceError as error:
        raise refused(error) from None
    return checked


def _refuse_base_url(
    actor: Principal | None, org_id: int, action: str, target: str, error: ServiceError
) -> ServiceError:
    """Audit a refused base URL (where a key's secret would have been sent) in the org."""
    if actor is not None:
        return _deny(actor, action, target, error)
    audit(None, org_id, action, target, {"refused": str(error)}, allowed=False)
    return error
