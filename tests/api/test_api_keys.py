"""`/v1/api-keys`: who may create which keys, listing without secrets, revocation."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

MakeClient = Any
MakeKey = Any
ExpectProblem = Any
KEY_RE = re.compile(r"jg_[A-Za-z0-9_-]{40}")


async def test_an_admin_creates_a_key_for_anyone(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    """An admin's key for another owner works as that owner, shown once in the answer."""
    response = await client.post(
        "/v1/api-keys",
        json={
            "owner": "bob",
            "roles": ["viewer"],
            "name": "ci",
            "expires_at": "2999-01-01T00:00:00Z",
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert KEY_RE.fullmatch(body["key"])
    assert body["owner"] == "bob"
    assert body["roles"] == ["viewer"]
    assert body["name"] == "ci"
    assert body["expires_at"] == "2999-01-01T00:00:00.000Z"
    assert body["created_at"].endswith("Z")
    bob = await make_client(key=body["key"])
    me = (await bob.get("/v1/me")).json()
    assert (me["id"], me["roles"]) == ("bob", ["viewer"])


async def test_owner_and_roles_default_to_the_callers(make_client: MakeClient) -> None:
    """A key created with an empty body belongs to the caller, with the caller's roles."""
    carol = await make_client("carol", ["user", "viewer"])
    response = await carol.post("/v1/api-keys", json={})
    assert response.status_code == 201
    body = response.json()
    assert (body["owner"], body["roles"], body["expires_at"]) == ("carol", ["user", "viewer"], None)


async def test_a_user_creates_keys_for_itself_with_its_roles(make_client: MakeClient) -> None:
    """A user may create a key for itself with a subset of its roles."""
    user = await make_client("dave", ["user"])
    response = await user.post("/v1/api-keys", json={"owner": "dave", "roles": ["user"]})
    assert response.status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"owner": "someone-else"},
        {"roles": ["admin"]},
        {"owner": "dave", "roles": ["user", "admin"]},
    ],
    ids=["other-owner", "more-roles", "mixed-roles"],
)
async def test_a_user_cannot_create_other_keys(
    make_client: MakeClient, expect_problem: ExpectProblem, body: dict[str, Any]
) -> None:
    """A user cannot create keys for someone else or with roles it lacks: 403."""
    user = await make_client("dave", ["user"])
    expect_problem(await user.post("/v1/api-keys", json=body), 403, "forbidden")


async def test_a_viewer_cannot_create_keys(
    make_client: MakeClient, expect_problem: ExpectProblem
) -> None:
    """A viewer is refused, even a viewer key for itself, before its body is looked at."""
    viewer = await make_client("vic", ["viewer"])
    expect_problem(await viewer.post("/v1/api-keys", json={}), 403, "forbidden")
    expect_problem(await viewer.post("/v1/api-keys", json={"bogus": 1}), 403, "forbidden")


async def test_creating_needs_credentials(
    anon: httpx.AsyncClient, expect_problem: ExpectProblem
) -> None:
    """No key, no key: 401."""
    expect_problem(await anon.post("/v1/api-keys", json={}), 401, "unauthenticated")


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"roles": ["root"]}, "roles"),
        ({"roles": []}, "roles"),
        ({"owner": ""}, "owner"),
        ({"owner": "   "}, "owner"),
        ({"key": "jg_mine"}, "key"),
        ({"expires_at": "not a time"}, "expires_at"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
    ],
    ids=[
        "unknown-role",
        "no-roles",
        "empty-owner",
        "blank-owner",
        "extra-field",
        "bad-time",
        "past",
    ],
)
async def test_invalid_bodies_are_422(
    client: httpx.AsyncClient, expect_problem: ExpectProblem, body: dict[str, Any], loc: str
) -> None:
    """Invalid content is 422 `validation-error` pointing at the field."""
    problem = expect_problem(await client.post("/v1/api-keys", json=body), 422, "validation-error")
    assert any(error["loc"][0] == loc for error in problem["errors"])


