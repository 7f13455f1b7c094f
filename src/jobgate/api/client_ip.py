"""The address a request comes from, and the key the IP limit counts it under.

Key contracts:

- X-Forwarded-For is believed only from a peer in `JOBGATE_TRUSTED_PROXIES`, and read
  from the right: each proxy appends the address it saw, so the first untrusted entry
  from the right is the client, and whatever a client prepends is never reached.
- Addresses are canonical (`ipaddress`), IPv4-mapped IPv6 is IPv4, and IPv6 clients
  are limited per /64, so neither spelling tricks nor address rotation dodge a limit.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from starlette.types import Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPV6_BUCKET_PREFIX = 64
"""IPv6 clients share a limit per /64: one subscriber usually holds a whole /64."""


def trusted_networks(value: str) -> tuple[Network, ...]:
    """`JOBGATE_TRUSTED_PROXIES` (comma-separated IPs or CIDRs) as networks."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False)
        for part in value.split(",")
        if part.strip()
    )


# Parsing an address costs a few microseconds; a busy server sees the same few again and
# again. Bounded, so addresses a client makes up cannot grow it.
@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(text: str, trusted: Sequence[Network]) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in trusted)


def _forwarded_for(scope: Scope) -> list[str]:
    hops: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            hops.extend(h.strip() for h in value.decode("latin-1").split(",") if h.strip())
    return hops


@functools.lru_cache(maxsize=4096)
def _canonical(text: str) -> str:
    address = _address(text)
    return str(address) if address is not None else text.strip()


def client_ip(scope: Scope, trusted: Sequence[Network]) -> str:
    """The address a request comes from.

    It is the connection's peer, unless the peer is a trusted proxy: then
    X-Forwarded-For is read from the right (each proxy appends the address it saw),
    trusted addresses are skipped, and the first untrusted one is the client. A client
    can only prepend entries, so spoofed ones are never reached. When every entry is
    trusted, the left-most is the client.

    Args:
        scope: the ASGI scope (`client` and `headers`).
        trusted: the proxies' networks; empty: X-Forwarded-For is never read.

    Returns:
        The canonical address (IPv4-mapped IPv6 as IPv4), or "" with no peer.
    """
    peer = scope.get("client")
    host = _canonical(peer[0]) if peer else ""
    if not trusted or not _is_trusted(host, trusted):
        return host
    hops = _forwarded_for(scope)
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return _canonical(hop)
    return _canonical(hops[0]) if hops else host


@functools.lru_cache(maxsize=4096)
def ip_bucket(address: str) -> str:
    """The key an address is limited under: itself, or its /64 for IPv6."""
    parsed = _address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((parsed, IPV6_BUCKET_PREFIX), strict=False)
        return str(network)
    return address
