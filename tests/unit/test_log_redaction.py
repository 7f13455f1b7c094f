"""Logs never carry credentials: the redactor, and a real process's rendered output."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobgate.observability.logging import MASK, redactor

KEY = "jg_" + "A1b2C3d4" * 5
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEiLCJleHAiOjk5OTk5OTk5OTl9.c2lnbmF0dXJlLWJ5dGVz"
SIG = "Qk9HVVMtc2lnbmF0dXJlLW9mLXRoaXMtdXJs"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        (f"Authorization: Bearer {KEY}", KEY),
        (f"authorization='bearer {JWT}'", JWT),
        (f"token={KEY} failed", KEY),
        (f"got {JWT} from a client", JWT),
        (f"GET /v1/blobs/abc?exp=1&name=a&ct=b&sig={SIG} 200", SIG),
        (f"GET /v1/jobs/1/events?token={SIG}&x=1", SIG),
        ("secret whsec_c2VjcmV0LWtleS1vZi1vd25lcg== rotated", "c2VjcmV0LWtleS1vZi1vd25lcg=="),
        ("the signing key is my-long-configured-signing-key!", "my-long-configured-signing-key!"),
    ],
    ids=[
        "bearer-key",
        "bearer-jwt",
        "bare-key",
        "bare-jwt",
        "url-sig",
        "url-token",
        "whsec",
        "exact",
    ],
)
def test_credentials_are_masked_wherever_they_appear(line: str, secret: str) -> None:
    redact = redactor(["my-long-configured-signing-key!"])
    masked = redact(line)
    assert secret not in masked
    assert MASK in masked


def test_what_is_no_credential_is_left_alone() -> None:
    """Ids, hashes, paths and a key's short prefix stay readable."""
    line = "job_id=01a22a17-ddf4-74a6 sha256=9f86d081884c7d65 path=/v1/jobs prefix=jg_Ab12Cd34e"
    assert redactor(["short"])(line) == line


SCRIPT = f"""
import structlog
from jobgate.config import Settings
from jobgate.observability.logging import configure_logging

configure_logging(Settings(log_format={{fmt!r}}, signing_key="configured-signing-key-0123456789"))
log = structlog.get_logger("test")

def authenticate(token):
    secret_local = token
    raise ValueError("bad credentials")

try:
    authenticate({KEY!r})
except ValueError:
    log.exception("auth_crashed", authorization="Bearer {JWT}")
log.info("signing with configured-signing-key-0123456789")
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_logged_traceback_shows_no_locals_and_no_credentials(fmt: str) -> None:
    """A crash while a token sits in a local variable logs the error, not the token."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(fmt=fmt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = done.stdout + done.stderr
    assert "auth_crashed" in out
    assert "bad credentials" in out  # the error itself is logged
    assert "authenticate" in out  # with its frames
    for secret in (KEY, JWT, "configured-signing-key-0123456789", "secret_local"):
        assert secret not in out, (secret, out)
