"""Loopback egress listeners of sidecars that are not captured: one shared layer per
(visible set, the sidecar's own ports, what it records), holding a listener per external
TCP/TLS port (translator/egress.py). None at all in a mesh without such ports, so the
default config is unchanged there.

Kept from the previous build while no visible service changed what it listens on, as
the captured egress listener is (assembly/capture.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from controlplane import resource
from controlplane.assembly.relisten import ListenerLayers
from controlplane.assembly.reuse import resources_layer
from controlplane.assembly.visible import Visible
from controlplane.cache.layers import Layer
from controlplane.proxy import ProxyIdentity
from controlplane.translator import loopback_egress
from controlplane.translator.telemetry import Observed

if TYPE_CHECKING:
    from controlplane.assembly.build import MeshBuild

Key: TypeAlias = tuple[Visible, int, int | None, int | None, bool, Observed]


def key_of(proxy: ProxyIdentity, visible: Visible, telemetry: Observed) -> Key:
    return (visible, proxy.egress_port, proxy.inbound_port, proxy.app_port,
            proxy.on_demand, telemetry)


class EgressLayers(ListenerLayers[Key, Layer | None]):
    """The loopback listener layers of one build (None: the group has none)."""

    def layer(self, build: MeshBuild, visible: Visible, proxy: ProxyIdentity,
              telemetry: Observed) -> Layer | None:
        def make(old: Layer | None) -> Layer | None:
            listeners = loopback_egress(build.mesh, visible, proxy, telemetry)
            return resources_layer(resource.LISTENER, listeners, old) if listeners else None

        return self.get(build, key_of(proxy, visible, telemetry), visible, make)
