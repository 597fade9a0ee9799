"""What is wrong with the lab's mesh file right now, and what the control plane saw of
the last edit, so the view can keep showing both.

The server logs a bad save once and keeps serving the last good mesh; in a live table that
log line is painted over by the next refresh. The lab therefore checks the file itself
whenever it changes, with the loader and the checks ``controlplane validate`` uses, and
the view shows the problem until a save fixes it. Likewise it asks the server's admin
(/debug/changes, /debug/rejections or /debug/proxies) how far each edit got and which
sidecars reject their config.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.errors import ControlPlaneError, MeshError
from controlplane.lab.view import (
    convergence_line,
    nack_lines,
    nacks_of_proxies,
    nacks_of_rejections,
)
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


MAX_ANSWER_BYTES = 4 << 20  # the admin's answers for a lab's handful of sidecars are small


class ServerWatch:
    """Asks the control plane's admin, once a view refresh, about the edits made since the
    lab started (changes of a newer generation than the first seen) and the NACKs now."""

    def __init__(self, admin_url: str, rejections: bool = True) -> None:
        """``rejections`` False: NACKs from /debug/proxies alone (no origin); so it is
        too once the server answers 404 there (a server before /debug/rejections)."""
        self.admin_url = admin_url.rstrip("/")
        self.lines: list[tuple[str, str]] = []  # (text, rich style)
        self._baseline: int | None = None
        self._rejections = rejections

    async def poll(self, session: aiohttp.ClientSession,
                   timed: bool = True) -> list[tuple[str, str]]:
        """The lines to show now; ``timed``: a pending change says how long ago the save
        was (a live table; a headless view prints a line only when it changes)."""
        changes = await self._get(session, "/debug/changes")
        nacks = None
        if self._rejections:
            summary = await self._get(session, "/debug/rejections")
            nacks = nacks_of_rejections(summary) if summary is not None else None
        if nacks is None:
            nacks = nacks_of_proxies(await self._get(session, "/debug/proxies"))
        lines = []
        change = self._latest(changes)
        if change is not None:
            lines.append(convergence_line(change, time.time() if timed else None))
        lines += [(line, "bold red") for line in nack_lines(nacks)]
        self.lines = lines
        return lines

    def _latest(self, changes: Any) -> dict[str, Any] | None:
        """The newest change made after the lab started, or None."""
        listed = changes.get("changes") if isinstance(changes, dict) else None
        if not isinstance(listed, list):
            return None
        generations = [c["generation"] for c in listed
                       if isinstance(c, dict) and isinstance(c.get("generation"), int)]
        if self._baseline is None:  # what the server had built before the lab's edits
            self._baseline = max(generations, default=0)
            return None
        newer = [c for c in listed if isinstance(c, dict)
                 and isinstance(c.get("generation"), int) and c["generation"] > self._baseline]
        return max(newer, key=lambda c: int(c["generation"]), default=None)

    async def _get(self, session: aiohttp.ClientSession, path: str) -> Any:
        try:
            async with session.get(self.admin_url + path,
                                   timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 404 and path == "/debug/rejections":
                    self._rejections = False
                if response.status != 200:
                    return None
                body = await response.content.read(MAX_ANSWER_BYTES + 1)
                if len(body) > MAX_ANSWER_BYTES:
                    return None
                return json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
