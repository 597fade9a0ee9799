"""What is wrong with the lab's mesh file right now, so the view can keep showing it.

The server logs a bad save once and keeps serving the last good mesh; in a live table that
log line is painted over by the next refresh. The lab therefore checks the file itself
whenever it changes, with the loader and the checks ``controlplane validate`` uses, and
the view shows the problem until a save fixes it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from controlplane.errors import ControlPlaneError, MeshError
from controlplane.mesh.loader import load_mesh_file
from controlplane.pipeline import check_mesh

KEEPS = "the control plane keeps serving the last good mesh until the file is fixed"


def problems_of(path: Path) -> list[str]:
    """Every problem of the mesh file (empty when it is valid), one line each."""
    try:
        check_mesh(load_mesh_file(path))
    except MeshError as exc:
        return list(exc.problems)
    except ControlPlaneError as exc:
        return [str(exc)]
    return []


class MeshWatch:
    """Re-checks the file when its size or modification time changes; cheap otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self._seen: tuple[int, int] | None = None

    async def check(self) -> list[str]:
        """The current problems: [] when the file is good."""
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            seen = (-1, -1)
        if seen != self._seen:
            self._seen = seen
            self.problems = await asyncio.to_thread(problems_of, self.path)
        return self.problems

    def summary(self, limit: int = 2) -> str:
        """One line for the headless view: the first problems and how many more."""
        if not self.problems:
            return ""
        shown = "; ".join(self.problems[:limit])
        more = len(self.problems) - limit
        return f"MESH FILE REJECTED: {shown}" + (f" (+{more} more)" if more > 0 else "")
