"""Loopback egress listeners of sidecars that are not captured: one shared layer per
(visible set, the sidecar's own ports, what it records), holding a listener per external
TCP/TLS port (translator/egress.py). None at all in a mesh without such ports, so the
default config is unchanged there.

Kept from the previous build while no visible service changed what it listens on, as
the captured egress listener is (assembly/capture.py).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, TypeAlias

from controlplane import resource
from controlplane.assembly.capture import _relistened
from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import encode_resource
from controlplane.proxy import ProxyIdentity
from controlplane.translator import loopback_egress, resource_name
from controlplane.translator.telemetry import Observed

if TYPE_CHECKING:
    from controlplane.assembly.build import MeshBuild

Visible: TypeAlias = frozenset[str] | None
Key: TypeAlias = tuple[Visible, int, int | None, int | None, bool, Observed]


def key_of(proxy: ProxyIdentity, visible: Visible, telemetry: Observed) -> Key:
    return (visible, proxy.egress_port, proxy.inbound_port, proxy.app_port,
            proxy.on_demand, telemetry)


class EgressLayers:
    """The loopback listener layers of one build (None: the group has none)."""

    def __init__(self, previous: EgressLayers | None = None) -> None:
        self._made: dict[Key, Layer | None] = {}
        self._old: dict[Key, Layer | None] = dict(previous._made) if previous else {}

    def layer(self, build: MeshBuild, visible: Visible, proxy: ProxyIdentity,
              telemetry: Observed) -> Layer | None:
        key = key_of(proxy, visible, telemetry)
        if key in self._made:
            return self._made[key]
        if key in self._old and not _relistened(build.relistened, visible):
            found = self._old[key]
        else:
            listeners = loopback_egress(build.mesh, visible, proxy, telemetry)
            old = self._old.get(key)
            found = None
            if listeners:
                made = []
                for listener in listeners:
                    name = resource_name(listener)
                    prior = old.resources.get(name) if old is not None else None
                    made.append(encode_resource(resource.LISTENER, name, listener, prior))
                found = Layer.of(resource.LISTENER, made)
                if old is not None and old.version == found.version:
                    found = old
        self._made[key] = found
        return found

    def settle(self) -> None:
        """Let go of the previous build's layers."""
        self._old = {}

    def keep(self, keys: Collection[Key]) -> None:
        """Drop the layers no group uses any more."""
        self._made = {k: v for k, v in list(self._made.items()) if k in keys}
