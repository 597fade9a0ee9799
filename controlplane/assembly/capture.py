"""Captured sidecars' egress listeners, one shared layer per (visible set, egress port).

The listener holds a chain per visible service port (by cluster IP, or a headless
service's endpoint addresses), so it changes only when a visible service's ports, cluster
IPs or headless addresses do, or the mesh's outbound traffic policy (the build's frame).
Otherwise the previous build's layer is kept as it is: an endpoint change costs a
captured group nothing here (issue 9's O(1) per group).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, TypeAlias

from controlplane import resource
from controlplane.assembly.reuse import one_resource_layer
from controlplane.cache.layers import Layer
from controlplane.translator import captured_egress
from controlplane.translator.telemetry import Observed

if TYPE_CHECKING:
    from controlplane.assembly.build import MeshBuild

Visible: TypeAlias = frozenset[str] | None
Key: TypeAlias = tuple[Visible, int, Observed]  # (.., what its sidecars record)


class CaptureLayers:
    """The egress listener layers of one build, made when a group asks for them."""

    def __init__(self, previous: CaptureLayers | None = None) -> None:
        self._made: dict[Key, Layer] = {}
        self._old: dict[Key, Layer] = dict(previous._made) if previous is not None else {}

    def layer(self, build: MeshBuild, visible: Visible, egress_port: int,
              telemetry: Observed) -> Layer:
        key = (visible, egress_port, telemetry)
        found = self._made.get(key)
        if found is None:
            old = self._old.get(key)
            if old is not None and not _relistened(build.relistened, visible):
                found = old
            else:
                found = one_resource_layer(
                    resource.LISTENER,
                    captured_egress(build.mesh, visible, egress_port, telemetry), old)
            self._made[key] = found
        return found

    def settle(self) -> None:
        """Let go of the previous build's layers."""
        self._old = {}

    def keep(self, keys: Collection[Key]) -> None:
        """Drop the layers no group uses any more."""
        self._made = {k: v for k, v in list(self._made.items()) if k in keys}


def _relistened(changed: frozenset[str] | None, visible: Visible) -> bool:
    """Whether a service the listener of ``visible`` shows changed what it listens on
    (None: anything may have)."""
    if changed is None:
        return True
    if visible is None:
        return bool(changed)
    return any(k in visible for k in changed)
