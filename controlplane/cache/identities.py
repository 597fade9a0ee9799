"""Who each connected sidecar turns out to be, once the mesh knows its pod.

A stream's identity comes from its node (``ProxyIdentity.from_node``); an injected
sidecar's lacks its zone, and maybe its service. The pipeline hands every accepted mesh's
pod index here (``update``) with the pods whose entry changed; the streams of those pods,
and only those, are told to resolve again (``follow``), so a change costs O(changed
pods), not O(streams). The server resolves a stream when it joins its group.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

import structlog

from controlplane.mesh.workloads import WorkloadIndex
from controlplane.proxy import ProxyIdentity, resolve

log = structlog.get_logger("controlplane.identities")


class Identities:
    def __init__(self) -> None:
        self.index = WorkloadIndex()
        self._services: Container[str] = frozenset()
        self._followers: dict[str, dict[int, Callable[[], None]]] = {}  # node id -> streams

    def resolve(self, proxy: ProxyIdentity) -> ProxyIdentity:
        """``proxy`` completed from the current index (itself when there is nothing to add)."""
        return resolve(proxy, self.index, self._services)

    def follow(self, node_id: str, stream: int, moved: Callable[[], None]) -> None:
        """Call ``moved`` when the pod ``node_id`` changes in the index."""
        self._followers.setdefault(node_id, {})[stream] = moved

    def unfollow(self, node_id: str, stream: int) -> None:
        streams = self._followers.get(node_id)
        if streams is not None:
            streams.pop(stream, None)
            if not streams:
                del self._followers[node_id]

    def update(self, index: WorkloadIndex, changed: Iterable[str],
               services: Container[str]) -> int:
        """Take a new index; tell the streams of the ``changed`` pods. Returns how many."""
        self.index = index
        self._services = services
        told = 0
        for pod in changed:
            for moved in list(self._followers.get(pod, {}).values()):
                moved()
                told += 1
        if told:
            log.info("identities.changed", streams=told,
                     hint="these sidecars' zone or service follows their pod's endpoints")
        return told

    def __len__(self) -> int:
        """Node ids followed now."""
        return len(self._followers)
