"""JWTs: bearer tokens signed with a shared secret (HS256) or a key from a JWKS.

Key contracts:

- The algorithm a token may use comes only from the configured keys, never from the
  token: HS256 only with `JOBGATE_AUTH_JWT_SECRET`, an asymmetric algorithm only with
  the JWKS key of the token's `kid` whose algorithm it is. So `alg: none`, and HS256
  signed with a public key as the HMAC secret (algorithm confusion), never verify.
- `exp` and `sub` are required; `nbf` and `iat` are checked when present; `aud` and
  `iss` when configured (then a token without them is refused). `exp`, `nbf` and `iat`
  must be numbers within years 1 to 9999 (a 400-digit `exp` is refused, not an error).
- Every failure raises `Unauthenticated(AUTH_FAILED)`, one message for all; the reason
  is logged at debug level, the token never.
- A verified token is remembered for `VERIFIED_CACHE_S` (never past its `exp`), so
  its signature is not checked again on every request.
- The JWKS is fetched when first needed, one fetch at a time, and at most once per
  `auth_jwks_min_refresh_s` whatever asks for it (an unknown `kid`, a stale cache, a
  failed first fetch). Keys older than `auth_jwks_cache_s` are refreshed in the
  background; only a successful fetch replaces them, so while the JWKS host is down
  the cached keys keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import structlog

from jobgate.auth.api_keys import AUTH_FAILED
from jobgate.auth.principal import ROLES, Principal
from jobgate.errors import Unauthenticated
from jobgate.ids import MAX_EPOCH, MIN_EPOCH

if TYPE_CHECKING:
    from jobgate.config import Settings

MAX_TOKEN_CHARS = 8192
"""Longer bearer tokens are refused before any parsing."""
MAX_SUBJECT_LENGTH = 255
"""A longer `sub` is refused: it is the owner id, stored in columns this wide."""
HS_ALGORITHM = "HS256"
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ROLES = frozenset({"user"})
FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 1_000_000
VERIFIED_CACHE_S = 60.0
"""How long a verified token is taken on trust (never past its `exp`)."""
VERIFIED_CACHE_MAX = 10_000
SUPABASE_ISSUER_PATH = "/auth/v1"
SUPABASE_JWKS_PATH = "/auth/v1/.well-known/jwks.json"

log = structlog.get_logger("jobgate.auth")


class _Rejected(Exception):
    """Why a token is refused: logged, never shown to the caller."""


def from_settings(settings: Settings) -> JwtVerifier | None:
    """The app's JWT verifier, or None when neither a secret nor a JWKS is configured.

    `auth_supabase_url` stands for the JWKS URL `<url>/auth/v1/.well-known/jwks.json`
    and the issuer `<url>/auth/v1`, unless those are set explicitly.
    """
    supabase = settings.auth_supabase_url.rstrip("/")
    jwks_url = settings.auth_jwks_url or (supabase + SUPABASE_JWKS_PATH if supabase else "")
    issuer = settings.auth_issuer or (supabase + SUPABASE_ISSUER_PATH if supabase else "")
    if not settings.auth_jwt_secret and not jwks_url:
        return None
    return JwtVerifier(
        secret=settings.auth_jwt_secret,
        jwks_url=jwks_url,
        audience=settings.auth_audience,
        issuer=issuer,
        leeway_s=settings.auth_leeway_s,
        roles_claim=settings.auth_roles_claim,
        jwks_min_refresh_s=settings.auth_jwks_min_refresh_s,
        jwks_cache_s=settings.auth_jwks_cache_s,
    )


class JwtVerifier:
    """Turns a JWT into a `Principal`; built once per app, closed with `aclose()`.

    Args:
        secret: The HS256 shared secret ("" refuses HS256).
        jwks_url: Where the public keys are published ("" refuses asymmetric tokens).
        audience: The required `aud` ("": not checked).
        issuer: The required `iss` ("": not checked).
        leeway_s: The clock skew allowed on `exp`, `nbf` and `iat`.
        roles_claim: The claim that holds the roles: a name or a dotted path.
        jwks_min_refresh_s: The shortest time between two JWKS fetches.
        jwks_cache_s: The age after which the JWKS is refreshed.
    """

    def __init__(
        self,
        *,
        secret: str = "",
        jwks_url: str = "",
        audience: str = "",
        issuer: str = "",
        leeway_s: float = 30.0,
        roles_claim: str = "roles",
        jwks_min_refresh_s: float = 60.0,
        jwks_cache_s: float = 600.0,
    ) -> None:
        self._secret = secret.encode()
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway_s = leeway_s
        self._roles_claim = roles_claim
        self._jwks = (
            JwksCache(jwks_url, min_refresh_s=jwks_min_refresh_s, cache_s=jwks_cache_s)
            if jwks_url
            else None
        )
        required = ["exp", "sub"]
        if audience:
            required.append("aud")
        if issuer:
            required.append("iss")
        # Without a configured audience `aud` is not checked (PyJWT would refuse any).
        self._decoder = jwt.PyJWT({"require": required, "verify_aud": bool(audience)})
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        """The principal a JWT stands for: `sub` and the roles of the roles claim.

        Raises:
            Unauthenticated: the token is malformed, not signed by a configured key, or
                its claims do not hold (one message for every reason).
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, valid_until = cached
            if time.time() < valid_until:
                return principal
            del self._verified[token]
        try:
            claims = await self._claims(token)
            roles = _roles_from(claims, self._roles_claim)
        except _Rejected as exc:
            log.debug("jwt_rejected", reason=str(exc))
            raise Unauthenticated(AUTH_FAILED) from None
        principal = Principal(id=claims["sub"], roles=roles)
        self._remember(token, principal, expires_at=float(claims["exp"]))
        return principal

    def _remember(self, token: str, principal: Principal, *, expires_at: float) -> None:
        # A client sends the same token with every request until it expires: checking
        # its signature once per VERIFIED_CACHE_S, not per request, takes the cost of
        # a JWT down to that of an API key (bench/auth.py). The entry never outlives
        # the token, and a key taken off the JWKS stops working within the TTL after
        # the next fetch.
        if len(self._verified) >= VERIFIED_CACHE_MAX:
            self._verified.clear()  # crude, but bounded: the cache is an optimisation only
        valid_until = min(expires_at + self._leeway_s, time.time() + VERIFIED_CACHE_S)
        self._verified[token] = (principal, valid_until)

    async def aclose(self) -> None:
        """Stop a background JWKS refresh and close its HTTP client."""
        if self._jwks is not None:
            await self._jwks.aclose()

    async def _claims(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_CHARS:
            raise _Rejected("too_large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Rejected("malformed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise _Rejected("no_algorithm")
        key = await self._key_for(algorithm, header.get("kid"))
        try:
            claims = self._decoder.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
            )
        except jwt.PyJWTError as exc:
            raise _Rejected(type(exc).__name__) from None
        _check_dates(claims)
        _check_subject_and_iat(claims, leeway_s=self._leeway_s)
        return claims

    async def _key_for(self, algorithm: str, kid: str | None) -> jwt.PyJWK | bytes:
        if algorithm == HS_ALGORITHM:
            if not self._secret:
                raise _Rejected("hs256_not_configured")
            return self._secret
        if algorithm not in ASYMMETRIC_ALGORITHMS or self._jwks is None:
            raise _Rejected("algorithm_not_allowed")
        key = await self._jwks.key(kid, algorithm)
        if key is None:
            raise _Rejected("unknown_key")
        return key


def _check_dates(claims: Mapping[str, Any]) -> None:
    # PyJWT takes any integer (or numeric string): a 400-digit `exp` passes its check,
    # and no float or date can hold it afterwards.
    for name in ("exp", "nbf", "iat"):
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Rejected(f"bad_{name}")
        if not MIN_EPOCH <= value <= MAX_EPOCH:  # NaN too
            raise _Rejected(f"bad_{name}")


def _check_subject_and_iat(claims: Mapping[str, Any], *, leeway_s: float) -> None:
    subject = claims.get("sub")
    # The subject is the owner stored on jobs and keys: no longer than those columns,
    # and no NUL, which PostgreSQL text cannot hold.
    if (
        not isinstance(subject, str)
        or not subject
        or len(subject) > MAX_SUBJECT_LENGTH
        or "\x00" in subject
    ):
        raise _Rejected("bad_sub")
    # Checked here too: not every PyJWT version that pyproject allows refuses a future iat.
    issued_at = claims.get("iat")
    if issued_at is None:
        return
    if issued_at > time.time() + leeway_s:
        raise _Rejected("iat_in_future")


def _roles_from(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    """The known roles that `claim` names: a list of role names, or one name.

    `claim` is a top-level claim (which may contain dots, like Auth0's
    `https://example.com/roles`) or else a dotted path such as `app_metadata.roles`.
    A missing claim means `{"user"}`; unknown role names are dropped.

    A claim that is neither a string nor a list, or names no known role, is refused.
    """
    value = _claim_value(claims, claim)
    if value is _MISSING:
        return DEFAULT_ROLES
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise _Rejected("bad_roles_claim")
    roles = frozenset(name for name in names if isinstance(name, str) and name in ROLES)
    if not roles:
        raise _Rejected("no_known_role")
    return roles


_MISSING = object()  # no such claim, unlike a claim whose value is null (refused)


def _claim_value(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


class JwksCache:
    """The public keys published at a JWKS URL, fetched as the module docstring says.

    Args:
        url: The JWKS URL.
        min_refresh_s: The shortest time between two fetch attempts.
        cache_s: The age after which the keys are refreshed in the background.
    """

    def __init__(self, url: str, *, min_refresh_s: float, cache_s: float) -> None:
        self.url = url
        self._min_refresh_s = min_refresh_s
        self._cache_s = cache_s
        self._keys: list[jwt.PyJWK] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        # Redirects are not followed: the configured URL is the only one trusted.
        self._client = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False)

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK | None:
        """The key for a token's `kid` and `alg`, refetching the JWKS if it may.

        A token without `kid` may use the only key of a one-key JWKS.
        """
        if self._fetched_at is None:
            await self.refresh()
        elif time.monotonic() - self._fetched_at >= self._cache_s:
            self._refresh_in_background()
        key = self._find(kid, algorithm)
        if key is None and self._may_fetch():
            await self.refresh()
            key = self._find(kid, algorithm)
        return key

    async def refresh(self) -> None:
        """Fetch the JWKS unless a fetch was tried within `min_refresh_s`.

        A failed fetch keeps the keys there are.
        """
        async with self._lock:
            # Checked again under the lock: whoever waited for it shares the fetch made.
            if not self._may_fetch():
                return
            self._attempted_at = time.monotonic()
            try:
                keys = await self._fetch()
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                log.warning("jwks_fetch_failed", url=self.url, error=type(exc).__name__)
                return
            self._keys = keys
            self._fetched_at = time.monotonic()
            log.info("jwks_fetched", url=self.url, keys=len(keys))

    async def aclose(self) -> None:
        """Cancel a background refresh and close the HTTP client."""
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        await self._client.aclose()

    def _may_fetch(self) -> bool:
        at = self._attempted_at
        return at is None or time.monotonic() - at >= self._min_refresh_s

    def _refresh_in_background(self) -> None:
        if self._may_fetch() and (self._background is None or self._background.done()):
            self._background = asyncio.create_task(self.refresh(), name="jwks-refresh")

    def _find(self, kid: str | None, algorithm: str) -> jwt.PyJWK | None:
        if kid is None:
            only = self._keys[0] if len(self._keys) == 1 else None
            return only if only is not None and only.algorithm_name == algorithm else None
        return next(
            (k for k in self._keys if k.key_id == kid and k.algorithm_name == algorithm), None
        )

    async def _fetch(self) -> list[jwt.PyJWK]:
        async with self._client.stream(
            "GET", self.url, headers={"Accept": "application/json"}
        ) as response:
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS too large")
        return parse_jwks(bytes(body))


def parse_jwks(body: bytes) -> list[jwt.PyJWK]:
    """The signature keys of a JWKS document that jobgate accepts.

    Keys for encryption, private or symmetric keys and keys of other algorithms are
    left out.

    Raises:
        ValueError: not a JWKS, or no usable key in it.
        jwt.PyJWTError: no key could be parsed.
    """
    document = json.loads(body)
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWKS")
    usable = [entry for entry in entries if isinstance(entry, dict) and _is_public_signing(entry)]
    keys = [key for key in jwt.PyJWKSet(usable) if key.algorithm_name in ASYMMETRIC_ALGORITHMS]
    if not keys:
        raise ValueError("no usable key")
    return keys


def _is_public_signing(entry: Mapping[str, Any]) -> bool:
    algorithm = entry.get("alg", "RS256")  # absent: derived from the key type, checked later
    return (
        entry.get("use", "sig") == "sig"
        and entry.get("kty") != "oct"
        and "d" not in entry
        and isinstance(algorithm, str)
        and algorithm in ASYMMETRIC_ALGORITHMS
    )
