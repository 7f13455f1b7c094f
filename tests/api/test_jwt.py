"""JWT authentication: HS256 and JWKS tokens, every attack refused with the same 401.

The JWKS is served by a real HTTP server on 127.0.0.1 (`JwksServer`), which counts the
requests it gets and can be made to fail or stop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import uuid4

import httpx
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi import FastAPI
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from jobgate.auth import api_keys
from jobgate.auth import jwt as jwt_auth
from jobgate.auth.api_keys import AUTH_FAILED
from jobgate.auth.jwt import MAX_TOKEN_CHARS, JwtVerifier
from jobgate.config import Settings
from jobgate.errors import Unauthenticated
from jobgate.ids import now
from tests.api.conftest import AppFactory

SECRET = "hs256-test-secret-" + "s" * 32
ExpectProblem = Callable[[httpx.Response, int, str], dict[str, Any]]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# -- keys, tokens and the JWKS server ----------------------------------------------------


class Keys:
    """One RSA, one EC P-256 and one Ed25519 key pair, made once per module."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def by_alg(self, alg: str) -> PrivateKey:
        by_alg: dict[str, PrivateKey] = {"RS256": self.rsa, "ES256": self.ec, "EdDSA": self.ed}
        return by_alg[alg]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def jwk(private: PrivateKey, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK of `private`, as an identity provider publishes it."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for `jwt-user-1`, with `overrides` (None removes a claim).

    Each call's `jti` differs, so no two tokens are alike: a token already verified is
    remembered (`VERIFIED_CACHE_S`), and most tests mean to verify afresh.
    """
    at = int(time.time())
    base: dict[str, Any] = {"sub": "jwt-user-1", "iat": at, "exp": at + 300, "jti": uuid4().hex}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def hs256(**overrides: Any) -> str:
    """An HS256 token signed with `SECRET`."""
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def hs256_with(secret: str) -> str:
    return jwt.encode(claims(), secret, algorithm="HS256")


def signed(private: PrivateKey, alg: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**overrides), private, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def by_hand(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built without PyJWT, which refuses to make these (`none`, PEM HMAC keys)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


class JwksServer:
    """A JWKS host on 127.0.0.1: serves `jwks` at `path`, counts hits, can fail or stop."""

    def __init__(self, path: str = "/jwks.json") -> None:
        self.path = path
        self.jwks: dict[str, Any] = {"keys": []}
        self.failing = False
        self.hits = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self._running = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def serve(self, *entries: dict[str, Any]) -> None:
        self.jwks = {"keys": list(entries)}

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.hits += 1
                if owner.failing or self.path != owner.path:
                    self.send_error(503 if owner.failing else 404)
                    return
                body = json.dumps(owner.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def server(keys: Keys) -> Iterator[JwksServer]:
    """A running JWKS host publishing the RSA (`rsa-1`), EC (`ec-1`) and Ed25519 keys."""
    host = JwksServer()
    host.serve(
        jwk(keys.rsa, "rsa-1", "RS256"),
        jwk(keys.ec, "ec-1", "ES256"),
        jwk(keys.ed, "ed-1", "EdDSA"),
    )
    yield host
    host.stop()


@pytest.fixture
def jwt_app(app_factory: AppFactory, server: JwksServer) -> Callable[..., Awaitable[FastAPI]]:
    """Build an app that takes HS256 with `SECRET` and JWKS tokens from `server`."""

    async def build(**settings: Any) -> FastAPI:
        options: dict[str, Any] = {"auth_jwt_secret": SECRET, "auth_jwks_url": server.url}
        return await app_factory(**{**options, **settings})

    return build


async def call(
    app: FastAPI, token: str, method: str = "GET", path: str = "/v1/me", **kwargs: Any
) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        headers = {b"authorization": f"Bearer {token}".encode("latin-1")}
        return await client.request(method, path, headers=headers, **kwargs)


async def refused(app: FastAPI, token: str, expect_problem: ExpectProblem) -> None:
    body = expect_problem(await call(app, token), 401, "unauthenticated")
    assert body["detail"] == AUTH_FAILED


# -- tokens that verify --------------------------------------------------------------------


async def test_hs256_with_the_shared_secret_is_accepted(jwt_app: Any) -> None:
    """An HS256 token signed with `JOBGATE_AUTH_JWT_SECRET` is its `sub`, with its roles."""
    app = await jwt_app()
    response = await call(app, hs256(roles=["user", "viewer"]))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "jwt-user-1"
    assert response.json()["roles"] == ["user", "viewer"]


@pytest.mark.parametrize(("alg", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1")])
async def test_rs256_es256_eddsa_from_the_jwks_are_accepted(
    jwt_app: Any, keys: Keys, alg: str, kid: str
) -> None:
    """A token signed with a key the JWKS publishes verifies, picked by its `kid`."""
    app = await jwt_app()
    response = await call(app, signed(keys.by_alg(alg), alg, kid, roles="admin"))
    assert response.status_code == 200, response.text
    assert response.json()["roles"] == ["admin"]


async def test_a_token_without_kid_may_use_the_only_key_of_a_one_key_jwks(
    jwt_app: Any, keys: Keys, server: JwksServer, expect_problem: ExpectProblem
) -> None:
    """No `kid`: the single key of a one-key JWKS is used; with several keys it is 401."""
    server.serve(jwk(keys.ec, "ec-1", "ES256"))
    app = await jwt_app()
    assert (await call(app, signed(keys.ec, "ES256", None))).status_code == 200

    two = JwksServer()
    try:
        two.serve(jwk(keys.ec, "ec-1", "ES256"), jwk(keys.rsa, "rsa-1", "RS256"))
        other = await jwt_app(auth_jwks_url=two.url)
        await refused(other, signed(keys.ec, "ES256", None), expect_problem)
    finally:
        two.stop()


async def test_api_keys_keep_working_next_to_jwts(
    app_factory: AppFactory, server: JwksServer
) -> None:
    """With JWTs configured, `jg_` API keys still authenticate as before."""
    app = await app_factory(auth_jwt_secret=SECRET, auth_jwks_url=server.url)
    async with app.state.jobgate.db.write() as conn:
        _, key = await api_keys.create_key(conn, owner="key-owner", roles=["user"], at=now())
    response = await call(app, key)
    assert response.status_code == 200
    assert response.json()["id"] == "key-owner"


async def test_a_jwt_works_on_the_jobs_and_health_routes(jwt_app: Any, keys: Keys) -> None:
    """A JWT authenticates every route family: submit, list, health."""
    app = await jwt_app()
    token = signed(keys.rsa, "RS256", "rsa-1")
    submitted = await call(app, token, "POST", "/v1/jobs", json={"pipeline": "noop", "params": {}})
    assert submitted.status_code == 202, submitted.text
    listed = await call(app, token, "GET", "/v1/jobs")
    assert listed.status_code == 200
    assert [job["id"] for job in listed.json()["jobs"]] == [submitted.json()["id"]]
    assert (await call(app, token, "GET", "/v1/health")).status_code in (200, 503)


# -- roles -----------------------------------------------------------------------------------


async def test_roles_from_a_dotted_claim(jwt_app: Any) -> None:
    """`JOBGATE_AUTH_ROLES_CLAIM=app_metadata.roles` reads a nested list (Supabase style)."""
    app = await jwt_app(auth_roles_claim="app_metadata.roles")
    token = hs256(app_metadata={"roles": ["admin", "viewer"]}, roles=["viewer"])
    assert (await call(app, token)).json()["roles"] == ["admin", "viewer"]


async def test_roles_from_a_claim_whose_name_has_dots(jwt_app: Any) -> None:
    """A namespaced top-level claim (Auth0's `https://…/roles`) is read as a whole."""
    app = await jwt_app(auth_roles_claim="https://jobgate.example.com/roles")
    token = hs256(**{"https://jobgate.example.com/roles": ["admin"]})
    assert (await call(app, token)).json()["roles"] == ["admin"]


async def test_roles_from_a_string_claim(jwt_app: Any) -> None:
    """A roles claim that is one string is one role."""
    app = await jwt_app()
    assert (await call(app, hs256(roles="viewer"))).json()["roles"] == ["viewer"]


async def test_no_roles_claim_means_user(jwt_app: Any) -> None:
    """A token without the roles claim (or its parent object) is a `user`."""
    app = await jwt_app(auth_roles_claim="app_metadata.roles")
    assert (await call(app, hs256())).json()["roles"] == ["user"]
    assert (await call(app, hs256(app_metadata={"provider": "email"}))).json()["roles"] == ["user"]


async def test_unknown_roles_are_dropped(jwt_app: Any) -> None:
    """Role names jobgate does not know are ignored."""
    app = await jwt_app()
    assert (await call(app, hs256(roles=["superuser", "viewer"]))).json()["roles"] == ["viewer"]


@pytest.mark.parametrize(
    "roles", [["superuser"], [], "authenticated", {"admin": True}, 7], ids=repr
)
async def test_a_roles_claim_with_no_known_role_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem, roles: Any
) -> None:
    """A roles claim that names no known role (or is not a list or string) is 401."""
    app = await jwt_app()
    await refused(app, hs256(roles=roles), expect_problem)


async def test_a_roles_claim_of_null_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """`"roles": null` is a claim that is neither a list nor a string: 401, not the
    default role a missing claim gets."""
    app = await jwt_app()
    await refused(
        app, jwt.encode({**claims(), "roles": None}, SECRET, algorithm="HS256"), expect_problem
    )


async def test_a_viewer_jwt_cannot_submit(jwt_app: Any, expect_problem: ExpectProblem) -> None:
    """A `viewer` JWT reads but may not submit: 403."""
    app = await jwt_app()
    token = hs256(roles=["viewer"])
    response = await call(app, token, "POST", "/v1/jobs", json={"pipeline": "noop", "params": {}})
    expect_problem(response, 403, "forbidden")
    assert (await call(app, token, "GET", "/v1/jobs")).status_code == 200


# -- attacks and bad tokens ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_refused(jwt_app: Any, expect_problem: ExpectProblem, alg: str) -> None:
    """An unsigned token (`alg: none`, any spelling) is 401, also with a `kid` of the JWKS."""
    app = await jwt_app()
    await refused(app, by_hand({"alg": alg, "typ": "JWT"}, claims(), None), expect_problem)
    token = by_hand({"alg": alg, "kid": "rsa-1"}, claims(roles="admin"), None)
    await refused(app, token, expect_problem)


@pytest.mark.parametrize("with_secret", [False, True], ids=["jwks-only", "jwks-and-secret"])
async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    jwt_app: Any, keys: Keys, expect_problem: ExpectProblem, with_secret: bool
) -> None:
    """Algorithm confusion: HS256 with the RSA public key (PEM) as HMAC secret is 401."""
    app = await jwt_app(auth_jwt_secret=SECRET if with_secret else "")
    pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for kid in ("rsa-1", None):
        header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
        await refused(app, by_hand(header, claims(roles="admin"), pem), expect_problem)


