"""Webhook signing and target rules, without servers."""

from __future__ import annotations

import ipaddress

import pytest

from jobgate.config import Settings
from jobgate.webhooks import signing, ssrf

STRICT = ssrf.Policy()


def test_signature_matches_the_standard_webhooks_example() -> None:
    """The example of the Standard Webhooks specification signs to its stated value."""
    signature = signing.sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_carry_one_signature_per_secret() -> None:
    """With two secrets (a rotation), the header has two space-separated signatures."""
    old, new = signing.new_secret(), signing.new_secret()
    headers = signing.headers("msg_1", 1700000000, b"{}", [new, old])
    assert headers["webhook-signature"].split(" ") == [
        signing.sign(new, "msg_1", 1700000000, b"{}"),
        signing.sign(old, "msg_1", 1700000000, b"{}"),
    ]
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == "1700000000"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("192.168.0.10", "a private address"),
        ("169.254.10.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("240.0.0.1", "a reserved address"),
        ("100.64.0.1", "not a public address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("64:ff9b::7f00:1", "a loopback address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("::ffff:169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_which_addresses_are_refused(address: str, reason: str | None) -> None:
    """Every kind of non-public address is refused, IPv4 inside IPv6 included."""
    assert STRICT.refusal(ipaddress.ip_address(address)) == reason


def test_allow_private_still_refuses_metadata_addresses() -> None:
    """Private targets may be allowed; cloud metadata endpoints only by the allowlist."""
    policy = ssrf.Policy.from_settings(Settings(webhook_allow_private=True))
    assert policy.refusal(ipaddress.ip_address("10.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) == "a cloud metadata address"


def test_the_allowlist_takes_hosts_and_networks() -> None:
    """Allow-listed networks admit their addresses (mapped ones too); names are exact."""
    policy = ssrf.Policy.from_settings(
        Settings(webhook_allowlist="10.20.0.0/16, hooks.internal., 169.254.169.254")
    )
    assert policy.refusal(ipaddress.ip_address("10.20.3.4")) is None
    assert policy.refusal(ipaddress.ip_address("::ffff:10.20.3.4")) is None
    assert policy.refusal(ipaddress.ip_address("10.21.0.1")) == "a private address"
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) is None
    assert policy.host_allowed("HOOKS.internal")
    assert not policy.host_allowed("x.hooks.internal")


def test_a_bad_allowlist_is_refused_at_start() -> None:
    """An entry that is neither a host name nor a network is a settings error."""
    with pytest.raises(ValueError, match="webhook_allowlist"):
        Settings(webhook_allowlist="10.0.0.0/33")


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("localhost", True),
        ("api.localhost", True),
        ("printer.local", True),
        ("metadata.google.internal", True),
        ("[::1]", True),
        ("127.0.0.1", True),
        ("hooks.example.com", False),
        ("93.184.216.34", False),
    ],
)
def test_submitted_hosts_known_to_be_local_are_refused(host: str, refused: bool) -> None:
    """At submit, literal addresses and local names are judged; other names wait for DNS."""
    assert (STRICT.literal_refusal(host) is not None) is refused


async def test_pin_checks_every_address_and_returns_the_first() -> None:
    """`pin` resolves once, refuses if any address is refused, else gives the first."""

    async def two(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "2606:4700::1111"]

    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "192.168.1.1"]

    assert await ssrf.pin("hooks.example.com", 443, STRICT, two) == "93.184.216.34"
    with pytest.raises(ssrf.Refused, match=r"resolves to 192\.168\.1\.1, a private address"):
        await ssrf.pin("hooks.example.com", 443, STRICT, mixed)
    with pytest.raises(ssrf.Refused, match=r"127\.0\.0\.1 is a loopback address"):
        await ssrf.pin("127.0.0.1", 80, STRICT, two)
