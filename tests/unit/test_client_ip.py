"""`client_ip`: the peer, or behind trusted proxies the right-most untrusted X-Forwarded-For hop."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from jobgate.api.client_ip import client_ip, ip_bucket, trusted_networks
from jobgate.config import Settings

PROXIES = trusted_networks("10.0.0.0/8, 192.168.1.1, fd00::/8")


def scope(peer: str | None, *forwarded_for: str) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", value.encode("latin-1")) for value in forwarded_for]
    return {
        "type": "http",
        "client": None if peer is None else (peer, 4321),
        "headers": [(b"host", b"test"), *headers],
    }


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        # An untrusted peer is the client, whatever it claims.
        ("203.0.113.9", [], "203.0.113.9"),
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        ("203.0.113.9", ["10.0.0.5"], "203.0.113.9"),
        # A trusted proxy: the right-most untrusted hop.
        ("10.0.0.1", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.1", ["1.2.3.4, 198.51.100.7"], "198.51.100.7"),  # spoofed left entry
        ("10.0.0.1", ["1.2.3.4, 198.51.100.7, 10.9.9.9"], "198.51.100.7"),  # two proxies
        ("10.0.0.1", ["1.2.3.4", "198.51.100.7, 192.168.1.1"], "198.51.100.7"),  # two headers
        ("10.0.0.1", ["garbage, 198.51.100.7"], "198.51.100.7"),
        # Every hop trusted: the left-most one; no header: the proxy itself.
        ("10.0.0.1", ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
        ("10.0.0.1", [], "10.0.0.1"),
        # Ports, brackets and IPv4-mapped IPv6 are read as the bare address.
        ("10.0.0.1", ["198.51.100.7:5555"], "198.51.100.7"),
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("::ffff:10.0.0.1", ["::ffff:198.51.100.7"], "198.51.100.7"),
        ("fd00::1", ["2001:DB8:0:0::1"], "2001:db8::1"),
        # No peer at all (a Unix socket without a proxy in front).
        (None, ["198.51.100.7"], ""),
    ],
)
def test_client_ip_table(peer: str | None, forwarded_for: list[str], expected: str) -> None:
    assert expected == client_ip(scope(peer, *forwarded_for), PROXIES)


def test_without_trusted_proxies_forwarded_for_is_never_read() -> None:
    assert client_ip(scope("10.0.0.1", "198.51.100.7"), ()) == "10.0.0.1"


ipv4 = st.ip_addresses(v=4).map(str)
untrusted = ipv4.filter(lambda a: not ipaddress.ip_address(a).is_private)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=20)
junk = st.one_of(ipv4, st.ip_addresses(v=6).map(str), header_text)


@given(prefix=st.lists(junk.filter(lambda s: "," not in s), max_size=5), client=untrusted)
def test_prepending_entries_never_changes_the_client(prefix: list[str], client: str) -> None:
    """Whatever a client puts in front of the hops its proxies append, it stays itself."""
    hops = ", ".join([*prefix, client, "10.3.3.3"])
    assert client == client_ip(scope("10.0.0.1", hops), PROXIES)


@given(peer=untrusted, forwarded=st.lists(junk, max_size=5))
def test_an_untrusted_peer_cannot_claim_another_address(peer: str, forwarded: list[str]) -> None:
    assert peer == client_ip(scope(peer, *forwarded), PROXIES)


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    assert ip_bucket("2001:db8:1:2::1") == ip_bucket("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert ip_bucket("2001:db8:1:3::1") != ip_bucket("2001:db8:1:2::1")
    assert ip_bucket("198.51.100.7") == "198.51.100.7"


@pytest.mark.parametrize(
    "settings",
    [
        {"rate_limit_submit": "lots"},
        {"rate_limit_submit": "0/minute"},
        {"rate_limit_submit": "1/second;10/minute"},
        {"rate_limit_ip": "60 per fortnight"},
        {"trusted_proxies": "10.0.0.0/8, not-an-ip"},
    ],
)
def test_bad_limit_settings_are_refused_at_startup(settings: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Settings(**settings)  # type: ignore[arg-type]


def test_good_limit_settings_are_kept() -> None:
    settings = Settings(
        rate_limit_submit="60/minute", rate_limit_ip="3 per 2 seconds", trusted_proxies="::1"
    )
    assert (settings.rate_limit_submit, settings.rate_limit_ip) == ("60/minute", "3 per 2 seconds")
