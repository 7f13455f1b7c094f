"""HMAC-SHA256 signatures: download URLs for blobs, and compact tokens.

A signature covers a purpose string and every value it vouches for, encoded without
ambiguity (a JSON array), so it cannot be replayed for another purpose, another blob,
another file name or content type, or a later expiry. Comparisons are constant-time.
Keys come from `JOBGATE_SIGNING_KEY`; rotating it invalidates every outstanding URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote, urlencode

BLOB_DOWNLOAD = "blob-download"
"""The purpose bound into blob download signatures."""


def sign_blob_url(
    *,
    key: str,
    public_url: str,
    sha256: str,
    filename: str,
    content_type: str,
    expires_at: int,
) -> str:
    """An absolute URL that downloads a blob without credentials until `expires_at`.

    The URL is `{public_url}/v1/blobs/{sha256}?exp=..&name=..&ct=..&sig=..`, served by
    jobgate with `filename` and `content_type` in the response headers.

    Args:
        key: The signing key.
        public_url: Where clients reach jobgate, for example `https://jobs.example.com`.
        sha256: The blob's digest.
        filename: The name the download is saved under.
        content_type: The `Content-Type` the download is served with.
        expires_at: Epoch seconds after which the URL is refused.

    Returns:
        The signed URL.
    """
    signature = _blob_signature(key, sha256, filename, content_type, expires_at)
    query = urlencode(
        {"exp": expires_at, "name": filename, "ct": content_type, "sig": signature},
        quote_via=quote,
    )
    return f"{public_url.rstrip('/')}/v1/blobs/{quote(sha256, safe='')}?{query}"


def verify_blob_signature(
    *,
    key: str,
    sha256: str,
    filename: str,
    content_type: str,
    expires_at: int,
    signature: str,
    now: float,
) -> bool:
    """Whether a blob download URL's signature is genuine and not expired.

    Args:
        key: The signing key.
        sha256: The blob digest from the URL path.
        filename: The `name` query parameter.
        content_type: The `ct` query parameter.
        expires_at: The `exp` query parameter.
        signature: The `sig` query parameter.
        now: The current time in epoch seconds.

    Returns:
        True only if the URL was signed with `key` for exactly these values and
        `now` is before `expires_at`.
    """
    if now >= expires_at:
        return False
    expected = _blob_signature(key, sha256, filename, content_type, expires_at)
    return _same(expected, signature)


def sign_token(key: str, purpose: str, payload: dict[str, Any], expires_at: int) -> str:
    """A compact signed token, `base64url(json).base64url(hmac)`, valid until `expires_at`.

    The payload is readable by whoever holds the token: sign, don't hide.

    Args:
        key: The signing key.
        purpose: What the token is for (for example `"job-stream"`); a token verifies
            only for the same purpose.
        payload: JSON-serialisable claims.
        expires_at: Epoch seconds after which the token is refused.

    Returns:
        The token, safe in URLs and headers.
    """
    body = _b64encode(
        json.dumps(
            {"exp": expires_at, "data": payload}, separators=(",", ":"), sort_keys=True
        ).encode()
    )
    return f"{body}.{_token_mac(key, purpose, body)}"


def verify_token(key: str, purpose: str, token: str, now: float) -> dict[str, Any] | None:
    """The payload of a token made by `sign_token`, or None.

    Args:
        key: The signing key.
        purpose: The purpose the token must have been signed for.
        token: The token.
        now: The current time in epoch seconds.

    Returns:
        The payload, or None if the token is malformed, tampered with, signed for
        another purpose or key, or expired.
    """
    body, dot, mac = token.partition(".")
    if not dot or not _same(_token_mac(key, purpose, body), mac):
        return None
    try:
        claims = json.loads(_b64decode(body))
    except ValueError:  # bad base64 (binascii.Error), UTF-8 or JSON
        return None
    if not isinstance(claims, dict):
        return None
    expires_at, data = claims.get("exp"), claims.get("data")
    if not isinstance(expires_at, int) or not isinstance(data, dict) or now >= expires_at:
        return None
    return data


def _blob_signature(
    key: str, sha256: str, filename: str, content_type: str, expires_at: int
) -> str:
    message = json.dumps([BLOB_DOWNLOAD, sha256, filename, content_type, int(expires_at)])
    return _b64encode(_mac(key, message.encode()))


def _token_mac(key: str, purpose: str, body: str) -> str:
    message = json.dumps(["token", purpose, body]).encode()
    return _b64encode(_mac(key, message))


def _mac(key: str, message: bytes) -> bytes:
    if not key:
        raise ValueError("The signing key is empty")
    return hmac.new(key.encode(), message, hashlib.sha256).digest()


def _same(expected: str, given: str) -> bool:
    # compare_digest refuses non-ASCII str; a genuine signature is ASCII anyway.
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
