"""The cost of authentication and rate limits on the submit path.

One `jobgate serve --worker-concurrency 0` per variant, all on one fresh PostgreSQL
database and all started before measuring; the runs then go round the variants in
turn (run 1 of each, then run 2 of each, ...), so drift in the machine's speed hits
every variant alike. Each answer must be 202.

Variants: an API key (the baseline), an HS256 JWT, an RS256 JWT verified against a
JWKS served on loopback (cached after the first request), and the API key with the
submit and per-IP limits on memory and on Redis storage (limits high enough never to
refuse, so every request pays for the check and nothing else changes).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from bench._common import Result, fresh_postgres, log, temp_dir
from bench.submit import SINGLE_BODY, Server, _measure, serve

KID = "bench-rsa-1"
HS_SECRET = "bench-hs256-secret-0123456789abcdef0123"
NEVER_REFUSED = "1000000000/hour"
REDIS_LIMITS = "redis://127.0.0.1:6379/0"


@dataclass
class Variant:
    name: str
    settings: dict[str, str]
    token: str | None = None  # None: the server's admin API key


@contextmanager
def jwks_server(document: dict[str, Any]) -> Iterator[str]:
    """A loopback HTTP server answering every GET with `document`; its URL."""
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _variants(jwks_url: str, private_key: rsa.RSAPrivateKey) -> list[Variant]:
    claims = {"sub": "bench", "roles": ["admin"], "exp": int(time.time()) + 24 * 3600}
    hs_token = jwt.encode(claims, HS_SECRET, algorithm="HS256")
    rs_token = jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": KID})
    limits = {"JOBGATE_RATE_LIMIT_SUBMIT": NEVER_REFUSED, "JOBGATE_RATE_LIMIT_IP": NEVER_REFUSED}
    return [
        Variant("API key, no limits (baseline)", {}),
        Variant("HS256 JWT, no limits", {"JOBGATE_AUTH_JWT_SECRET": HS_SECRET}, hs_token),
        Variant(
            "RS256 JWT (cached JWKS), no limits", {"JOBGATE_AUTH_JWKS_URL": jwks_url}, rs_token
        ),
        Variant("API key + limits, memory", {**limits, "JOBGATE_LIMITS_URL": "memory://"}),
        Variant("API key + limits, Redis", {**limits, "JOBGATE_LIMITS_URL": REDIS_LIMITS}),
        Variant(
            "RS256 JWT + limits, Redis",
            {**limits, "JOBGATE_LIMITS_URL": REDIS_LIMITS, "JOBGATE_AUTH_JWKS_URL": jwks_url},
            rs_token,
        ),
    ]


async def run(*, seconds: float, inflight: int, runs: int) -> list[Result]:
    """Submits/s of single `noop` jobs per variant, and each one's ratio to the baseline."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    document = {"keys": [{**public, "kid": KID, "alg": "RS256", "use": "sig"}]}
    url = await fresh_postgres()
    with ExitStack() as stack:
        jwks_url = stack.enter_context(jwks_server(document))
        variants = _variants(jwks_url, private_key)
        servers: list[Server] = []
        for n, variant in enumerate(variants):
            tmp = stack.enter_context(temp_dir(f"auth-{n}"))
            server = stack.enter_context(serve(tmp, url, postgres=True, settings=variant.settings))
            if variant.token is not None:
                server.key = variant.token
            servers.append(server)
        results = [
            Result(
                benchmark=f"HTTP submit noop, {v.name} ({inflight} in flight)",
                database="postgres",
                unit="jobs/s",
            )
            for v in variants
        ]
        for round_no in range(runs):
            log(f"auth round {round_no + 1} of {runs}")
            for server, result in zip(servers, results, strict=True):
                await _measure(
                    server,
                    result,
                    "/v1/jobs",
                    SINGLE_BODY,
                    1,
                    seconds=seconds,
                    inflight=inflight,
                    runs=1,
                )
    baseline = results[0].median
    for result in results[1:]:
        cost = 1 - result.median / baseline
        result.note = f"{result.median / baseline:.0%} of the baseline (costs {cost:.1%})"
    return results
