"""The ceiling for one API process: FastAPI + uvicorn answering POSTs that each insert
one row with asyncpg (no auth, no validation beyond JSON, no events, no tasks).

    BENCH_CEILING_DSN=postgresql://... python -m uvicorn bench.ceiling_app:app

`bench/submit.py` runs it beside `jobgate serve` and loads both the same way, so
jobgate's single submits can be quoted as a share of it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

TABLE = "CREATE TABLE IF NOT EXISTS ceiling (id text PRIMARY KEY, body jsonb, created_at float8)"
INSERT = "INSERT INTO ceiling (id, body, created_at) VALUES ($1, $2, $3)"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(os.environ["BENCH_CEILING_DSN"], min_size=20, max_size=20)
    async with pool.acquire() as conn:
        await conn.execute(TABLE)
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/jobs", status_code=202)
async def submit(request: Request) -> Any:
    body = await request.json()
    job_id = str(uuid.uuid4())
    async with request.app.state.pool.acquire() as conn:
        await conn.execute(INSERT, job_id, json.dumps(body), time.time())
    return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)
