"""API keys: creating, listing, revoking and verifying them; and authenticating requests.

A key is `jg_` followed by 40 URL-safe random characters (240 bits). Only its SHA-256
is stored, with its first 12 characters (`prefix`) to find the row without a scan.

Key contracts:

- Every authentication failure raises `Unauthenticated` with the same message, so a
  caller cannot tell an unknown key from a revoked or expired one.
- Verified keys are cached in this process for `CACHE_TTL_S`; revoking a key through
  this process drops it from the cache at once (another process may honour it for up
  to `CACHE_TTL_S` more).
- `last_used_at` is written at most once per `TOUCH_EVERY_S` per key, so a busy key
  does not turn every request into a write.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.auth.principal import ROLES, Principal
from jobgate.errors import NotFound, Unauthenticated, ValidationFailed
from jobgate.ids import now, uuid7
from jobgate.store.tables import api_keys

if TYPE_CHECKING:
    from fastapi import Request

    from jobgate.api.state import AppState
    from jobgate.store import Database

KEY_PREFIX = "jg_"
PREFIX_LEN = 12
CACHE_TTL_S = 5.0
_CACHE_MAX = 10_000
TOUCH_EVERY_S = 60.0
AUTH_FAILED = "missing or invalid credentials"

# `jg_` + at least 32 URL-safe characters (API.md); ours have exactly 40.
_KEY_RE = re.compile(r"jg_[A-Za-z0-9_-]{32,128}")
_PUBLIC_COLUMNS = (
    api_keys.c.id,
    api_keys.c.prefix,
    api_keys.c.name,
    api_keys.c.owner,
    api_keys.c.roles,
    api_keys.c.created_at,
    api_keys.c.expires_at,
    api_keys.c.revoked_at,
    api_keys.c.last_used_at,
)
log = structlog.get_logger("jobgate.auth")


def generate_key() -> str:
    """A new random API key: `jg_` + 40 URL-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(30)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored in place of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_roles(roles: Sequence[str]) -> list[str]:
    """`roles` sorted and de-duplicated.

    Raises:
        ValidationFailed: `roles` is empty or names a role that does not exist.
    """
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ValidationFailed(
            "roles must be a non-empty list of: " + ", ".join(ROLES),
            errors=[{"loc": ["roles"], "msg": f"unknown roles: {unknown}" if unknown else "empty"}],
        )
    return sorted(set(roles))


# -- the in-process cache of verified keys ---------------------------------------------


@dataclass
class _Cached:
    principal: Principal
    expires_at: float | None
    last_used_at: float | None
    cached_until: float


_cache: dict[str, _Cached] = {}


def forget(key_id: str) -> None:
    """Drop a key from this process's cache of verified keys (after a revocation)."""
    for key_hash, entry in list(_cache.items()):
        if entry.principal.key_id == key_id:
            _cache.pop(key_hash, None)


def clear_cache() -> None:
    """Forget every verified key (tests)."""
    _cache.clear()


# -- repository functions --------------------------------------------------------------


MAX_LABEL_LENGTH = 255


def _check_owner(owner: str) -> None:
    """Every way in (the command line too) keeps the rule of `POST /v1/api-keys`: an
    owner is 1 to 255 characters, and not all spaces; as for a JWT's `sub`, no NUL
    (PostgreSQL cannot store one)."""
    if not owner.strip() or len(owner) > MAX_LABEL_LENGTH or "\x00" in owner:
        raise ValidationFailed(
            f"owner must be 1 to {MAX_LABEL_LENGTH} characters, not all spaces, with no NUL",
            errors=[{"loc": ["owner"], "msg": f"1 to {MAX_LABEL_LENGTH} characters, not blank"}],
        )


async def create_key(
    conn: AsyncConnection,
    *,
    owner: str,
    roles: Sequence[str],
    name: str | None = None,
    expires_at: float | None = None,
    at: float,
) -> tuple[dict[str, Any], str]:
    """Create an API key for `owner`.

    Args:
        conn: A write transaction.
        owner: The user id the key acts as.
        roles: Its roles (a subset of `ROLES`).
        name: A label for people.
        expires_at: When it stops working (epoch seconds), or None for never.
        at: The time of creation.

    Returns:
        The stored row (without the hash) and the key itself, which is not kept.

    Raises:
        ValidationFailed: a blank or over-long owner, an over-long name, unknown
            roles, or an expiry that is not in the future.
    """
    _check_owner(owner)
    if name is not None and len(name) > MAX_LABEL_LENGTH:
        raise ValidationFailed(
            f"name must be at most {MAX_LABEL_LENGTH} characters",
            errors=[{"loc": ["name"], "msg": f"At most {MAX_LABEL_LENGTH} characters"}],
        )
    if expires_at is not None and expires_at <= at:
        raise ValidationFailed(
            "expires_at must lie in the future",
            errors=[{"loc": ["expires_at"], "msg": "must lie in the future"}],
        )
    key = generate_key()
    row: dict[str, Any] = {
        "id": uuid7(),
        "prefix": key[:PREFIX_LEN],
        "name": name,
        "owner": owner,
        "roles": check_roles(roles),
        "created_at": at,
        "expires_at": expires_at,
        "revoked_at": None,
        "last_used_at": None,
    }
    await conn.execute(insert(api_keys).values(key_hash=hash_key(key), **row))
    return row, key


