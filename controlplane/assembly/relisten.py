"""Listener layers that follow what services listen on, not their endpoints: made once
per key in a build and kept from the previous build while no service the key's visible
set shows changed its ports, addresses or protocol (the build's ``relistened``). The
captured egress listener and the loopback egress listeners are both such layers."""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from controlplane.assembly.visible import Visible

if TYPE_CHECKING:
    from controlplane.assembly.build import MeshBuild

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ListenerLayers(Generic[K, V]):
    """The layers of one build by key; ``make`` is given the previous build's value for
    the key (or None) to reuse what did not change."""

    def __init__(self, previous: ListenerLayers[K, V] | None = None) -> None:
        self._made: dict[K, V] = {}
        self._old: dict[K, V] = dict(previous._made) if previous is not None else {}

    def get(self, build: MeshBuild, key: K, visible: Visible,
            make: Callable[[V | None], V]) -> V:
        if key in self._made:
            return self._made[key]
        if key in self._old and not relistened(build.relistened, visible):
            found = self._old[key]
        else:
            found = make(self._old.get(key))
        self._made[key] = found
        return found

    def settle(self) -> None:
        """Let go of the previous build's layers."""
        self._old = {}

    def keep(self, keys: Collection[K]) -> None:
        """Drop the layers no group uses any more."""
        self._made = {k: v for k, v in list(self._made.items()) if k in keys}


def relistened(changed: frozenset[str] | None, visible: Visible) -> bool:
    """Whether a service the listener of ``visible`` shows changed what it listens on
    (None: anything may have)."""
    if changed is None:
        return True
    if visible is None:
        return bool(changed)
    return any(k in visible for k in changed)
