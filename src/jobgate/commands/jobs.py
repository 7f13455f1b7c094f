"""`submit`, `watch`, `status`, `cancel` and `download`: jobs on a running server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from jobgate.client import Job
from jobgate.commands.options import (
    DEFAULT_URL,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    connected,
    emit_json,
    err,
    load_json,
    out,
    parse_param,
)
from jobgate.commands.watch import follow

JobIdArg = Annotated[str, typer.Argument(help="The job's id.")]


def _table(*columns: str) -> Table:
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")  # ids are copied: fold, never cut
    return table


def print_job(job: Job) -> None:
    """A job and its stages, for people."""
    status = job.status + (" (cancelling)" if job.cancel_requested else "")
    head = _table("id", "pipeline", "status", "progress", "stage", "cost", "created")
    head.add_row(
        job.id,
        job.pipeline,
        status,
        f"{100 * job.progress:.0f}%",
        job.stage or "",
        f"${job.cost.actual_usd:,.4f}",
        job.created_at[:16].replace("T", " "),
    )
    out.print(head)
    stages = _table("stage", "status", "attempt", "progress", "error")
    for stage in job.stages:
        error = (stage.error or {}).get("message", "")
        stages.add_row(
            stage.name, stage.status, str(stage.attempt), f"{100 * stage.progress:.0f}%", error
        )
    out.print(stages)
    if job.result is not None:
        out.print(f"result: {json.dumps(job.result)}", markup=False, soft_wrap=True)
    if job.error is not None:
        out.print(f"error: {job.error.type}: {job.error.message}", markup=False, soft_wrap=True)


def _emit(job: Job, as_json: bool) -> None:
    if as_json:
        emit_json(job.model_dump(mode="json"))
    else:
        print_job(job)


def _params(params_json: str | None, pairs: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = load_json(params_json)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--params-json") from exc
        if not isinstance(loaded, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--params-json")
        params.update(loaded)
    params.update(parse_param(p) for p in pairs or [])
    return params


def submit(
    pipeline: Annotated[str, typer.Argument(help="The pipeline's name.")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="NAME=VALUE (VALUE as JSON if it parses)."),
    ] = None,
    params_json: Annotated[
        str | None, typer.Option("--params-json", help="All params as a JSON object.")
    ] = None,
    file: Annotated[
        list[Path] | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="A file (repeatable)."),
    ] = None,
    priority: Annotated[int | None, typer.Option(min=-100, max=100)] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", min=0.0, help="A cost limit in USD.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends.")] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job to a running server (files are streamed from disk)."""
    params = _params(params_json, param)
    with connected(url, key) as client:
        job = client.submit(
            pipeline, params, files=file or [], priority=priority, budget_usd=budget
        )
        if not watch:
            _emit(job, as_json)
            return
        if not as_json:
            err.print(f"submitted {job.id}", markup=False)
        code = follow(client, job.id, as_json=as_json)
    raise typer.Exit(code)


def watch(
    job_id: JobIdArg,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job live until it ends: exit 0 succeeded, 1 failed, 3 cancelled.

    With --json: one JSON event per line. A dropped connection (a server restart) is
    resumed where it stopped.
    """
    with connected(url, key) as client:
        code = follow(client, job_id, as_json=as_json)
    raise typer.Exit(code)


def status(
    job_id: JobIdArg,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a job: status, stages, cost, result or error."""
    with connected(url, key) as client:
        _emit(client.get(job_id), as_json)


def cancel(
    job_id: JobIdArg,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job (a running one stops at its next check)."""
    with connected(url, key) as client:
        job = client.cancel(job_id)
    if as_json:
        emit_json(job.model_dump(mode="json"))
    elif job.status == "cancelled":
        err.print(f"cancelled {job.id}", markup=False)
    else:
        err.print(f"cancellation requested for {job.id} ({job.status})", markup=False)


def download(
    job_id: JobIdArg,
    name: Annotated[
        str | None, typer.Argument(help="The artifact (default: the primary one).")
    ] = None,
    output: Annotated[
        # A str, not a Path: a Path drops the trailing "/" that says "a directory".
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="A file, or a directory (one that exists, or ending in /; default: here).",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an artifact of a job (checked against its SHA-256, written atomically)."""
    with connected(url, key) as client:
        path = client.download(job_id, name, output)
    size = path.stat().st_size
    if as_json:
        emit_json({"job_id": job_id, "path": str(path), "size": size})
    else:
        err.print(f"saved {size} bytes to", markup=False)
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    for command in (submit, watch, status, cancel, download):
        app.command()(command)
