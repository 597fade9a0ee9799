"""What a source is: something that yields validated meshes, newest last."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from controlplane.mesh.model import Mesh


class Source(Protocol):
    """Sources know nothing of Envoy. They yield a Mesh whenever the world changes and
    log (rather than yield) input they had to reject, so the last good mesh stays."""

    name: str

    def updates(self) -> AsyncIterator[Mesh]: ...


def stamp(mesh: Mesh, at: float) -> Mesh:
    """``mesh`` (a shallow copy) marked with the wall-clock time (``time.time()``) the
    source saw the earliest change it holds: a file saved, a watch event received. The
    server measures convergence from there (observe/convergence.py)."""
    stamped = mesh.model_copy()
    stamped._observed_at = at
    return stamped


def observed_at(mesh: Mesh) -> float | None:
    """The time ``stamp`` marked ``mesh`` with; None for a mesh no source stamped."""
    return mesh._observed_at
