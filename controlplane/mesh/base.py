"""What every mesh model shares: frozen, strict about unknown keys."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict
from pydantic_core import InitErrorDetails, PydanticCustomError


class _Model(BaseModel):
    """Frozen and strict about unknown keys, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def longer_than_zero(value: timedelta | None) -> timedelta | None:
    """Zero durations that Envoy would reject (or read as "no limit") are refused here,
    by path, rather than NACKed by every sidecar. Negative ones never parse."""
    if value is not None and value <= timedelta(0):
        raise ValueError("must be longer than 0, such as '100ms'")
    return value


def problem(loc: tuple[str | int, ...], value: object, message: str) -> InitErrorDetails:
    """A cross-object problem at ``loc``, reported as field errors are (by path)."""
    return InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}),
        loc=loc, input=value)
