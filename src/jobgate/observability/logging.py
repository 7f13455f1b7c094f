"""Logging setup: structlog to stdout, console lines for people, JSON for machines.

Library code only asks for loggers (`structlog.get_logger(...)`); the command line
calls `configure_logging` once at start-up, and nothing else configures logging.
Records from the standard library (uvicorn, SQLAlchemy, Alembic) go through the same
renderer, so one process writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from jobgate.config import Settings


def use_json(settings: Settings) -> bool:
    """Whether logs are JSON: `log_format` says so, or `auto` and stdout is no terminal."""
    if settings.log_format != "auto":
        return settings.log_format == "json"
    return not sys.stdout.isatty()


def configure_logging(settings: Settings) -> None:
    """Send every log record to stdout through structlog.

    Args:
        settings: `log_format` (`auto`, `console`, `json`) and `log_level`.
    """
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        level = logging.INFO
    json_output = use_json(settings)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Any] = (
        [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
        if json_output
        else [structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn installs its own handlers unless told not to; route them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
