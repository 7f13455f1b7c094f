"""A real `jobgate serve`, driven with every kind of credential, logs none of them.

The server runs with JSON logs at DEBUG level (so SQL statements and the reasons of
refused credentials are logged too); the test then reads everything it wrote.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.e2e.conftest import start_server
from tests.e2e.test_serve import wait_for

pytestmark = pytest.mark.e2e

JWT_SECRET = "e2e-jwt-secret-for-logs-0123456789abcdef"
SIGNING_KEY = "e2e-signing-key-for-logs-0123456789abcdef"


def test_tokens_keys_and_signatures_never_reach_the_logs(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        None,
        worker_concurrency=1,
        settings={
            "JOBGATE_LOG_LEVEL": "DEBUG",
            "JOBGATE_AUTH_JWT_SECRET": JWT_SECRET,
            "JOBGATE_SIGNING_KEY": SIGNING_KEY,
        },
    )
    secrets = {server.key, JWT_SECRET, SIGNING_KEY}
    try:
        with server.client() as admin:
            created = admin.post("/v1/api-keys", json={"owner": "u-logs", "roles": ["user"]})
            user_key = created.json()["key"]
            secrets.add(user_key)
            token = jwt.encode(
                {"sub": "u-jwt", "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256"
            )
            expired = jwt.encode(
                {"sub": "u-jwt", "exp": int(time.time()) - 300}, JWT_SECRET, algorithm="HS256"
            )
            forged = jwt.encode({"sub": "x", "exp": 2**31}, "not-the-secret" * 3, "HS256")
            secrets |= {token, expired, forged}
            for credential, status in (
                (user_key, 200),
                (token, 200),
                (expired, 401),
                (forged, 401),
                (user_key[:-4] + "AAAA", 401),
                ("jg_" + "B" * 40, 401),
            ):
                answer = admin.get("/v1/me", headers={"Authorization": f"Bearer {credential}"})
                assert answer.status_code == status, answer.text
            with_file = admin.post(
                "/v1/jobs",
                data={"pipeline": "text-stats"},
                files=[("files", ("a.txt", b"some words here\n", "text/plain"))],
            )
            wait_for(admin, with_file.json()["id"], {"succeeded"})
            link = admin.get(f"/v1/jobs/{with_file.json()['id']}/download").json()
        url = link["download_url"]
        signature = httpx.URL(url).params["sig"]
        secrets.add(signature)
        assert httpx.get(url, timeout=10).status_code == 200
        assert httpx.get(url.replace("sig=", "sig=0"), timeout=10).status_code == 403
        revoke = httpx.delete(
            f"{server.url}/v1/api-keys/{created.json()['id']}",
            headers={"Authorization": f"Bearer {server.key}"},
        )
        assert revoke.status_code == 204
        refused = httpx.get(f"{server.url}/v1/me", headers={"Authorization": f"Bearer {user_key}"})
        assert refused.status_code == 401
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    # The log saw it all: requests, refusals and the download.
    assert '"status": 401' in log
    assert "/v1/blobs/" in log
    leaked = {secret[:12] + "…" for secret in secrets if secret in log}
    assert not leaked, leaked
    assert signature[:16] not in log
