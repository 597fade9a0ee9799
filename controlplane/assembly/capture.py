"""Captured sidecars' egress listeners, one shared layer per (visible set, egress port).

The listener holds a chain per visible service port (by cluster IP, or a headless
service's endpoint addresses), so it changes only when a visible service's ports, cluster
IPs or headless addresses do, or the mesh's outbound traffic policy (the build's frame).
Otherwise the previous build's layer is kept as it is: an endpoint change costs a
captured group nothing here (issue 9's O(1) per group).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from controlplane import resource
from controlplane.assembly.relisten import ListenerLayers
from controlplane.assembly.reuse import one_resource_layer
from controlplane.assembly.visible import Visible
from controlplane.cache.layers import Layer
from controlplane.translator import captured_egress
from controlplane.translator.telemetry import Observed

if TYPE_CHECKING:
    from controlplane.assembly.build import MeshBuild

Key: TypeAlias = tuple[Visible, int, Observed]  # (.., what its sidecars record)


class CaptureLayers(ListenerLayers[Key, Layer]):
    """The egress listener layers of one build, made when a group asks for them."""

    def layer(self, build: MeshBuild, visible: Visible, egress_port: int,
              telemetry: Observed) -> Layer:
        return self.get(build, (visible, egress_port, telemetry), visible,
                        lambda old: one_resource_layer(
                            resource.LISTENER,
                            captured_egress(build.mesh, visible, egress_port, telemetry), old))