async def test_a_token_whose_alg_does_not_match_its_key_type_is_refused(
    jwt_app: Any, keys: Keys, expect_problem: ExpectProblem
) -> None:
    """A token naming an RSA key's `kid` but another algorithm (ES256, PS256) is 401."""
    app = await jwt_app()
    await refused(app, signed(keys.ec, "ES256", "rsa-1"), expect_problem)
    await refused(app, signed(keys.rsa, "PS256", "rsa-1"), expect_problem)
    await refused(app, signed(keys.rsa, "RS512", "rsa-1"), expect_problem)


async def test_hs256_is_refused_when_no_secret_is_configured(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """Without `JOBGATE_AUTH_JWT_SECRET`, HS256 is not an algorithm jobgate accepts."""
    app = await jwt_app(auth_jwt_secret="")
    await refused(app, hs256(), expect_problem)


async def test_a_symmetric_key_published_in_the_jwks_is_never_used(
    jwt_app: Any, server: JwksServer, expect_problem: ExpectProblem
) -> None:
    """An `oct` key in the JWKS is ignored: its HS256 tokens are 401."""
    shared = b"k" * 48
    server.serve({"kty": "oct", "kid": "hmac-1", "alg": "HS256", "k": b64(shared)})
    app = await jwt_app(auth_jwt_secret="")
    token = jwt.encode(claims(), shared, algorithm="HS256", headers={"kid": "hmac-1"})
    await refused(app, token, expect_problem)


async def test_a_token_signed_by_an_unpublished_key_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """A forged token using a published `kid` but another private key is 401."""
    app = await jwt_app()
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await refused(app, signed(forger, "RS256", "rsa-1", roles="admin"), expect_problem)
    await refused(app, hs256_with("another-secret-" + "x" * 32), expect_problem)


async def test_an_expired_token_is_refused(jwt_app: Any, expect_problem: ExpectProblem) -> None:
    """`exp` in the past beyond the leeway is 401; within the leeway it still passes."""
    app = await jwt_app(auth_leeway_s=30)
    at = int(time.time())
    await refused(app, hs256(exp=at - 31, iat=at - 600), expect_problem)
    assert (await call(app, hs256(exp=at - 20, iat=at - 600))).status_code == 200


async def test_a_token_before_its_nbf_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """`nbf` in the future beyond the leeway is 401."""
    app = await jwt_app()
    await refused(app, hs256(nbf=int(time.time()) + 3600), expect_problem)


async def test_a_token_issued_in_the_future_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """`iat` in the future beyond the leeway is 401; a non-numeric `iat` too."""
    app = await jwt_app()
    await refused(app, hs256(iat=int(time.time()) + 3600), expect_problem)
    await refused(app, hs256(iat="yesterday"), expect_problem)


async def test_a_token_for_another_audience_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """With `JOBGATE_AUTH_AUDIENCE`, a token for another audience is 401."""
    app = await jwt_app(auth_audience="jobgate")
    await refused(app, hs256(aud="billing"), expect_problem)
    await refused(app, hs256(aud=["billing", "mail"]), expect_problem)
    assert (await call(app, hs256(aud=["billing", "jobgate"]))).status_code == 200


async def test_a_token_without_aud_is_refused_when_an_audience_is_configured(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """With an audience configured, a token that names none is 401."""
    app = await jwt_app(auth_audience="jobgate")
    await refused(app, hs256(), expect_problem)


async def test_aud_is_not_checked_when_no_audience_is_configured(jwt_app: Any) -> None:
    """Without `JOBGATE_AUTH_AUDIENCE`, any `aud` passes (Supabase's `authenticated`)."""
    app = await jwt_app()
    assert (await call(app, hs256(aud="authenticated"))).status_code == 200


async def test_a_token_from_another_issuer_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """With `JOBGATE_AUTH_ISSUER`, another `iss`, or none, is 401."""
    app = await jwt_app(auth_issuer="https://idp.example.com")
    await refused(app, hs256(iss="https://evil.example.com"), expect_problem)
    await refused(app, hs256(), expect_problem)
    assert (await call(app, hs256(iss="https://idp.example.com"))).status_code == 200


@pytest.mark.parametrize("claim", ["exp", "sub"])
async def test_a_token_without_exp_or_sub_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem, claim: str
) -> None:
    """`exp` and `sub` are required."""
    app = await jwt_app()
    await refused(app, hs256(**{claim: None}), expect_problem)


@pytest.mark.parametrize("sub", ["", 42, ["a"], "u" * 256, "a\x00b"], ids=repr)
async def test_a_token_with_an_empty_or_non_string_sub_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem, sub: Any
) -> None:
    """`sub` must be a non-empty string an owner id can be: at most 255 characters, no
    NUL (regression: such a token was accepted, and its submits were 500 on PostgreSQL)."""
    app = await jwt_app()
    await refused(app, hs256(sub=sub), expect_problem)


