"""Saving test files the way careful editors do, so a server never reads half of one."""

from __future__ import annotations

from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
