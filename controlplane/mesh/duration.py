"""Durations as people write them in mesh files: ``2s``, ``500ms``, ``1m30s``, ``1.5s``.

Every duration is at most ``MAX_DURATION`` (365 days). Envoy refuses far shorter ones
than protobuf allows (its own limit is ~292 years, where nanoseconds overflow an int64;
``timeout: 100000000h`` makes every sidecar reject the whole route table), and no
timeout, interval or delay in a mesh means anything beyond a year. Infinite, NaN and
overlong values are clean errors, never an OverflowError.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, PlainSerializer

MAX_DURATION: Final = timedelta(days=365)
MAX_DURATION_TEXT: Final = "8760h (365 days)"
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
_MAX_TEXT_LENGTH: Final = 64


def _seconds_of_text(value: str) -> float:
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"duration {value!r} is negative; use a positive value such as '2s'")
    if len(text) > _MAX_TEXT_LENGTH:
        raise ValueError(f"duration {value[:20]!r}... is too long to be a duration; "
                         "write it like '500ms', '2s' or '1m30s'")
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
    return seconds


def parse_duration(value: Any) -> timedelta:
    """Accept ``"250ms"``, ``"1m30s"``, a number of seconds, or a timedelta; never
    negative, never longer than ``MAX_DURATION``."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration such as '500ms' or '2s', got a boolean")
    elif isinstance(value, int | float):
        # Clamped first: float() of a 400-digit integer is an OverflowError.
        seconds = float(max(min(value, 2**62), -1)) if isinstance(value, int) else value
    elif isinstance(value, str):
        seconds = _seconds_of_text(value)
    else:
        raise ValueError(f"expected a duration such as '500ms' or '2s', got {type(value).__name__}")
    if math.isnan(seconds):
        raise ValueError("duration is not a number; write it like '500ms', '2s' or '1m30s'")
    if seconds < 0:
        raise ValueError(f"duration {value!r} is negative; use a positive value such as '2s'")
    if math.isinf(seconds):
        raise ValueError(
            f"duration is infinite; give one such as '2s', at most {MAX_DURATION_TEXT}"
        )
    if seconds > MAX_DURATION.total_seconds():
        shown = repr(value) if not isinstance(value, float | int) else f"{value}s"
        raise ValueError(
            f"duration {shown} is longer than the maximum, {MAX_DURATION_TEXT}; Envoy refuses "
            "durations that long, give a shorter one"
        )
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