async def test_a_subject_of_255_characters_submits(jwt_app: Any) -> None:
    """The longest `sub` an owner id holds works on every route, submits included."""
    app = await jwt_app()
    token = hs256(sub="u" * 255)
    response = await call(app, token, "POST", "/v1/jobs", json={"pipeline": "noop", "params": {}})
    assert response.status_code == 202, response.text
    assert (await call(app, token)).json()["id"] == "u" * 255


HUGE = 10**400


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": HUGE},
        {"exp": str(HUGE)},
        {"exp": 1e300},
        {"nbf": -HUGE},
        {"iat": -HUGE},
        {"iat": True},
    ],
    ids=["exp-400-digits", "exp-400-digit-string", "exp-1e300", "nbf", "iat", "iat-bool"],
)
async def test_a_time_claim_no_date_can_hold_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem, overrides: dict[str, Any]
) -> None:
    """A validly signed token whose `exp`, `nbf` or `iat` is not a number within years
    1 to 9999 is 401, never a 500."""
    app = await jwt_app()
    await refused(app, hs256(**overrides), expect_problem)


def segments(header: bytes, payload: bytes = b"{}") -> str:
    return f"{b64(header)}.{b64(payload)}.{b64(b'signature')}"


MALFORMED = {
    "garbage": "not-a-jwt",
    "one-dot": "abc.def",
    "empty-segments": "..",
    "bad-base64": "!!!.@@@.###",
    "header-not-json": segments(b"{nope"),
    "header-a-list": segments(b"[1]"),
    "alg-a-list": segments(b'{"alg": ["HS256"]}'),
    "kid-a-number": segments(b'{"alg": "RS256", "kid": 5}'),
    "no-alg": segments(b'{"typ": "JWT"}'),
    "non-ascii": "\u00e4.\u00f6.\u00fc",
}


