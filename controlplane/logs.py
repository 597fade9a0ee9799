"""structlog, configured in one place: JSON lines (or readable console lines) on stderr,
with per-stream context (node id, stream id) bound through contextvars."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog


def configure(level: str = "info", fmt: str = "json") -> None:
    """``fmt`` is ``json`` for machines or ``console`` for people."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )


_WRITE = threading.Lock()


class _StderrLogger:
    """Writes each line to ``sys.stderr`` as it is when the line is written, not as it was
    when logging was configured: a command run in-process (tests call ``cli.main``) may
    configure logging while stderr is a capture that is closed afterwards."""

    def msg(self, message: str) -> None:
        with _WRITE:  # one line at a time: the webhook's worker thread logs too
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_: Any) -> _StderrLogger:
    return _StderrLogger()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
