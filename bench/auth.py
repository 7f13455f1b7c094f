"""The cost of authentication and rate limits on the submit path.

A `jobgate serve --worker-concurrency 0` per variant, each on a fresh PostgreSQL
database, all started at once and measured in turn (run 1 of each, then run 2 of each,
...; each round starting one variant further along, each run after a second of untimed
load), so that drift in the machine's speed hits every variant alike and no variant
always runs in the same place; only the one measured is busy. Each answer must be 202.
A variant's figure is the median, over the
rounds, of its run's ratio to the baseline's run of the same round, and beside it the
server's CPU per submit (median of the runs): on this shared machine the throughput of
one server swings by a third between minutes, and the ratio of neighbours far less.

The load comes from 100 users in turn (an API key or a JWT each), as a shared API sees
it. Variants: API keys (the baseline), HS256 JWTs,
RS256 JWTs verified against a JWKS served on loopback, and the per-user submit limit on
memory and on Redis storage (with and without slots taken ahead), with the per-IP limit
on top in the last. The limits are set
high enough never to refuse, so every request pays for the checks and nothing else
changes.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from bench._common import PG_BENCH_DB, Result, drop_postgres, fresh_postgres, log, temp_dir
from bench.submit import SINGLE_BODY, Figure, Server, _measure_in_turn, serve

KID = "bench-rsa-1"
HS_SECRET = "bench-hs256-secret-0123456789abcdef0123"
USERS = 100
# Per user: more than a run submits (about 1,000 jobs/s over 100 users), so nothing is
# refused, and a window of realistic size (a moving window stores each entry).
SUBMIT_LIMIT = "2000/minute"
# One client address sends everything: the IP limit must let all of it through.
IP_LIMIT = "1000000/minute"
REDIS_LIMITS = "redis://127.0.0.1:6379/0"
# Eight servers at once must stay under PostgreSQL's 100 connections; a submit here
# needs a connection only inside the submit group's two statements.
POOL_SIZE = "5"


@dataclass
class Variant:
    name: str
    settings: dict[str, str]
    credential: str = "key"  # "key", "hs256" or "rs256": what the users send


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


def _variants(jwks_url: str) -> list[Variant]:
    submit = {"JOBGATE_RATE_LIMIT_SUBMIT": SUBMIT_LIMIT}
    redis = {"JOBGATE_LIMITS_URL": REDIS_LIMITS}
    return [
        Variant("API key, no limits (baseline)", {}),
        Variant("HS256 JWT, no limits", {"JOBGATE_AUTH_JWT_SECRET": HS_SECRET}, "hs256"),
        Variant("RS256 JWT (cached JWKS), no limits", {"JOBGATE_AUTH_JWKS_URL": jwks_url}, "rs256"),
        Variant("API key + submit limit, memory", {**submit, "JOBGATE_LIMITS_URL": "memory://"}),
        Variant("API key + submit limit, Redis", {**submit, **redis}),
        Variant(
            "API key + submit limit, Redis, no take-ahead",
            {**submit, **redis, "JOBGATE_LIMITS_TAKE_AHEAD": "false"},
        ),
        Variant(
            "RS256 JWT + submit limit, Redis",
            {**submit, **redis, "JOBGATE_AUTH_JWKS_URL": jwks_url},
            "rs256",
        ),
        Variant(
            "API key + submit and IP limits, Redis",
            {**submit, **redis, "JOBGATE_RATE_LIMIT_IP": IP_LIMIT},
        ),
    ]


def _credentials(variant: Variant, server: Server, private_key: rsa.RSAPrivateKey) -> list[str]:
    """One bearer token for each of `USERS` users, of the variant's kind."""
    owners = [f"bench-user-{n}" for n in range(USERS)]
    if variant.credential == "key":
        headers = {"Authorization": f"Bearer {server.key}"}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as admin:
            created = [
                admin.post("/v1/api-keys", json={"owner": owner, "roles": ["user"]})
                for owner in owners
            ]
        return [answer.json()["key"] for answer in created]
    exp = int(time.time()) + 24 * 3600
    if variant.credential == "hs256":
        return [jwt.encode({"sub": o, "exp": exp}, HS_SECRET, algorithm="HS256") for o in owners]
    return [
        jwt.encode({"sub": o, "exp": exp}, private_key, algorithm="RS256", headers={"kid": KID})
        for o in owners
    ]


async def run(*, seconds: float, inflight: int, runs: int) -> list[Result]:
    """Submits/s of single `noop` jobs per variant, and each one's ratio to the baseline."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    document = {"keys": [{**public, "kid": KID, "alg": "RS256", "use": "sig"}]}
    with jwks_server(document) as jwks_url, contextlib.ExitStack() as stack:
        figures: list[Figure] = []
        for number, variant in enumerate(_variants(jwks_url)):
            database = f"{PG_BENCH_DB}_auth_{number}"
            url = await fresh_postgres(database)
            tmp = stack.enter_context(temp_dir("auth"))
            settings = {**variant.settings, "JOBGATE_DATABASE_POOL_SIZE": POOL_SIZE}
            server = stack.enter_context(serve(tmp, url, postgres=True, settings=settings))
            server.tokens = _credentials(variant, server, private_key)
            result = Result(
                benchmark=f"HTTP submit noop, {variant.name} ({USERS} users, {inflight} in flight)",
                database="postgres",
                unit="jobs/s",
            )
            figures.append(Figure(server, result, "/v1/jobs", SINGLE_BODY, 1, inflight, database))
        log(f"auth: {len(figures)} servers up, measured in turn, {runs} rounds")
        await _measure_in_turn(figures, seconds=seconds, runs=runs)
    for figure in figures:
        await drop_postgres(figure.database_name)
    baseline = figures[0]
    base_cpu = statistics.median(baseline.cpu_us)
    baseline.result.note = f"server CPU {base_cpu:.0f} µs a submit"
    for figure in figures[1:]:
        shares = [
            mine / base
            for mine, base in zip(figure.result.values, baseline.result.values, strict=True)
        ]
        share = statistics.median(shares)
        cpu = statistics.median(figure.cpu_us)
        figure.result.note = (
            f"{share:.0%} of the baseline run for run (median of "
            + " / ".join(f"{s:.0%}" for s in shares)
            + f"); server CPU {cpu:.0f} µs a submit ({cpu - base_cpu:+.0f} µs)"
        )
    return [figure.result for figure in figures]
