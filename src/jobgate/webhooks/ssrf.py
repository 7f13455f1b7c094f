"""Which addresses a webhook may reach, checked where it is sent.

A target is refused when any address its host resolves to is loopback, private,
link-local, multicast, reserved, unspecified or otherwise not public, or a cloud
metadata address, unless `JOBGATE_WEBHOOK_ALLOW_PRIVATE` is true (metadata addresses
stay refused then) or the host or address is in `JOBGATE_WEBHOOK_ALLOWLIST`.
Addresses that embed an IPv4 address (IPv4-mapped, NAT64) are judged by that address.
The sender connects to the address that passed, never resolving the name again, so a
DNS answer that changes in between (rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from jobgate.config import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""`(host, port)` to the addresses to try, in order."""

METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Most specific first: `is_private` is true of most of the others too.
_KINDS = (
    ("loopback", "a loopback address"),
    ("unspecified", "an unspecified address"),
    ("link_local", "a link-local address"),
    ("multicast", "a multicast address"),
    ("reserved", "a reserved address"),
    ("private", "a private address"),
)
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


class Refused(Exception):
    """The target may not be reached; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def unwrap(address: Address) -> Address:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64), or `address`."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class Policy:
    """The rules; `from_settings` reads them from the configuration."""

    allow_private: bool = False
    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = field(default=())

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        hosts: set[str] = set()
        networks: list[Network] = []
        for part in settings.webhook_allowlist.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                hosts.add(_name(part))
        return cls(settings.webhook_allow_private, frozenset(hosts), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """Whether the host name itself is allow-listed."""
        return _name(host) in self.hosts

    def refusal(self, address: Address) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        candidates = {address, unwrap(address)}
        if any(a in network for a in candidates for network in self.networks):
            return None
        address = unwrap(address)
        if address in METADATA:
            return "a cloud metadata address"
        if self.allow_private:
            return None
        for kind, reason in _KINDS:
            if getattr(address, f"is_{kind}"):
                return reason
        if not address.is_global:
            return "not a public address"
        return None

    def literal_refusal(self, host: str) -> str | None:
        """Checks a submitted URL's host can be judged without DNS: an address, or a
        name that is local by definition (`localhost`, `*.local`, ...)."""
        host = _name(host.strip("[]"))
        if self.host_allowed(host):
            return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            local = host == "localhost" or host.endswith(_LOCAL_SUFFIXES)
            return "a local name" if local and not self.allow_private else None
        return self.refusal(address)


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, without blocking the loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def pin(host: str, port: int, policy: Policy, resolver: Resolver = resolve) -> str:
    """The address to connect to for `host`, after checking every address it has.

    Raises:
        Refused: an address of the host may not be reached.
        OSError: the name did not resolve (worth another try later).
    """
    host = host.strip("[]")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        found = await resolver(host, port)
        if not found:
            raise socket.gaierror(f"{host} has no address") from None
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
    if not policy.host_allowed(host):
        for address in addresses:
            reason = policy.refusal(address)
            if reason is not None:
                literal = str(address) == host
                raise Refused(
                    f"{host} is {reason}" if literal else f"{host} resolves to {address}, {reason}"
                )
    return str(addresses[0])


def _name(host: str) -> str:
    return host.lower().rstrip(".")
