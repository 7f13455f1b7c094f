"""Signed blob download URLs and signed tokens."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobgate.blobs.signing import (
    sign_blob_url,
    sign_token,
    verify_blob_signature,
    verify_token,
)

KEY = "test-signing-key-0123456789abcdef"
SHA = hashlib.sha256(b"report").hexdigest()
OTHER_SHA = hashlib.sha256(b"another report").hexdigest()
NOW = 1_700_000_000
EXP = NOW + 3600


def sign(**overrides: Any) -> str:
    values: dict[str, Any] = {
        "key": KEY,
        "public_url": "https://jobs.example.com",
        "sha256": SHA,
        "filename": "report.json",
        "content_type": "application/json",
        "expires_at": EXP,
    }
    values.update(overrides)
    return sign_blob_url(**values)


def parse(url: str) -> dict[str, Any]:
    """What the `GET /v1/blobs/{sha256}` route would read from the URL."""
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query, strict_parsing=True).items()}
    assert {"exp", "name", "ct", "sig"} == set(query)
    return {
        "sha256": unquote(parts.path.rsplit("/", 1)[1]),
        "filename": query["name"],
        "content_type": query["ct"],
        "expires_at": int(query["exp"]),
        "signature": query["sig"],
    }


def verify(fields: dict[str, Any], *, key: str = KEY, now: float = NOW) -> bool:
    return verify_blob_signature(key=key, now=now, **fields)


# -- blob URLs --------------------------------------------------------------------------


def test_url_is_absolute_on_public_url() -> None:
    """The URL points at jobgate's public address and the blob route."""
    url = sign(public_url="https://jobs.example.com/")

    assert url.startswith(f"https://jobs.example.com/v1/blobs/{SHA}?")


def test_round_trip() -> None:
    """A freshly signed URL verifies with the values it carries."""
    assert verify(parse(sign()))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sha256", OTHER_SHA),
        ("filename", "report.json.exe"),
        ("content_type", "text/html"),
        ("expires_at", EXP + 1),
        ("signature", "A" * 43),
    ],
)
def test_tampering_with_any_field_fails(field: str, value: Any) -> None:
    """Changing the blob, name, type, expiry or signature invalidates the URL."""
    fields = parse(sign())
    fields[field] = value

    assert not verify(fields)


def test_signature_cannot_be_reused_for_another_blob() -> None:
    """A signature for one blob does not open another, even with the same name."""
    mine = parse(sign(sha256=SHA))
    theirs = parse(sign(sha256=OTHER_SHA))

    assert not verify({**theirs, "signature": mine["signature"]})


def test_wrong_key_fails() -> None:
    """A URL signed with another key is refused."""
    assert not verify(parse(sign()), key="another-key")


@pytest.mark.parametrize(("now", "valid"), [(EXP - 1, True), (EXP - 0.001, True), (EXP, False)])
def test_expiry(now: float, valid: bool) -> None:
    """The URL works until `expires_at`, and not from that second on."""
    assert valid == verify(parse(sign()), now=now)


def test_non_ascii_signature_is_refused_not_an_error() -> None:
    """A garbage signature is just invalid."""
    fields = parse(sign())

    assert not verify({**fields, "signature": "ünïcødé"})


def test_empty_key_is_refused() -> None:
    """Signing with no key is a programming error."""
    with pytest.raises(ValueError, match="empty"):
        sign(key="")


_text = st.text(st.characters(codec="utf-8"), max_size=80)  # no lone surrogates


@given(
    sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    filename=_text,
    content_type=_text,
    expires_at=st.integers(min_value=NOW + 1, max_value=2**40),
    other_filename=_text,
)
def test_property_url_round_trips_and_binds_the_name(
    sha256: str, filename: str, content_type: str, expires_at: int, other_filename: str
) -> None:
    """Any name and type survive URL encoding, and the signature is bound to the name."""
    url = sign(sha256=sha256, filename=filename, content_type=content_type, expires_at=expires_at)
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    fields = {
        "sha256": parts.path.rsplit("/", 1)[1],
        "filename": query["name"][0],
        "content_type": query["ct"][0],
        "expires_at": int(query["exp"][0]),
        "signature": query["sig"][0],
    }

    assert (filename, content_type) == (fields["filename"], fields["content_type"])
    assert verify(fields)
    assert verify({**fields, "filename": other_filename}) == (other_filename == filename)


# -- tokens -----------------------------------------------------------------------------


def test_token_round_trip() -> None:
    """A token gives back its payload for the same key and purpose before expiry."""
    token = sign_token(KEY, "job-stream", {"job_id": "j1", "owner": "alice"}, EXP)

    assert verify_token(KEY, "job-stream", token, NOW) == {"job_id": "j1", "owner": "alice"}


def test_token_is_compact_and_url_safe() -> None:
    """The token is `base64url(json).base64url(mac)`, with no padding."""
    token = sign_token(KEY, "job-stream", {"job_id": "j1"}, EXP)

    body, mac = token.split(".")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert len(mac) == 43
    assert body


@pytest.mark.parametrize(
    ("key", "purpose", "now"),
    [
        ("another-key", "job-stream", NOW),
        (KEY, "other-purpose", NOW),
        (KEY, "job-stream", EXP),
    ],
    ids=["wrong-key", "wrong-purpose", "expired"],
)
def test_token_refused(key: str, purpose: str, now: float) -> None:
    """Another key, another purpose or expiry: no payload."""
    token = sign_token(KEY, "job-stream", {"job_id": "j1"}, EXP)

    assert verify_token(key, purpose, token, now) is None


def test_token_with_altered_payload_is_refused() -> None:
    """Swapping in another token's payload breaks the MAC."""
    mine = sign_token(KEY, "job-stream", {"job_id": "mine"}, EXP)
    theirs = sign_token(KEY, "job-stream", {"job_id": "theirs"}, EXP)

    forged = theirs.split(".")[0] + "." + mine.split(".")[1]
    assert verify_token(KEY, "job-stream", forged, NOW) is None


@given(st.text(max_size=200))
def test_property_garbage_tokens_are_refused(token: str) -> None:
    """Arbitrary strings never verify and never raise."""
    assert verify_token(KEY, "job-stream", token, NOW) is None


@given(
    payload=st.dictionaries(
        st.text(max_size=10),
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
        max_size=5,
    )
)
def test_property_token_payload_round_trips(payload: dict[str, Any]) -> None:
    """Any JSON object payload comes back unchanged."""
    token = sign_token(KEY, "p", payload, EXP)

    assert payload == verify_token(KEY, "p", token, NOW)
