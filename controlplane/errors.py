"""The one exception tree of controlplane.

    ControlPlaneError
     +-- MeshError          the mesh input is invalid (every problem listed, with its path)
     |    +-- EmptyMeshError    it holds no ``services`` at all (an empty or half-written
     |                          file): sources keep the last good mesh and warn
     +-- SourceError        a source cannot read its input (missing file, unreachable API)
     +-- TranslationError   the mesh cannot be turned into a consistent snapshot

Errors of the libraries underneath (pydantic, yaml, grpc) are converted once, where
they are raised, with ``raise X(...) from exc``.
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Base of every error controlplane raises on purpose."""


class MeshError(ControlPlaneError):
    """Invalid mesh input; ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, origin: str, problems: list[str]) -> None:
        self.origin = origin
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        count = len(problems)
        super().__init__(
            f"{origin}: {count} problem{'s' if count != 1 else ''} in the mesh; "
            f"fix {'them' if count != 1 else 'it'} and save again:\n{lines}"
        )


class EmptyMeshError(MeshError):
    """The input says nothing about services: an empty file, or one without ``services``
    (often a save caught half-way). Not "no services": that is ``services: []``."""


class SourceError(ControlPlaneError):
    """A source could not read its input."""


class TranslationError(ControlPlaneError):
    """The mesh could not be translated into a consistent snapshot."""
