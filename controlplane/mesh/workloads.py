"""Which Pod is which: each pod's zone and the services it backs, read from endpoints.

An injected sidecar connects as ``<pod>.<namespace>`` with no zone and a service guessed
from its labels. The mesh already knows better: an endpoint names the Pod it is (its
EndpointSlice's ``targetRef``) and the zone it runs in. This index turns the endpoints
into ``<pod>.<namespace> -> Workload(zone, services)`` so the server can fill in what the
sidecar's bootstrap left out (``controlplane.proxy.resolve``).

The index is derived from the previous one: only the services that are new objects are
read again (a source hands unchanged services over as the same objects), and the pods
whose entry differs come back with it, so a change re-resolves only the sidecars it
concerns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.mesh.service import Service


@dataclass(frozen=True, slots=True)
class Workload:
    """What the mesh knows of one pod."""

    zone: str  # "" when none of its endpoints says
    services: tuple[str, ...]  # the keys (name.namespace) of the services it backs, sorted


_Pods = Mapping[str, str]  # pod key -> zone, one service's contribution


def _contribution(service: Service) -> _Pods:
    """The pods behind ``service`` with their zones. A pod listed twice (two slices)
    keeps a zone if either entry has one."""
    found: dict[str, str] = {}
    for endpoint in service.endpoints:
        if endpoint.pod is None:
            continue
        key = f"{endpoint.pod}.{service.namespace}"
        found[key] = found.get(key) or endpoint.zone or ""
    return found


class WorkloadIndex:
    """``<pod>.<namespace>`` -> Workload, for every pod some endpoint names. Immutable:
    ``update`` returns a new index."""

    __slots__ = ("_by_service", "_pods", "_services")

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}  # the objects it was read from
        self._by_service: dict[str, _Pods] = {}  # service key -> its pods (only those with any)
        self._pods: dict[str, Workload] = {}

    @classmethod
    def build(cls, services: Iterable[Service]) -> WorkloadIndex:
        return cls().update({service.key: service for service in services})[0]

    def get(self, pod: str) -> Workload | None:
        return self._pods.get(pod)

    def __len__(self) -> int:
        return len(self._pods)

    def __contains__(self, pod: object) -> bool:
        return pod in self._pods

    def items(self) -> Iterable[tuple[str, Workload]]:
        return self._pods.items()

    def update(self, services: Mapping[str, Service]) -> tuple[WorkloadIndex, frozenset[str]]:
        """The index of ``services`` (by key) and the pods whose entry changed (added,
        removed, or another zone or set of services). Reads only the services that are
        not the very objects this index was made from."""
        mine = self._services
        changed = [k for k in services.keys() | mine.keys() if services.get(k) is not mine.get(k)]
        new = WorkloadIndex()
        new._services = dict(services)
        if not changed:
            new._by_service, new._pods = self._by_service, self._pods
            return new, frozenset()
        by_service = dict(self._by_service)
        gone = frozenset(changed)
        touched: set[str] = set()
        backs: dict[str, set[str]] = {}  # pod -> the changed services that list it now
        for key in changed:
            touched.update(by_service.pop(key, {}))
            service = services.get(key)
            pods = _contribution(service) if service is not None else {}
            if pods:
                by_service[key] = pods
                for pod in pods:
                    backs.setdefault(pod, set()).add(key)
        touched.update(backs)
        if not touched:  # services without pods changed: share the maps
            new._by_service, new._pods = by_service, self._pods
            return new, frozenset()
        pods_now = dict(self._pods)
        moved: set[str] = set()
        for pod in touched:
            before = self._pods.get(pod)
            # Its services: those it had, less the changed ones, plus the changed ones
            # that list it now (no walk over every service).
            keys = {k for k in (before.services if before else ()) if k not in gone}
            keys.update(backs.get(pod, ()))
            entry = _workload(pod, keys, by_service)
            if entry is None:
                pods_now.pop(pod, None)
            else:
                pods_now[pod] = entry
            if entry != before:
                moved.add(pod)
        new._by_service, new._pods = by_service, pods_now
        return new, frozenset(moved)


def _workload(pod: str, keys: set[str], by_service: Mapping[str, _Pods]) -> Workload | None:
    if not keys:
        return None
    ordered = tuple(sorted(keys))
    zones = sorted({z for k in ordered if (z := by_service[k][pod])})
    return Workload(zones[0] if zones else "", ordered)
