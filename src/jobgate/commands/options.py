"""Options and output shared by the client commands: server, key, JSON, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from jobgate.client import DEFAULT_URL, Client, ProblemError, TransportError

UrlOpt = Annotated[str, typer.Option("--url", envvar="JOBGATE_URL", help="The server's base URL.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", "--key", envvar="JOBGATE_API_KEY", help="An API key (or a JWT)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

__all__ = ["DEFAULT_URL", "JsonOpt", "KeyOpt", "UrlOpt", "err", "out"]


def load_json(text: str) -> Any:
    """`text` as strict JSON: Python's `json` also takes `NaN`, `Infinity` and numbers
    past a float's range (as infinity), none of which a request can carry.

    Raises:
        ValueError: not JSON.
    """
    return json.loads(text, parse_constant=_not_json, parse_float=_finite)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v` as a pair; `v` is JSON when it parses as JSON, else the string itself."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"{text!r} is not NAME=VALUE", param_hint="--param")
    try:
        return name, load_json(raw)
    except ValueError:
        return name, raw


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def describe(error: ProblemError) -> str:
    """A problem for people: status, title, detail, and each located complaint."""
    text = f"HTTP {error.status} {error.title}: {error.detail}".rstrip(": ")
    for item in error.errors:
        text += f"\n  {'.'.join(map(str, item.get('loc') or []))}: {item.get('msg')}"
    return text


@contextmanager
def connected(url: str, key: str | None) -> Iterator[Client]:
    """An SDK client; refusals and unreachable servers end the command with a message."""
    try:
        with Client(url, key or None) as client:
            yield client
    except ProblemError as exc:
        fail(describe(exc))
    except TransportError as exc:
        fail(str(exc))
    except OSError as exc:  # a local file: an output path that cannot be written, say
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def emit_json(data: Any) -> None:
    """Print JSON on stdout, and nothing else."""
    typer.echo(json.dumps(data, indent=2))
