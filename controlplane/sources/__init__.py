"""Sources turn the outside world into validated meshes."""

from __future__ import annotations

from controlplane.errors import SourceError
from controlplane.sources.base import Source
from controlplane.sources.file import FileSource

__all__ = ["FileSource", "Source", "open_source"]


def open_source(spec: str, poll_interval: float = 0.2) -> Source:
    """``file:PATH`` or ``kubernetes``."""
    if spec.startswith("file:"):
        path = spec.removeprefix("file:")
        if not path:
            raise SourceError("--source file: needs a path, e.g. --source file:mesh.yaml")
        return FileSource(path, poll_interval)
    if spec == "kubernetes":
        raise SourceError(
            "the kubernetes source is not in this release yet; serve a mesh file with "
            "--source file:PATH (see README)"
        )
    raise SourceError(f"unknown source {spec!r}; use file:PATH or kubernetes")
