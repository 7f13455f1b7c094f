"""`/v1/api-keys`: create, list and revoke API keys.

Admins manage every owner's keys. Users create keys for themselves only, with roles
they have; viewers create none. Another owner's key is 404, never 403.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyView,
    problem_responses,
)
from jobgate.auth import api_keys
from jobgate.auth.principal import Principal
from jobgate.errors import Forbidden
from jobgate.ids import now, rfc3339

router = APIRouter(prefix="/v1/api-keys", tags=["api-keys"])


def key_view(row: dict[str, Any]) -> ApiKeyView:
    """A stored key as `GET /v1/api-keys` shows it."""
    return ApiKeyView(
        id=row["id"],
        prefix=row["prefix"],
        name=row["name"],
        owner=row["owner"],
        roles=list(row["roles"]),
        created_at=rfc3339(row["created_at"]) or "",
        expires_at=rfc3339(row["expires_at"]),
        last_used_at=rfc3339(row["last_used_at"]),
    )


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


async def _writer(principal: CurrentPrincipal) -> Principal:
    # A dependency, so a viewer is refused (403) before its body is even validated.
    principal.require_write()
    return principal


Writer = Annotated[Principal, Depends(_writer)]


def _authorise(principal: Principal, owner: str, roles: list[str]) -> None:
    if principal.is_admin:
        return
    if owner != principal.id:
        raise Forbidden("only an admin may create keys for another owner")
    missing = sorted(set(roles) - principal.roles)
    if missing:
        raise Forbidden(f"you cannot grant roles you do not have: {', '.join(missing)}")


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=problem_responses(400, 401, 403, 422),
)
async def create_api_key(body: ApiKeyCreate, state: StateDep, principal: Writer) -> ApiKeyCreated:
    """Create a key; the key itself is in this answer only."""
    owner = body.owner or principal.id
    roles: list[str] = list(body.roles) if body.roles else sorted(principal.roles)
    _authorise(principal, owner, roles)
    async with state.db.write() as conn:
        row, key = await api_keys.create_key(
            conn,
            owner=owner,
            roles=roles,
            name=body.name,
            expires_at=_epoch(body.expires_at),
            at=now(),
        )
    return ApiKeyCreated(
        id=row["id"],
        key=key,
        name=row["name"],
        owner=row["owner"],
        roles=row["roles"],
        created_at=rfc3339(row["created_at"]) or "",
        expires_at=rfc3339(row["expires_at"]),
    )


@router.get("", response_model=ApiKeyList, responses=problem_responses(401))
async def list_api_keys(state: StateDep, principal: CurrentPrincipal) -> ApiKeyList:
    """The caller's keys (an admin's: everyone's) that are not revoked."""
    async with state.db.read() as conn:
        rows = await api_keys.list_keys(conn, principal.owner_filter())
    return ApiKeyList(api_keys=[key_view(row) for row in rows])


@router.delete(
    "/{key_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(401, 404),
)
async def revoke_api_key(key_id: str, state: StateDep, principal: CurrentPrincipal) -> Response:
    """Revoke a key: it stops working at once."""
    async with state.db.write() as conn:
        await api_keys.revoke(conn, key_id, principal.owner_filter(), at=now())
    # Again after the commit: a request verifying the key meanwhile may have cached it.
    api_keys.forget(key_id)
    return Response(status_code=204)
