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
