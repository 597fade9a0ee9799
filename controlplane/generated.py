"""Files the repository keeps but code writes (docker-compose.yml, deploy/kubernetes/):
written by one command, and checked by the tests to be current."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def write(files: Mapping[Path, str], root: Path = Path()) -> None:
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {path}")


def stale(files: Mapping[Path, str], root: Path) -> list[Path]:
    """The files whose checked-in text differs from what the code renders now."""
    return [path for path, text in files.items()
            if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text]
