"""Logging setup: structlog to stdout, console lines for people, JSON for machines.

Library code only asks for loggers (`structlog.get_logger(...)`); the command line
calls `configure_logging` once at start-up, and nothing else configures logging.
Records from the standard library (uvicorn, SQLAlchemy, Alembic) go through the same
renderer, so one process writes one format.

Credentials never reach the output: tracebacks are rendered without local variables
(where tokens and keys live during a request), and every rendered line passes
`redact`, which masks API keys, JWTs, bearer credentials, URL signatures and tokens,
webhook secrets and the configured secrets themselves, wherever they appear.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from jobgate.config import Settings

MASK = "***"
_PATTERNS = (
    # Bearer credentials, whatever they are.
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1" + MASK),
    # API keys (`jg_` + at least 32 characters; a short prefix alone is no secret).
    (re.compile(r"jg_[A-Za-z0-9_-]{16,}"), "jg_" + MASK),
    # JWTs: base64url JSON header `{"...`, payload, signature.
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), MASK),
    # Signatures and tokens in query strings (signed URLs, stream URLs).
    (
        re.compile(r"(?i)([?&;](?:sig|signature|token|access_token|key)=)[^&\s\"']+"),
        r"\1" + MASK,
    ),
    # Standard Webhooks secrets.
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), "whsec_" + MASK),
)
_MIN_SECRET_LEN = 8


def redactor(secrets: Iterable[str] = ()) -> Callable[[str], str]:
    """A function masking credentials in a rendered log line.

    Args:
        secrets: Exact values to mask too (configured keys); short ones are ignored,
            since masking every "dev" would garble the logs and protect nothing.
    """
    literal = sorted({s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)
    exact = re.compile("|".join(map(re.escape, literal))) if literal else None

    def redact(line: str) -> str:
        if exact is not None:
            line = exact.sub(MASK, line)
        for pattern, replacement in _PATTERNS:
            line = pattern.sub(replacement, line)
        return line

    return redact


def _redacting(renderer: Any, redact: Callable[[str], str]) -> Callable[..., str]:
    def render(logger: Any, method: str, event: Any) -> str:
        return redact(str(renderer(logger, method, event)))

    return render


def secrets_of(settings: Settings) -> list[str]:
    """The configured secret values that must never be logged."""
    return [settings.signing_key, settings.metrics_token, settings.auth_jwt_secret]


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
    redact = redactor(secrets_of(settings))
    renderer: list[Any] = (
        [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _redacting(structlog.processors.JSONRenderer(), redact),
        ]
        if json_output
        else [
            _redacting(
                structlog.dev.ConsoleRenderer(
                    colors=sys.stdout.isatty(),
                    exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False),
                ),
                redact,
            )
        ]
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
