"""Durations as people write them in mesh files: ``2s``, ``500ms``, ``1m30s``, ``1.5s``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_duration(value: Any) -> timedelta:
    """Accept ``"250ms"``, ``"1m30s"``, a number of seconds, or a timedelta; never negative."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration such as '500ms' or '2s', got a boolean")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} is negative; use a positive value such as '2s'")
        pos, seconds = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(
                f"duration {value!r} is not understood; write it like '500ms', '2s' or '1m30s'"
            )
    else:
        raise ValueError(f"expected a duration such as '500ms' or '2s', got {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"duration {value!r} is negative; use a positive value such as '2s'")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling, so that a dumped mesh reads like the one written."""
    micros = round(value.total_seconds() * 1_000_000)
    if micros % 1_000_000 == 0:
        return f"{micros // 1_000_000}s"
    if micros % 1000 == 0:
        return f"{micros // 1000}ms"
    return f"{micros}us"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