async def list_keys(
    conn: AsyncConnection, owner: str | None, *, include_revoked: bool = False
) -> list[dict[str, Any]]:
    """The keys of `owner` (every owner's when None), oldest first, without hashes."""
    query = select(*_PUBLIC_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)
    if owner is not None:
        query = query.where(api_keys.c.owner == owner)
    if not include_revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    return [dict(row) for row in (await conn.execute(query)).mappings()]


async def revoke(conn: AsyncConnection, key_id: str, owner: str | None, *, at: float) -> None:
    """Revoke a key; it stops working at once in this process.

    Args:
        conn: A write transaction.
        key_id: The key's id.
        owner: Only a key of this owner may be revoked (None: any key).
        at: The time of revocation.

    Raises:
        NotFound: no such (unrevoked) key, or it belongs to another owner.
    """
    query = (
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=at)
    )
    if owner is not None:
        query = query.where(api_keys.c.owner == owner)
    result = await conn.execute(query)
    forget(key_id)
    if result.rowcount != 1:
        raise NotFound("no such API key")


# -- verification ----------------------------------------------------------------------


async def verify(db: Database, token: str) -> Principal:
    """The principal an API key stands for.

    Args:
        db: The store.
        token: The key as the caller sent it.

    Raises:
        Unauthenticated: malformed, unknown, revoked or expired (one message for all).
    """
    if not _KEY_RE.fullmatch(token):
        raise Unauthenticated(AUTH_FAILED)
    key_hash = hash_key(token)
    at = now()
    entry = _cache.get(key_hash)
    if entry is None or entry.cached_until <= time.monotonic():
        entry = await _load(db, token, key_hash)
    if entry.expires_at is not None and entry.expires_at <= at:
        _cache.pop(key_hash, None)
        raise Unauthenticated(AUTH_FAILED)
    if entry.last_used_at is None or at - entry.last_used_at >= TOUCH_EVERY_S:
        entry.last_used_at = at
        await _touch(db, entry.principal.key_id, at)
    return entry.principal


async def _load(db: Database, token: str, key_hash: str) -> _Cached:
    async with db.read() as conn:
        rows = (
            await conn.execute(select(api_keys).where(api_keys.c.prefix == token[:PREFIX_LEN]))
        ).mappings()
        match = next((row for row in rows if hmac.compare_digest(row["key_hash"], key_hash)), None)
    if match is None or match["revoked_at"] is not None:
        raise Unauthenticated(AUTH_FAILED)
    entry = _Cached(
        principal=Principal(id=match["owner"], roles=frozenset(match["roles"]), key_id=match["id"]),
        expires_at=match["expires_at"],
        last_used_at=match["last_used_at"],
        cached_until=time.monotonic() + CACHE_TTL_S,
    )
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()  # crude, but bounded: the cache is an optimisation only
    _cache[key_hash] = entry
    return entry


async def _touch(db: Database, key_id: str | None, at: float) -> None:
    # Best effort: a busy database must not turn a valid key into a failed request.
    try:
        async with db.write() as conn:
            await conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.id == key_id,
                    or_(
                        api_keys.c.last_used_at.is_(None),
                        api_keys.c.last_used_at <= at - TOUCH_EVERY_S,
                    ),
                )
                .values(last_used_at=at)
            )
    except SQLAlchemyError as exc:
        log.warning("api_key_touch_failed", key_id=key_id, error=type(exc).__name__)


# -- requests --------------------------------------------------------------------------


def bearer_token(request: Request) -> str:
    """The token of an `Authorization: Bearer <token>` header.

    Raises:
        Unauthenticated: the header is missing or not a Bearer credential.
    """
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(AUTH_FAILED)
    return token


async def authenticate_token(state: AppState, token: str) -> Principal:
    """The principal a bearer token stands for: an API key (`jg_...`) or a JWT.

    Raises:
        Unauthenticated: the token is not valid, or it is a JWT and none is configured.
    """
    if token.startswith(KEY_PREFIX):
        return await verify(state.db, token)
    if state.jwt is None:
        raise Unauthenticated(AUTH_FAILED)
    return await state.jwt.verify(token)


async def authenticate_request(request: Request, state: AppState) -> Principal:
    """The caller of `request`, from its `Authorization: Bearer` header.

    Raises:
        Unauthenticated: no credentials, or invalid ones (401 with `WWW-Authenticate`).
    """
    return await authenticate_token(state, bearer_token(request))
