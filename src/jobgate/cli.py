"""The `jobgate` command: run the API and workers, manage the database and API keys,
and talk to a running server (submit, list, read and cancel jobs).

`serve`, `worker`, `db` and `keys` work on this machine's settings (`JOBGATE_*`);
`submit`, `watch`, `status`, `cancel`, `download` (`jobgate/commands/`, on the SDK) and
`jobs` are HTTP clients of a server (`--url`, `--api-key`). Output meant for
people goes through rich; `--json` prints the server's JSON unchanged for scripts.
Only `serve` and `worker` configure logging (stdout); everything else keeps stdout for
its answer, so `KEY=$(jobgate keys create ...)` captures just the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import quote

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobgate import __version__
from jobgate.auth import api_keys
from jobgate.commands import register as register_client_commands
from jobgate.commands.options import parse_param as parse_param  # its old home
from jobgate.config import Settings
from jobgate.errors import JobgateError, Unauthenticated
from jobgate.ids import now, rfc3339
from jobgate.store import Database
from jobgate.store.migrate import (
    MigrationError,
    current_revision,
    downgrade,
    head_revision,
    schema_problem,
    upgrade,
)
from jobgate.tuning import tune_gc
from jobgate.waits import finish_within

T = TypeVar("T")
ADMIN_KEY_FILE = "admin-key"
DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(
    name="jobgate",
    help="API gateway and orchestration for long-running ML jobs.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="The database: migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys, straight in the database.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs on a running server (HTTP).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")

out = Console(highlight=False)


def _table(*columns: str) -> Table:
    # Ids are what people copy: fold long cells instead of cutting them with an ellipsis.
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _when(stamp: str | None) -> str:
    """An RFC 3339 time, shortened for a table: `2025-01-31 12:34`."""
    return stamp[:16].replace("T", " ") if stamp else ""


err = Console(stderr=True, highlight=False, soft_wrap=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="JOBGATE_URL", help="The server's base URL.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", "--key", envvar="JOBGATE_API_KEY", help="An API key (or a JWT)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print raw JSON.")]


def main() -> None:
    """The console entry point `jobgate`."""
    app()


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        _fail(f"invalid settings: {exc}", 2)


DB_CLOSE_S = 2.0  # how long a command waits for the store to close its connections


async def _with_db(settings: Settings, use: Callable[[Database], Awaitable[T]]) -> T:
    """Run `use(db)` on the configured database (an embedded SQLite is migrated first;
    on PostgreSQL a schema that is not this jobgate's ends the command with why)."""
    if settings.is_sqlite:
        try:
            await upgrade(settings.database_url)
        except MigrationError as exc:
            _fail(str(exc))
    elif (problem := await schema_problem(settings.database_url)) is not None:
        _fail(problem)
    db = Database(
        settings.database_url,
        outbox=settings.external_transport,
        pool_size=settings.database_pool_size,
    )
    try:
        return await use(db)
    finally:
        # A store out of reach (a partition) never answers a close: exit all the same.
        if not await finish_within(db.aclose(), DB_CLOSE_S):
            err.print("warning: the database did not answer the close; exiting", markup=False)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit


# -- serve and worker ------------------------------------------------------------------


def _read_secret(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def _write_secret(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that existed


async def ensure_admin_key(settings: Settings) -> str:
    """The embedded server's admin key from `<data_dir>/admin-key`, made if missing.

    A saved key that no longer works (a wiped or revoked database) is replaced.
    """
    path = settings.data_dir / ADMIN_KEY_FILE

    async def ensure(db: Database) -> str:
        saved = await asyncio.to_thread(_read_secret, path)
        if saved:
            try:
                await api_keys.verify(db, saved)
                return saved
            except Unauthenticated:
                pass
        async with db.write() as conn:
            _, key = await api_keys.create_key(
                conn, owner="admin", roles=["admin"], name="admin (jobgate serve)", at=now()
            )
        await asyncio.to_thread(_write_secret, path, key)
        return key

    return await _with_db(settings, ensure)


def _print_welcome(settings: Settings, key: str, host: str, port: int) -> None:
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104 - display only
    base = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    curl = (
        f'curl -s -X POST {base}/v1/jobs -H "Authorization: Bearer {key}" '
        "-H 'Content-Type: application/json' "
        """-d '{"pipeline":"steps","params":{"steps":5}}'"""
    )
    err.print(f"jobgate {__version__} on {base}  (docs: {base}/docs)", markup=False)
    err.print(f"admin API key (saved in {settings.data_dir / ADMIN_KEY_FILE}): {key}", markup=False)
    err.print("submit a job:", markup=False)
    err.print(f"  {curl}", markup=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    worker_concurrency: Annotated[
        int | None,
        typer.Option(
            "--worker-concurrency",
            min=0,
            help="Run an in-process worker of this concurrency (0: the API alone).",
        ),
    ] = None,
) -> None:
    """Run the API (and, by default, an in-process worker)."""
    import uvicorn

    from jobgate.api.app import create_app
    from jobgate.observability.logging import configure_logging

    settings = _settings()
    configure_logging(settings)
    if settings.is_sqlite:
        _print_welcome(settings, asyncio.run(ensure_admin_key(settings)), host, port)
    application = create_app(settings, worker_concurrency=worker_concurrency)
    # Our middleware writes the access log, and our logging config renders uvicorn's.
    # No proxy_headers: uvicorn would believe X-Forwarded-For from FORWARDED_ALLOW_IPS
    # (even "*"); JOBGATE_TRUSTED_PROXIES alone decides that (docs/limits.md).

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            # uvicorn waits for every response to finish, and an event stream never
            # would by itself: end them first (clients resume with Last-Event-ID).
            state = getattr(application.state, "jobgate", None)
            if state is not None:
                state.streams.end_all()
            await super().shutdown(sockets)

    # Idle connections outlive the clients' own idle limit (httpx keeps one 5 s, as
    # uvicorn did): a client reusing one never has it closed under its request.
    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_keep_alive=settings.http_keep_alive_s,
    )
    server = Server(config)
    tune_gc(settings.gc_threshold)
    # As `uvicorn.run` does: uvicorn raises the signal it stopped on again once it is
    # down, and a clean stop by Ctrl-C or SIGINT is exit 0; one that never started, 3.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise typer.Exit(3)
    _exit_past_stuck_stages()


@app.command()
def worker(
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues (default: JOBGATE_WORKER_QUEUES).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Stages run at once (default: settings).")
    ] = None,
    worker_id: Annotated[str | None, typer.Option("--id", help="This worker's name.")] = None,
) -> None:
    """Run a worker until SIGTERM or Ctrl-C, then drain it and exit 0."""
    from jobgate.blobs import open_blob_store
    from jobgate.bus import from_url as open_bus
    from jobgate.observability.logging import configure_logging
    from jobgate.pipelines import Registry
    from jobgate.transport import from_url
    from jobgate.webhooks import WebhookSender
    from jobgate.worker import Worker

    settings = _settings()
    configure_logging(settings)
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    tune_gc(settings.gc_threshold)

    async def run(db: Database) -> None:
        blobs = open_blob_store(settings.blobs_url)
        # Streams in API processes learn of this worker's events through the bus.
        bus = open_bus(
            settings.bus_url,
            database_url=settings.database_url,
            namespace=settings.transport_namespace,
        )
        await bus.start()
        db.on_changes = bus.publish
        sender = WebhookSender(db, settings) if settings.webhook_concurrency > 0 else None
        try:
            if sender is not None:
                await sender.start()
            await Worker(
                transport=from_url(settings.transport_url, namespace=settings.transport_namespace),
                settings=settings,
                db=db,
                blobs=blobs,
                registry=Registry.from_paths(settings.pipeline_paths),
                concurrency=concurrency or max(1, settings.worker_concurrency),
                queues=queue_list,
                worker_id=worker_id,
            ).run()
        finally:
            if sender is not None:  # after the drain, whose last job ends queue some
                await sender.aclose()
            await finish_within(bus.aclose(), DB_CLOSE_S)  # a bus on the store, out of reach
            await blobs.aclose()

    asyncio.run(_with_db(settings, run))
    _exit_past_stuck_stages()


def _exit_past_stuck_stages() -> None:
    """Exit 0 now if a sync stage ignored its cancel and still runs in its thread.

    The worker handed that stage back before it stopped, so the thread's work is
    wasted; but the interpreter would wait for it at exit, and a process told to stop
    must stop (docs/guarantees.md)."""
    import logging
    import sys

    import structlog

    from jobgate.worker.executors import stuck_stage_threads

    stuck = stuck_stage_threads(wait_s=1.0)
    if not stuck:
        return
    structlog.get_logger("jobgate.cli").warning(
        "stage_threads_abandoned",
        threads=len(stuck),
        reason="sync stages that ignored their cancel; they were handed back",
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- db --------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema."""
    settings = _settings()
    try:
        asyncio.run(upgrade(settings.database_url))
    except Exception as exc:  # report it; the URL may hold a password, so not the URL
        _fail(f"migration failed: {type(exc).__name__}: {exc}")
    err.print("database schema is up to date", markup=False)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[
        str, typer.Argument(help="the revision to go back to (`jobgate db current` shows it)")
    ],
) -> None:
    """Migrate the database back to REVISION, to run an older jobgate: what only the newer
    schema holds (its columns, tables, indexes) is dropped. Stop every process first."""
    settings = _settings()
    try:
        asyncio.run(downgrade(settings.database_url, revision))
    except Exception as exc:  # the URL may hold a password, so not the URL
        _fail(f"migration failed: {type(exc).__name__}: {exc}")
    err.print(f"database schema is at {revision}", markup=False)


@db_app.command("current")
def db_current() -> None:
    """Print the database's schema revision, and this jobgate's."""
    settings = _settings()
    try:
        current = asyncio.run(current_revision(settings.database_url))
    except Exception as exc:
        _fail(f"cannot read the revision: {type(exc).__name__}: {exc}")
    typer.echo(f"database: {current or 'none'}\nthis jobgate: {head_revision()}")


# -- keys ------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="The user id the key acts as.")],
    role: Annotated[list[str], typer.Option(help="A role: admin, user or viewer (repeatable).")],
    expires_in: Annotated[
        float | None, typer.Option("--expires-in", min=0.0, help="Days until it expires.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for people.")] = None,
) -> None:
    """Create an API key; the key alone is stdout's last line."""
    settings = _settings()
    at = now()
    expires_at = at + expires_in * 86_400 if expires_in is not None else None

    async def create(db: Database) -> tuple[dict[str, Any], str]:
        async with db.write() as conn:
            return await api_keys.create_key(
                conn, owner=owner, roles=role, name=name, expires_at=expires_at, at=at
            )

    try:
        row, key = asyncio.run(_with_db(settings, create))
    except JobgateError as exc:
        _fail(exc.message, 2)
    expiry = rfc3339(row["expires_at"]) or "never"
    err.print(
        f"created key {row['id']} for {row['owner']} "
        f"(roles: {', '.join(row['roles'])}; expires: {expiry})",
        markup=False,
    )
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    owner: Annotated[str | None, typer.Option(help="Only this owner's keys.")] = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List API keys (never the keys themselves)."""
    settings = _settings()

    async def fetch(db: Database) -> list[dict[str, Any]]:
        async with db.read() as conn:
            return await api_keys.list_keys(conn, owner, include_revoked=include_revoked)

    rows = asyncio.run(_with_db(settings, fetch))
    views = [
        {
            **row,
            **{k: rfc3339(row[k]) for k in ("created_at", "expires_at", "revoked_at")},
            "last_used_at": rfc3339(row["last_used_at"]),
        }
        for row in rows
    ]
    if as_json:
        typer.echo(json.dumps({"api_keys": views}, indent=2))
        return
    table = _table("id", "owner", "roles", "name", "created", "expires", "last used")
    if include_revoked:
        table.add_column("revoked")
    for view in views:
        cells = [
            view["id"],
            view["owner"],
            ",".join(view["roles"]),
            view["name"] or "",
            _when(view["created_at"]),
            _when(view["expires_at"]) or "never",
            _when(view["last_used_at"]),
        ]
        table.add_row(*cells, *([_when(view["revoked_at"])] if include_revoked else []))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke an API key."""
    settings = _settings()

    async def revoke(db: Database) -> None:
        async with db.write() as conn:
            await api_keys.revoke(conn, key_id, None, at=now())

    try:
        asyncio.run(_with_db(settings, revoke))
    except JobgateError as exc:
        _fail(exc.message)
    err.print(f"revoked {key_id}", markup=False)


# -- HTTP: submit and jobs -------------------------------------------------------------


def _call(url: str, key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60.0) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")
    if response.is_error:
        try:
            problem = response.json()
            detail = f"{problem.get('title', 'error')}: {problem.get('detail', '')}"
            for item in problem.get("errors") or []:
                detail += f"\n  {'.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}"
        except (ValueError, AttributeError):
            detail = response.text[:500]
        _fail(f"HTTP {response.status_code} {detail}")
    return response.json() if response.content else None


def _job_table(jobs: list[dict[str, Any]]) -> Table:
    table = _table("id", "pipeline", "owner", "status", "progress", "stage", "created")
    for job in jobs:
        status = job["status"] + (" (cancelling)" if job.get("cancel_requested") else "")
        table.add_row(
            job["id"],
            job["pipeline"],
            job.get("owner", ""),
            status,
            f"{100 * float(job.get('progress') or 0):.0f}%",
            job.get("stage") or "",
            _when(job.get("created_at")),
        )
    return table


def _print_job(job: dict[str, Any]) -> None:
    out.print(_job_table([job]))
    stages = _table("stage", "status", "attempt", "progress", "error")
    for stage in job.get("stages", []):
        error = stage.get("error") or {}
        stages.add_row(
            stage["name"],
            stage["status"],
            str(stage.get("attempt", "")),
            f"{100 * float(stage.get('progress') or 0):.0f}%",
            error.get("message", "") if isinstance(error, dict) else str(error),
        )
    out.print(stages)
    for name in ("result", "error"):
        if job.get(name) is not None:
            out.print(f"{name}: {json.dumps(job[name])}", markup=False, soft_wrap=True)


def _emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        human(data)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[list[str] | None, typer.Option(help="Only this status (repeatable).")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this owner's (admins).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 10,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    query: list[tuple[str, str | int]] = [("limit", limit), ("offset", offset)]
    query += [("status", s) for s in status or []]
    if pipeline:
        query.append(("pipeline", pipeline))
    if owner:
        query.append(("owner", owner))
    page = _call(url, key, "GET", "/v1/jobs", params=query)

    def human(data: dict[str, Any]) -> None:
        out.print(_job_table(data["jobs"]))
        shown = len(data["jobs"])
        out.print(f"{shown} of {data['total']} (offset {data['offset']})", markup=False)

    _emit(page, as_json, human)


@jobs_app.command("get")
def jobs_get(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one job with its stages."""
    _emit(_call(url, key, "GET", f"/v1/jobs/{quote(job_id, safe='')}"), as_json, _print_job)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job (a running one stops at its next check)."""
    job = _call(url, key, "POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")
    _emit(job, as_json, _print_job)


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a failed or cancelled job again, from the stages that did not succeed."""
    job = _call(url, key, "POST", f"/v1/jobs/{quote(job_id, safe='')}/retry")
    _emit(job, as_json, _print_job)


@app.command("workers")
def workers_list(
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The live workers of a running server (admins)."""
    listing = _call(url, key, "GET", "/v1/workers")

    def human(data: dict[str, Any]) -> None:
        table = _table("id", "host", "pid", "queues", "running", "last seen")
        for w in data["workers"]:
            table.add_row(
                w["id"],
                w["host"],
                str(w["pid"]),
                ",".join(w["queues"]),
                f"{w['running']}/{w['concurrency']}",
                _when(w["last_seen_at"]),
            )
        out.print(table)

    _emit(listing, as_json, human)


# submit, watch, status, cancel, download: on the SDK (jobgate/commands/).
register_client_commands(app)