@pytest.mark.parametrize("token", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_malformed_token_is_refused(
    jwt_app: Any, expect_problem: ExpectProblem, token: str
) -> None:
    """Garbage, bad base64, bad JSON, odd headers: 401, never a 500."""
    app = await jwt_app()
    await refused(app, token, expect_problem)


async def test_a_payload_that_is_not_json_is_refused_even_when_signed(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """A correctly signed token whose payload is not a JSON object is 401."""
    app = await jwt_app()
    header = b64(json.dumps({"alg": "HS256"}).encode())
    for payload in (b"[1, 2]", b"not json"):
        signing_input = f"{header}.{b64(payload)}"
        signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        await refused(app, f"{signing_input}.{b64(signature)}", expect_problem)


async def test_a_token_over_8_kb_is_refused_before_parsing(
    jwt_app: Any, expect_problem: ExpectProblem
) -> None:
    """A validly signed token longer than 8 KB is 401 without being parsed."""
    app = await jwt_app()
    token = hs256(padding="x" * MAX_TOKEN_CHARS)
    with structlog.testing.capture_logs() as logs:
        await refused(app, token, expect_problem)
    assert {"event": "jwt_rejected", "reason": "too_large", "log_level": "debug"} in logs


async def test_without_jwt_settings_every_non_key_token_is_refused(
    app_factory: AppFactory, expect_problem: ExpectProblem
) -> None:
    """With no secret and no JWKS configured, a token that is not an API key is 401."""
    app = await app_factory()
    assert app.state.jobgate.jwt is None
    await refused(app, hs256(), expect_problem)


# -- the JWKS: fetching, caching, rotation -----------------------------------------------


async def test_an_unknown_kid_storm_fetches_the_jwks_at_most_once_per_interval(
    jwt_app: Any, keys: Keys, server: JwksServer
) -> None:
    """50 requests with random `kid`s make one JWKS fetch per min-refresh interval (3 s:
    two storms of 50 and a request between must fit in one on a loaded machine)."""
    storms = [[signed(keys.ec, "ES256", secrets.token_hex(8)) for _ in range(50)] for _ in "abc"]
    valid = signed(keys.ec, "ES256", "ec-1")
    app = await jwt_app(auth_jwks_min_refresh_s=3.0)

    async def storm(tokens: list[str]) -> None:
        answers = await asyncio.gather(*(call(app, token) for token in tokens))
        assert {answer.status_code for answer in answers} == {401}

    await storm(storms[0])
    assert server.hits == 1  # the first fetch, shared by all 50
    assert (await call(app, valid)).status_code == 200
    await storm(storms[1])
    assert server.hits == 1  # within the interval: no fetch at all
    await asyncio.sleep(3.0)
    await storm(storms[2])
    assert server.hits == 2  # one more interval, one more fetch


async def test_cached_keys_still_verify_while_the_jwks_host_fails(
    jwt_app: Any, keys: Keys, server: JwksServer
) -> None:
    """A JWKS host answering 503 after the first fetch: the cached keys keep verifying."""
    app = await jwt_app(auth_jwks_cache_s=0.2, auth_jwks_min_refresh_s=0.1)
    assert (await call(app, signed(keys.rsa, "RS256", "rsa-1"))).status_code == 200
    server.failing = True
    await asyncio.sleep(0.25)
    # Stale: refreshed in the background.
    assert (await call(app, signed(keys.rsa, "RS256", "rsa-1"))).status_code == 200
    await wait_for(lambda: server.hits >= 2)
    await asyncio.sleep(0.05)
    # The failed refresh dropped nothing.
    assert (await call(app, signed(keys.rsa, "RS256", "rsa-1"))).status_code == 200


async def test_cached_keys_still_verify_after_the_jwks_host_is_gone(
    jwt_app: Any, keys: Keys, server: JwksServer
) -> None:
    """A JWKS host that stopped (connection refused): the cached keys keep verifying."""
    app = await jwt_app(auth_jwks_cache_s=0.2, auth_jwks_min_refresh_s=0.1)
    assert (await call(app, signed(keys.ed, "EdDSA", "ed-1"))).status_code == 200
    server.stop()
    for _ in range(3):
        await asyncio.sleep(0.25)
        assert (await call(app, signed(keys.ed, "EdDSA", "ed-1"))).status_code == 200


async def test_a_rotated_in_key_is_accepted_after_one_refetch(
    jwt_app: Any, keys: Keys, server: JwksServer
) -> None:
    """A new `kid` on the JWKS host is fetched once and then verifies from the cache."""
    server.serve(jwk(keys.rsa, "old", "RS256"))
    app = await jwt_app(auth_jwks_min_refresh_s=0.1)
    assert (await call(app, signed(keys.rsa, "RS256", "old"))).status_code == 200
    assert server.hits == 1
    new_key = ec.generate_private_key(ec.SECP256R1())
    server.serve(jwk(keys.rsa, "old", "RS256"), jwk(new_key, "new", "ES256"))
    await asyncio.sleep(0.1)
    for _ in range(3):
        assert (await call(app, signed(new_key, "ES256", "new"))).status_code == 200
    assert server.hits == 2


async def test_a_failed_first_fetch_is_401_and_retried_after_the_interval(
    jwt_app: Any, keys: Keys, server: JwksServer
) -> None:
    """No JWKS yet: 401; no new fetch within the interval; the next one after it works."""
    server.failing = True
    app = await jwt_app(auth_jwks_min_refresh_s=0.3)
    token = signed(keys.rsa, "RS256", "rsa-1")
    assert (await call(app, token)).status_code == 401
    assert (await call(app, token)).status_code == 401
    assert server.hits == 1
    server.failing = False
    await asyncio.sleep(0.3)
    assert (await call(app, token)).status_code == 200
    assert server.hits == 2


async def test_the_supabase_url_derives_the_jwks_url_and_the_issuer(
    app_factory: AppFactory, keys: Keys, expect_problem: ExpectProblem
) -> None:
    """`JOBGATE_AUTH_SUPABASE_URL` means `<url>/auth/v1/.well-known/jwks.json` and `iss`."""
    host = JwksServer(path="/auth/v1/.well-known/jwks.json")
    try:
        host.serve(jwk(keys.ec, "supabase-1", "ES256"))
        app = await app_factory(auth_supabase_url=host.base_url + "/")
        issuer = host.base_url + "/auth/v1"
        token = signed(keys.ec, "ES256", "supabase-1", iss=issuer, aud="authenticated")
        response = await call(app, token)
        assert response.status_code == 200, response.text
        assert host.hits == 1
        wrong = signed(keys.ec, "ES256", "supabase-1", iss="https://other.supabase.co/auth/v1")
        await refused(app, wrong, expect_problem)
    finally:
        host.stop()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- one answer for every failure, and no token in the logs --------------------------------


def failures(keys: Keys) -> dict[str, str]:
    """A token for every kind of failure, against `SECRET` and no JWKS."""
    at = int(time.time())
    return {
        "garbage": "garbage",
        "too-large": hs256(padding="x" * MAX_TOKEN_CHARS),
        "alg-none": by_hand({"alg": "none"}, claims(), None),
        "wrong-secret": hs256_with("wrong-secret-" + "w" * 32),
        "no-jwks": signed(keys.rsa, "RS256", "rsa-1"),
        "expired": hs256(exp=at - 3600),
        "not-yet": hs256(nbf=at + 3600),
        "future-iat": hs256(iat=at + 3600),
        "no-exp": hs256(exp=None),
        "no-sub": hs256(sub=None),
        "no-role": hs256(roles=["root"]),
    }


async def test_every_jwt_failure_raises_the_same_unauthenticated(keys: Keys) -> None:
    """Unit level: every kind of failure is `Unauthenticated(AUTH_FAILED)`, nothing else."""
    verifier = JwtVerifier(secret=SECRET)
    try:
        for kind, token in failures(keys).items():
            with pytest.raises(Unauthenticated) as caught:
                await verifier.verify(token)
            assert caught.value.message == AUTH_FAILED, kind
            assert caught.value.__cause__ is None, kind
            assert caught.value.__suppress_context__, kind
    finally:
        await verifier.aclose()


async def test_every_jwt_failure_gets_the_identical_401(
    app_factory: AppFactory, keys: Keys
) -> None:
    """Over HTTP every failure is the same 401 body and headers, but for the request id."""
    app = await app_factory(auth_jwt_secret=SECRET)
    answers = set()
    for token in failures(keys).values():
        response = await call(app, token)
        body = response.json()
        del body["request_id"]
        answers.add(
            (
                response.status_code,
                response.headers["www-authenticate"],
                json.dumps(body, sort_keys=True),
            )
        )
    assert len(answers) == 1
    status, _, body = answers.pop()
    assert status == 401
    assert json.loads(body)["detail"] == AUTH_FAILED


async def test_rejections_log_a_reason_but_never_the_token(
    app_factory: AppFactory, keys: Keys
) -> None:
    """The log says why a token was refused, without the token or any part of it."""
    app = await app_factory(auth_jwt_secret=SECRET)
    tokens = failures(keys)
    with structlog.testing.capture_logs() as logs:
        for token in tokens.values():
            await call(app, token)
    rejected = [entry for entry in logs if entry["event"] == "jwt_rejected"]
    assert len(rejected) == len(tokens)
    assert all(entry["reason"] for entry in rejected)
    text = repr(logs)
    for token in tokens.values():
        for part in token.split("."):
            assert len(part) < 8 or part not in text


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        "short",
        "x" * 31,
        "secret",
        "changeme",
        "your-super-secret-jwt-token-with-at-least-32-characters-long",
        "super-secret-jwt-token-with-at-least-32-characters-long",
    ],
)
def test_prod_refuses_a_short_or_well_known_jwt_secret(secret: str) -> None:
    """`JOBGATE_ENV=prod` refuses a JWT secret under 32 characters or from documentation."""
    with pytest.raises(ValidationError, match="JOBGATE_AUTH_JWT_SECRET"):
        Settings(env="prod", signing_key="x" * 40, auth_jwt_secret=secret)