async def test_an_unparseable_body_is_400(
    client: httpx.AsyncClient, expect_problem: ExpectProblem
) -> None:
    """Broken JSON is 400 `malformed-request`."""
    response = await client.post(
        "/v1/api-keys", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    expect_problem(response, 400, "malformed-request")


async def test_listing_never_shows_keys(
    client: httpx.AsyncClient, make_client: MakeClient, make_key: MakeKey
) -> None:
    """Admins list every key, others their own; no key or hash is ever listed."""
    _, erin_key = await make_key("erin", ["user"])
    await make_key("frank", ["viewer"])
    erin = await make_client(key=erin_key)

    everyone = await client.get("/v1/api-keys")
    assert everyone.status_code == 200
    owners = {key["owner"] for key in everyone.json()["api_keys"]}
    assert {"erin", "frank", "admin-1"} <= owners

    own = (await erin.get("/v1/api-keys")).json()["api_keys"]
    assert [key["owner"] for key in own] == ["erin"]
    assert set(own[0]) == {
        "id",
        "prefix",
        "name",
        "owner",
        "roles",
        "created_at",
        "expires_at",
        "last_used_at",
    }
    assert own[0]["prefix"] == erin_key[:12]
    for text in (everyone.text, str(own)):
        assert erin_key not in text
        assert "key_hash" not in text


async def test_revoking_own_key(
    make_client: MakeClient, make_key: MakeKey, expect_problem: ExpectProblem
) -> None:
    """Deleting one's own key is 204; it is gone from the list and a second delete is 404."""
    row, _ = await make_key("gina", ["user"])
    gina = await make_client("gina", ["user"])
    assert (await gina.delete(f"/v1/api-keys/{row['id']}")).status_code == 204
    listed = (await gina.get("/v1/api-keys")).json()["api_keys"]
    assert row["id"] not in {k["id"] for k in listed}
    expect_problem(await gina.delete(f"/v1/api-keys/{row['id']}"), 404, "not-found")


async def test_another_owners_key_is_404_and_keeps_working(
    make_client: MakeClient, make_key: MakeKey, expect_problem: ExpectProblem
) -> None:
    """A non-admin deleting someone else's key gets 404, and the key is untouched."""
    row, key = await make_key("hank", ["user"])
    other = await make_client("ivy", ["user"])
    expect_problem(await other.delete(f"/v1/api-keys/{row['id']}"), 404, "not-found")
    hank = await make_client(key=key)
    assert (await hank.get("/v1/me")).status_code == 200


async def test_an_admin_revokes_anyones_key(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_key: MakeKey,
    expect_problem: ExpectProblem,
) -> None:
    """An admin may revoke any key; unknown ids are 404."""
    row, key = await make_key("jo", ["user"])
    assert (await client.delete(f"/v1/api-keys/{row['id']}")).status_code == 204
    jo = await make_client(key=key)
    expect_problem(await jo.get("/v1/me"), 401, "unauthenticated")
    expect_problem(await client.delete("/v1/api-keys/no-such-id"), 404, "not-found")


@pytest.mark.parametrize(
    "expires_at",
    ["9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59.999999Z"],
    ids=["year-10000-in-utc", "past-the-last-second"],
)
async def test_an_expiry_past_year_9999_is_422_and_stores_nothing(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    expect_problem: ExpectProblem,
    expires_at: str,
) -> None:
    """An `expires_at` whose UTC instant no date holds is refused, and listing still works."""
    bob = await make_client("bob", ["user"])
    before = {key["id"] for key in (await client.get("/v1/api-keys")).json()["api_keys"]}
    response = await bob.post("/v1/api-keys", json={"name": "far", "expires_at": expires_at})
    problem = expect_problem(response, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["expires_at"]
    for caller in (bob, client):
        assert (await caller.get("/v1/api-keys")).status_code == 200
    after = {key["id"] for key in (await client.get("/v1/api-keys")).json()["api_keys"]}
    assert after == before


async def test_a_stored_expiry_past_year_9999_does_not_break_listing(
    client: httpx.AsyncClient, make_client: MakeClient, make_key: MakeKey
) -> None:
    """A key row stored with a year-10000 expiry (before the check) is listed, capped."""
    await make_key("bob", ["user"], expires_at=253_402_387_139.0, name="far")
    bob = await make_client("bob", ["user"])
    for caller in (bob, client):
        response = await caller.get("/v1/api-keys")
        assert response.status_code == 200, response.text
        far = [key for key in response.json()["api_keys"] if key["name"] == "far"]
        assert [key["expires_at"] for key in far] == ["9999-12-31T23:59:59.000Z"]
