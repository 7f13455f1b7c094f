"""Artifacts and signed blob downloads: URLs that work without credentials, and only so."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi import FastAPI

from jobgate.blobs.signing import sign_blob_url
from jobgate.ids import now
from jobgate.store.repositories import artifacts as artifact_repo
from tests.api.conftest import AppFactory
from tests.api.helpers import client_for, state_of

REPORT = b'{"files": 1, "lines": 2, "words": 9}\n' + b"0123456789" * 100
OTHER = b"another artifact's bytes\n"


async def _job_with_artifacts(app: FastAPI, client: httpx.AsyncClient) -> str:
    """A job with a primary `report.json` and a `report.csv`, stored like a worker would."""
    response = await client.post("/v1/jobs", json={"pipeline": "noop"})
    job_id: str = response.json()["id"]
    state = state_of(app)
    async with state.db.write() as conn:
        for name, data, ctype, primary in (
            ("report.json", REPORT, "application/json", True),
            ("report.csv", OTHER, "text/csv", False),
        ):
            stored = await state.blobs.put_bytes(data)
            await artifact_repo.put(
                conn,
                job_id=job_id,
                stage="run",
                name=name,
                sha256=stored.sha256,
                size=stored.size,
                content_type=ctype,
                primary=primary,
                at=now(),
            )
    return job_id


def _path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


@pytest.fixture
async def job_id(app: FastAPI, client: httpx.AsyncClient) -> str:
    return await _job_with_artifacts(app, client)


async def test_artifacts_are_listed_on_the_job_and_their_route(
    client: httpx.AsyncClient, job_id: str
) -> None:
    """`GET .../artifacts` and `Job.artifacts` show name, hash, size, type, primary."""
    listed = (await client.get(f"/v1/jobs/{job_id}/artifacts")).json()["artifacts"]
    assert {a["name"] for a in listed} == {"report.json", "report.csv"}
    report = next(a for a in listed if a["name"] == "report.json")
    assert report == {
        "name": "report.json",
        "sha256": hashlib.sha256(REPORT).hexdigest(),
        "size": len(REPORT),
        "content_type": "application/json",
        "primary": True,
    }
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert sorted(a["name"] for a in job["artifacts"]) == ["report.csv", "report.json"]


async def test_signed_url_downloads_without_credentials(
    app: FastAPI, client: httpx.AsyncClient, anon: httpx.AsyncClient, job_id: str
) -> None:
    """The download URL is absolute (public_url), and works without a token."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    settings = state_of(app).settings
    assert info["download_url"].startswith(f"{settings.public_url}/v1/blobs/")
    assert info["expires_in"] == settings.signed_url_ttl_s
    assert (info["filename"], info["size"]) == ("report.json", len(REPORT))
    assert info["sha256"] == hashlib.sha256(REPORT).hexdigest()
    assert info["content_type"] == "application/json"
    response = await anon.get(_path(info["download_url"]))
    assert response.status_code == 200
    assert response.content == REPORT
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-content-type-options"] == "nosniff"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''report.json" in disposition


async def test_head_of_a_signed_url_tells_size_and_type_without_the_bytes(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, job_id: str
) -> None:
    """`HEAD` (as `curl -I` sends) answers what `GET` would, without a body; a tampered
    URL is 403 to it too."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    response = await anon.head(_path(info["download_url"]))
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(REPORT))
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["content-disposition"].startswith("attachment;")
    tampered = _path(info["download_url"]).replace("sig=", "sig=0")
    assert (await anon.head(tampered)).status_code == 403


async def test_named_artifact_url(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, job_id: str
) -> None:
    """`GET .../artifacts/{name}` signs that artifact; unknown names are 404."""
    info = (await client.get(f"/v1/jobs/{job_id}/artifacts/report.csv")).json()
    assert info["filename"] == "report.csv"
    assert (await anon.get(_path(info["download_url"]))).content == OTHER
    missing = await client.get(f"/v1/jobs/{job_id}/artifacts/nope.txt")
    assert missing.status_code == 404


async def test_public_url_never_comes_from_the_host_header(
    app_factory: AppFactory,
) -> None:
    """The absolute URL uses JOBGATE_PUBLIC_URL, whatever Host the request had."""
    app = await app_factory(public_url="https://jobs.example.com/")
    async with await client_for(app, "user-1") as user:
        job_id = await _job_with_artifacts(app, user)
        response = await user.get(
            f"/v1/jobs/{job_id}/download", headers={"Host": "evil.example.net"}
        )
    assert response.json()["download_url"].startswith("https://jobs.example.com/v1/blobs/")


async def test_range_request_gives_206(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, job_id: str
) -> None:
    """`Range: bytes=10-19` answers 206 with exactly those bytes."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    response = await anon.get(_path(info["download_url"]), headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == REPORT[10:20]
    assert response.headers["content-range"] == f"bytes 10-19/{len(REPORT)}"


@pytest.mark.parametrize("artifact", ["report.json", "report.csv"])
async def test_a_range_past_the_end_is_a_416_problem(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    expect_problem: Any,
    job_id: str,
    artifact: str,
) -> None:
    """A range starting past the end is 416 `range-not-satisfiable` (problem+json), with
    `Content-Range: bytes */<size>`."""
    info = (await client.get(f"/v1/jobs/{job_id}/artifacts/{artifact}")).json()
    response = await anon.get(_path(info["download_url"]), headers={"Range": "bytes=100000-200000"})
    expect_problem(response, 416, "range-not-satisfiable")
    assert response.headers["content-range"] == f"bytes */{info['size']}"


