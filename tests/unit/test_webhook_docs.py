"""The verifiers `docs/webhooks.md` shows (Python and Node) accept jobgate's signatures
and refuse tampered or stale ones."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from jobgate.webhooks import signing

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
BODY = b'{"type":"completed","timestamp":"2026-11-30T02:33:20.125Z","data":{"job":{"id":"j"}}}'


def _block(language: str) -> str:
    (code,) = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    return str(code)


def _cases() -> list[tuple[str, dict[str, str], bytes, bool]]:
    """(secret, headers, body, authentic) for a fresh delivery and its forgeries."""
    old, new, other = signing.new_secret(), signing.new_secret(), signing.new_secret()
    stamp = int(time.time())
    fresh = signing.headers("msg_1", stamp, BODY, [new, old])
    stale = signing.headers("msg_1", stamp - 3600, BODY, [new])
    return [
        (new, fresh, BODY, True),
        (old, fresh, BODY, True),
        (other, fresh, BODY, False),
        (new, fresh, BODY.replace(b"completed", b"cancelled"), False),
        (new, {**fresh, "webhook-id": "msg_2"}, BODY, False),
        (new, {**fresh, "webhook-timestamp": str(stamp + 1)}, BODY, False),
        (new, stale, BODY, False),
    ]


def test_the_python_verifier_in_the_docs_works() -> None:
    namespace: dict[str, Any] = {}
    exec(_block("python"), namespace)
    verify = namespace["verify"]
    cases = _cases()
    results = [verify(secret, headers, body) for secret, headers, body, _ in cases]
    assert results == [authentic for *_, authentic in cases]


def test_the_javascript_verifier_in_the_docs_works(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    (tmp_path / "verify.js").write_text(_block("javascript"))
    cases = _cases()
    driver = (
        "const { verify } = require('./verify.js');\n"
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify(cases.map(([s, h, b]) => "
        "verify(s, h, Buffer.from(b, 'base64')))));\n"
    )
    (tmp_path / "driver.js").write_text(driver)
    payload = [[s, h, base64.b64encode(b).decode()] for s, h, b, _ in cases]
    done = subprocess.run(
        [node, "driver.js"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        timeout=30,
    )
    assert json.loads(done.stdout) == [authentic for *_, authentic in cases]