def test_prod_accepts_a_strong_jwt_secret_and_dev_anything() -> None:
    """A random 32+ character secret passes in prod; dev takes any secret."""
    strong = secrets.token_urlsafe(32)
    assert Settings(env="prod", signing_key="x" * 40, auth_jwt_secret=strong).auth_jwt_secret
    assert Settings(env="prod", signing_key="x" * 40).auth_jwt_secret == ""
    assert Settings(env="dev", auth_jwt_secret="secret").auth_jwt_secret == "secret"


async def test_a_verified_token_is_remembered_but_never_past_its_ttl_or_exp(
    jwt_app: Any, keys: Keys, server: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token is verified once and then taken on trust, for `VERIFIED_CACHE_S` at most
    (a key taken off the JWKS stops working within it) and never past its `exp`."""
    monkeypatch.setattr(jwt_auth, "VERIFIED_CACHE_S", 0.5)
    app = await jwt_app(auth_jwks_min_refresh_s=0.0, auth_leeway_s=0)
    token = signed(keys.rsa, "RS256", "rsa-1")
    assert (await call(app, token)).status_code == 200
    server.serve(jwk(keys.ec, "ec-1", "ES256"))  # the RSA key is withdrawn ...
    await call(app, signed(keys.rsa, "RS256", "unknown"))  # ... and the JWKS refetched
    assert server.hits == 2
    assert (await call(app, token)).status_code == 200  # remembered
    assert (await call(app, signed(keys.rsa, "RS256", "rsa-1"))).status_code == 401
    await asyncio.sleep(0.6)
    assert (await call(app, token)).status_code == 401  # the TTL ran out

    server.serve(jwk(keys.rsa, "rsa-1", "RS256"))
    monkeypatch.setattr(jwt_auth, "VERIFIED_CACHE_S", 60.0)
    short = signed(keys.rsa, "RS256", "rsa-1", exp=int(time.time()) + 2)
    assert (await call(app, short)).status_code == 200
    await asyncio.sleep(max(0.0, int(time.time()) + 2 - time.time()) + 0.1)
    assert (await call(app, short)).status_code == 401  # its exp passed