@pytest.mark.parametrize(
    "header", ["bytes=5-2", "bytes=abc", "items=0-5", "bytes=", "bytes"], ids=repr
)
async def test_an_invalid_or_foreign_range_is_ignored(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, job_id: str, header: str
) -> None:
    """A range of another unit, or an invalid byte range, is ignored (RFC 9110 §14.2):
    200 with the whole file, never a text/plain 400."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    response = await anon.get(_path(info["download_url"]), headers={"Range": header})
    assert response.status_code == 200
    assert response.content == REPORT
    assert "content-range" not in response.headers


@pytest.mark.parametrize("field", ["sig", "exp", "name", "ct"])
async def test_tampered_urls_are_403(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    job_id: str,
    expect_problem: Any,
    field: str,
) -> None:
    """Changing any signed value (signature, expiry, name, type) is 403."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    parts = urlsplit(info["download_url"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query[field] = {
        "sig": query["sig"][:-2] + ("AA" if query["sig"][-2:] != "AA" else "BB"),
        "exp": str(int(query["exp"]) + 3600),
        "name": "evil.html",
        "ct": "text/html",
    }[field]
    response = await anon.get(f"{parts.path}?{urlencode(query)}")
    expect_problem(response, 403, "forbidden")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("exp", "abc"),
        ("exp", "-1"),
        ("exp", "9" * 40),
        ("sig", "A" * 129),
        ("name", "n" * 1025),
        ("ct", "t" * 256),
    ],
)
async def test_signed_parts_of_the_wrong_form_are_403_not_422(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    job_id: str,
    expect_problem: Any,
    field: str,
    value: str,
) -> None:
    """A signed part that is not even of the right form is tampering too: 403, like any
    other, never a 422 naming the part (regression: 422 `validation-error`)."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    parts = urlsplit(info["download_url"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query[field] = value
    response = await anon.get(f"{parts.path}?{urlencode(query)}")
    expect_problem(response, 403, "forbidden")


async def test_expired_url_is_403(
    app: FastAPI, anon: httpx.AsyncClient, job_id: str, expect_problem: Any
) -> None:
    """A URL past its expiry is 403 even with a genuine signature."""
    settings = state_of(app).settings
    url = sign_blob_url(
        key=settings.signing_key,
        public_url=settings.public_url,
        sha256=hashlib.sha256(REPORT).hexdigest(),
        filename="report.json",
        content_type="application/json",
        expires_at=int(now()) - 1,
    )
    expect_problem(await anon.get(_path(url)), 403, "forbidden")


async def test_a_url_for_one_blob_cannot_fetch_another(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, job_id: str, expect_problem: Any
) -> None:
    """Swapping the hash in a signed URL is 403."""
    info = (await client.get(f"/v1/jobs/{job_id}/download")).json()
    other = hashlib.sha256(OTHER).hexdigest()
    swapped = _path(info["download_url"]).replace(info["sha256"], other)
    expect_problem(await anon.get(swapped), 403, "forbidden")
    expect_problem(
        await anon.get(_path(info["download_url"]).replace(info["sha256"], info["sha256"].upper())),
        403,
        "forbidden",
    )


async def test_missing_signature_is_rejected(
    anon: httpx.AsyncClient, job_id: str, expect_problem: Any
) -> None:
    """A blob URL without its query, or without any one signed part, is 403."""
    path = f"/v1/blobs/{hashlib.sha256(REPORT).hexdigest()}"
    expect_problem(await anon.get(path), 403, "forbidden")
    full = {"exp": "9999999999", "name": "report.json", "ct": "application/json", "sig": "x"}
    for missing in full:
        query = {k: v for k, v in full.items() if k != missing}
        expect_problem(await anon.get(path, params=query), 403, "forbidden")


async def test_download_is_404_without_a_primary_artifact(
    client: httpx.AsyncClient, expect_problem: Any
) -> None:
    """A job without a primary artifact: `/download` is 404; its list is empty."""
    job_id = (await client.post("/v1/jobs", json={"pipeline": "noop"})).json()["id"]
    expect_problem(await client.get(f"/v1/jobs/{job_id}/download"), 404, "not-found")
    assert (await client.get(f"/v1/jobs/{job_id}/artifacts")).json() == {"artifacts": []}


async def test_artifact_of_a_job_can_be_used_as_input(app: FastAPI, make_client: Any) -> None:
    """A caller may name its own job's artifact by hash in a later submission."""
    user = await make_client("user-1")
    job_id = await _job_with_artifacts(app, user)
    info = (await user.get(f"/v1/jobs/{job_id}/artifacts/report.csv")).json()
    response = await user.post(
        "/v1/jobs", json={"pipeline": "text-stats", "files": [info["sha256"]]}
    )
    assert response.status_code == 202, response.text
    other = await make_client("user-2")
    refused = await other.post(
        "/v1/jobs", json={"pipeline": "text-stats", "files": [info["sha256"]]}
    )
    assert refused.status_code == 404
