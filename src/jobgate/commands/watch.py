"""Following a job in the terminal: a live rich display, or one JSON event per line."""

from __future__ import annotations

import json
from collections import deque

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.text import Text

from jobgate.client import Client, Event, Job
from jobgate.commands.options import out

EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3}
"""How `watch` exits: 0 succeeded, 1 failed, 3 cancelled (2 is a usage error)."""
FINAL_BY_EVENT = {"completed": "succeeded", "error": "failed", "cancelled": "cancelled"}
STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
MESSAGES_SHOWN = 5


class JobView:
    """What `watch` shows: a bar per stage, the cost so far, the last messages, the status."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.pipeline = ""
        self.status = "connecting"
        self.cost = 0.0
        self.budget: float | None = None
        self.result: object = None
        self.messages: deque[str] = deque(maxlen=MESSAGES_SHOWN)
        self.progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[status]}"),
            expand=False,
        )
        self._stages: dict[str, TaskID] = {}

    def _stage(self, name: str) -> TaskID:
        if name not in self._stages:
            self._stages[name] = self.progress.add_task(name, total=1.0, status="")
        return self._stages[name]

    def _set(self, name: str, *, status: str | None = None, progress: float | None = None) -> None:
        task = self._stage(name)
        if status is not None:
            self.progress.update(task, status=status)
            if status == "succeeded":
                progress = 1.0
        if progress is not None:
            self.progress.update(task, completed=max(0.0, min(1.0, progress)))

    def show(self, job: Job) -> None:
        """Take everything from a full job (the stream's `state` event)."""
        self.pipeline, self.status = job.pipeline, job.status
        self.cost, self.budget, self.result = job.cost.actual_usd, job.cost.budget_usd, job.result
        for stage in job.stages:
            self._set(stage.name, status=stage.status, progress=stage.progress)
        if job.error is not None:
            self.messages.append(f"error: {job.error.message}")

    def apply(self, event: Event) -> None:
        """Update the view with one event."""
        data = event.data
        if event.type == "state" and (job := event.job) is not None:
            self.show(job)
        elif event.type == "stage_update" and "stage" in data:
            self._set(str(data["stage"]), status=str(data.get("status", "")))
            if self.status in ("queued", "connecting") and data.get("status") == "running":
                self.status = "running"
        elif event.type == "progress" and data.get("stage"):
            self._set(str(data["stage"]), progress=_number(data.get("stage_progress")))
            if data.get("message"):
                self.messages.append(str(data["message"]))
        elif event.type == "cost_update":
            self.cost = _number(data.get("actual_usd")) or self.cost
        elif event.type == "message":
            stage = f"[{data['stage']}] " if data.get("stage") else ""
            self.messages.append(f"{stage}{data.get('text', '')}")
        elif event.type == "artifact":
            self.messages.append(f"artifact {data.get('name')} ({data.get('size')} bytes)")
        elif event.type in FINAL_BY_EVENT:
            self.status = FINAL_BY_EVENT[event.type]
            if event.type == "completed":
                self.result = data.get("result")
            elif isinstance(error := data.get("error"), dict):
                self.messages.append(f"error: {error.get('message', '')}")

    def __rich__(self) -> RenderableType:
        style = STATUS_STYLE.get(self.status, "none")
        head = Text.from_markup(f"job [bold]{escape(self.job_id)}[/bold] {escape(self.pipeline)}  ")
        head.append(self.status, style=style)
        budget = f" of ${self.budget:,.2f}" if self.budget else ""
        parts: list[RenderableType] = [head, self.progress, Text(f"cost ${self.cost:,.4f}{budget}")]
        parts += [Text(f"  {message}", style="dim") for message in self.messages]
        if self.status == "succeeded" and self.result is not None:
            parts.append(Text(f"result: {json.dumps(self.result)}"))
        return Group(*parts)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def final_status(status: str | None, event: Event) -> str | None:
    """The job's status as far as the events so far tell."""
    if event.type == "state" and (job := event.job) is not None:
        return job.status
    return FINAL_BY_EVENT.get(event.type, status)


def follow(client: Client, job_id: str, *, as_json: bool) -> int:
    """Show a job's events until it ends; the exit code its final status calls for.

    The SDK resumes a dropped stream (a server restart) where it stopped.
    """
    status: str | None = None
    if as_json:
        for event in client.events(job_id):
            typer.echo(event.model_dump_json())
            status = final_status(status, event)
    else:
        view = JobView(job_id)
        with Live(view, console=out, refresh_per_second=8):
            for event in client.events(job_id):
                view.apply(event)
                status = final_status(status, event)
    return EXIT_CODES.get(status or "", 1)
