"""Authentication: bearer API keys, one answer for every failure, and request ids."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from jobgate.auth import api_keys
from jobgate.ids import now
from jobgate.store.tables import api_keys as api_key_table

MakeKey = Any
MakeClient = Any
ExpectProblem = Any


def state_of(app: FastAPI) -> Any:
    return app.state.jobgate


async def test_a_key_is_jg_and_40_url_safe_characters(make_key: MakeKey) -> None:
    """Keys are `jg_` + 40 URL-safe characters; the row keeps a 12-character prefix."""
    row, key = await make_key()
    assert re.fullmatch(r"jg_[A-Za-z0-9_-]{40}", key)
    assert row["prefix"] == key[:12]


async def test_only_the_hash_is_stored(app: FastAPI, make_key: MakeKey) -> None:
    """The database holds the key's SHA-256, never the key."""
    row, key = await make_key()
    async with state_of(app).db.read() as conn:
        stored = (
            (await conn.execute(select(api_key_table).where(api_key_table.c.id == row["id"])))
            .mappings()
            .one()
        )
    assert stored["key_hash"] == api_keys.hash_key(key)
    assert key not in {str(value) for value in stored.values()}


async def test_a_valid_key_authenticates(make_client: MakeClient) -> None:
    """A request with a valid key is answered as its owner."""
    client = await make_client("user-7", ["user", "viewer"])
    response = await client.get("/v1/me")
    assert response.status_code == 200
    assert response.json()["id"] == "user-7"
    assert response.json()["roles"] == ["user", "viewer"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token jg_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer jg_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer jg_short",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
    ],
    ids=[
        "absent",
        "empty",
        "no-token",
        "blank-token",
        "basic",
        "other-scheme",
        "unknown",
        "short",
        "jwt",
    ],
)
async def test_every_missing_or_invalid_credential_is_the_same_401(
    anon: httpx.AsyncClient, expect_problem: ExpectProblem, authorization: str | None
) -> None:
    """Missing, malformed and unknown credentials: 401, `WWW-Authenticate`, one message."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await anon.get("/v1/me", headers=headers)
    body = expect_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    assert body["detail"] == api_keys.AUTH_FAILED


async def test_a_revoked_key_is_401(
    make_key: MakeKey, make_client: MakeClient, expect_problem: ExpectProblem
) -> None:
    """Once revoked, a key stops working at once, even though it was just cached."""
    row, key = await make_key("user-1", ["user"])
    client = await make_client(key=key)
    assert (await client.get("/v1/me")).status_code == 200
    assert (await client.delete(f"/v1/api-keys/{row['id']}")).status_code == 204
    body = expect_problem(await client.get("/v1/me"), 401, "unauthenticated")
    assert body["detail"] == api_keys.AUTH_FAILED


async def test_an_expired_key_is_401(
    app: FastAPI, make_key: MakeKey, make_client: MakeClient, expect_problem: ExpectProblem
) -> None:
    """A key past its `expires_at` is refused with the same answer as an unknown one."""
    row, key = await make_key("user-1", ["user"], expires_at=now() + 3600)
    async with state_of(app).db.write() as conn:
        await conn.execute(
            update(api_key_table)
            .where(api_key_table.c.id == row["id"])
            .values(expires_at=now() - 1)
        )
    client = await make_client(key=key)
    body = expect_problem(await client.get("/v1/me"), 401, "unauthenticated")
    assert body["detail"] == api_keys.AUTH_FAILED


async def test_last_used_at_is_written_at_most_once_a_minute(
    app: FastAPI, make_key: MakeKey, make_client: MakeClient
) -> None:
    """The first use records `last_used_at`; uses within a minute do not write again."""
    row, key = await make_key()
    client = await make_client(key=key)

    async def last_used() -> float | None:
        async with state_of(app).db.read() as conn:
            value: float | None = await conn.scalar(
                select(api_key_table.c.last_used_at).where(api_key_table.c.id == row["id"])
            )
            return value

    assert await last_used() is None
    await client.get("/v1/me")
    first = await last_used()
    assert first is not None
    api_keys.clear_cache()  # even re-reading the row does not write again
    await client.get("/v1/me")
    assert await last_used() == first


async def test_a_sane_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    """A client's `X-Request-ID` matching `[A-Za-z0-9._-]{1,128}` comes back unchanged."""
    response = await client.get("/v1/me", headers={"X-Request-ID": "abc.DEF_123-x"})
    assert response.headers["x-request-id"] == "abc.DEF_123-x"


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "semi;colon", ""])
async def test_an_insane_request_id_is_replaced(client: httpx.AsyncClient, sent: str) -> None:
    """Any other `X-Request-ID` is replaced by a new one."""
    response = await client.get("/v1/me", headers={"X-Request-ID": sent})
    assert response.headers["x-request-id"] != sent
    assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["x-request-id"])


async def test_errors_carry_the_request_id(
    anon: httpx.AsyncClient, expect_problem: ExpectProblem
) -> None:
    """A problem answer has the request id in its header and its body."""
    response = await anon.get("/v1/me", headers={"X-Request-ID": "req-401"})
    body = expect_problem(response, 401, "unauthenticated")
    assert body["request_id"] == "req-401"
    response = await anon.get("/no/such/route", headers={"X-Request-ID": "req-404"})
    assert expect_problem(response, 404, "not-found")["request_id"] == "req-404"


async def test_a_500_carries_the_request_id_and_no_internals(
    app: FastAPI, expect_problem: ExpectProblem
) -> None:
    """An unexpected error is a bare 500 problem, still with the request id."""

    async def boom() -> None:
        raise RuntimeError("internal secret detail")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as anon:
        response = await anon.get("/boom", headers={"X-Request-ID": "req-500"})
    body = expect_problem(response, 500, "internal-error")
    assert body["request_id"] == "req-500"
    assert "secret" not in response.text


async def test_key_hashes_are_compared_in_constant_time(
    app: FastAPI, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored hash is matched with `hmac.compare_digest`, never with `==`, so the
    time an answer takes tells nothing about how much of a guessed key was right."""
    api_keys.clear_cache()
    _, key = await make_key()
    compared: list[tuple[str, str]] = []
    real = api_keys.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    principal = await api_keys.verify(state_of(app).db, key)
    assert principal.id == "user-1"
    assert (api_keys.hash_key(key), api_keys.hash_key(key)) in compared
    guess = key[:12] + "x" * (len(key) - 12)  # right prefix, wrong rest
    with pytest.raises(api_keys.Unauthenticated):
        await api_keys.verify(state_of(app).db, guess)
    assert any(b == api_keys.hash_key(guess) for _, b in compared)
