"""One mesh translated and encoded once, then assembled into a snapshot per proxy group.

Most of a snapshot is the same for every proxy: each service's clusters and endpoints.
A MeshBuild translates and serializes those once per mesh, and only for the services
that changed since the previous mesh; the egress route table once per namespace; and per
group only the listeners and the inbound cluster. A one-endpoint change in a mesh of a
thousand services re-encodes one ClusterLoadAssignment, not a thousand per group.

A service whose translation fails (a translator bug, a value nothing caught) is left
out of the build, or kept at its last good version when the previous build had one; it
is listed in ``rejected`` with the error. The rest of the mesh is built as usual.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, build_snapshot, encode_resource
from controlplane.mesh.model import Mesh, Service
from controlplane.proxy import ProxyIdentity
from controlplane.translator import egress_route, proxy_resources, resource_name, service_resources
from controlplane.translator.locality import prefer_zone


@dataclass(frozen=True, slots=True)
class _Encoded:
    service: Service
    clusters: tuple[Resource, ...]  # one per service port
    load_assignments: tuple[Resource, ...]  # one per EDS cluster
    routing: dict[str, Any]  # what the route tables see of it: all but its endpoints
    zoned: dict[str, tuple[Resource, ...]] = field(default_factory=dict)  # by proxy zone


def _routing(service: Service) -> dict[str, Any]:
    return service.model_dump(exclude={"endpoints"})


class MeshBuild:
    """Immutable once made; the pipeline swaps in a new one when a mesh is accepted."""

    mesh: Mesh  # what is served: rejected services at their last good version, or left out

    def __init__(self, mesh: Mesh, previous: MeshBuild | None = None,
                 replace: Mapping[str, str] | None = None) -> None:
        """``replace``: services (by key) already known to break the route tables, with
        the error; they are treated like services whose translation failed."""
        before = previous._services if previous is not None else {}
        self._services: dict[str, _Encoded] = {}
        self.rejected: dict[str, str] = dict(replace or {})
        self.encoded_bytes = 0
        served: list[Service] = []
        # Route tables carry over when no service changed anything but its endpoints.
        routes_same = previous is not None and [s.key for s in mesh.services] == [
            s.key for s in previous.mesh.services]
        for service in mesh.services:
            old = before.get(service.key)
            if old is not None and (old.service is service or old.service == service):
                self._services[service.key] = old
                served.append(old.service)
                continue
            try:
                if service.key in self.rejected:
                    raise _Replaced(self.rejected[service.key])
                routing = _routing(service)
                made = service_resources(service)
                clusters = _encode(resource.CLUSTER, made.clusters,
                                   old.clusters if old else ())
                assignments = _encode(resource.ENDPOINT, made.load_assignments,
                                      old.load_assignments if old else ())
            except Exception as exc:
                if not isinstance(exc, _Replaced):
                    self.rejected[service.key] = f"{type(exc).__name__}: {exc}"
                if old is not None:  # its last good version stays
                    self._services[service.key] = old
                    served.append(old.service)
                else:
                    routes_same = False
                continue
            if old is None or old.routing != routing:
                routes_same = False
            # all serialized, even those that come out equal to the old ones
            self.encoded_bytes += sum(r.size for r in (*clusters, *assignments))
            self._services[service.key] = _Encoded(service, clusters, assignments, routing)
            served.append(service)
        # What is served: the mesh with each rejected service at its last good version.
        self.mesh = mesh if not self.rejected else mesh.model_copy(update={"services": served})
        self._clusters = sorted((c for e in self._services.values() for c in e.clusters),
                                key=lambda r: r.name)
        self._assignments = sorted((a for e in self._services.values()
                                    for a in e.load_assignments), key=lambda r: r.name)
        self._zoned: dict[str, list[Resource]] = {}
        self._namespaces = frozenset(s.namespace for s in self.mesh.services)
        self._previous_routes = previous._routes if previous is not None else {}
        self._routes: dict[str, Resource] = dict(self._previous_routes) if routes_same else {}

    def last_good(self, key: str) -> Service | None:
        """The service ``key`` as this build serves it."""
        found = self._services.get(key)
        return found.service if found is not None else None

    def settle(self) -> None:
        """Let go of the previous build's route tables (kept only to reuse their bytes
        while this build's tables are made): after a big mesh shrinks, they are most of
        what it left behind."""
        self._previous_routes = {}

    def forget(self, namespaces: Collection[str], zones: Collection[str]) -> None:
        """Drop route tables and zone variants no group uses any more: proxies choose
        their namespace and zone, so these would otherwise grow with every name seen."""
        # list() first: a worker thread may be adding entries (list() of a dict is atomic).
        self._routes = {n: r for n, r in list(self._routes.items()) if n in namespaces
                        or n == _FOREIGN}
        self._previous_routes = {}
        self._zoned = {z: a for z, a in list(self._zoned.items()) if z in zones}
        for encoded in list(self._services.values()):
            for zone in [z for z in list(encoded.zoned) if z not in zones]:
                encoded.zoned.pop(zone, None)

    def route(self, namespace: str) -> Resource:
        """The egress route table of a namespace, encoded once for all its proxies.
        A namespace without services of its own gets no bare names, so all such share
        one table: proxies choose their namespace, and each table costs megabytes."""
        key = namespace if namespace in self._namespaces else _FOREIGN
        found = self._routes.get(key)
        if found is None:
            config = egress_route(self.mesh, namespace)
            found = encode_resource(resource.ROUTE, resource_name(config), config,
                                    self._previous_routes.get(key))
            self._routes[key] = found
        return found

    def assignments(self, zone: str) -> list[Resource]:
        """Every ClusterLoadAssignment as a proxy in ``zone`` gets it: its own zone first.
        Each service's variant is encoded once per zone and kept while it is unchanged."""
        if not zone:
            return self._assignments
        found = self._zoned.get(zone)
        if found is None:
            chosen: list[Resource] = []
            for encoded in self._services.values():
                variant = encoded.zoned.get(zone)
                if variant is None:
                    variant = tuple(_zoned(a, zone) for a in encoded.load_assignments)
                    encoded.zoned[zone] = variant
                chosen.extend(variant)
            found = self._zoned[zone] = sorted(chosen, key=lambda r: r.name)
        return found

    def snapshot(self, proxy: ProxyIdentity, reuse: Snapshot | None = None) -> Snapshot:
        """The group's snapshot; proxy-specific resources are encoded against ``reuse``."""
        own = proxy_resources(self.mesh, proxy)
        return build_snapshot({
            resource.CLUSTER: [*self._clusters,
                               *((resource_name(m), m) for m in own[resource.CLUSTER])],
            resource.ENDPOINT: self.assignments(proxy.zone),
            resource.LISTENER: [(resource_name(m), m) for m in own[resource.LISTENER]],
            resource.ROUTE: [self.route(proxy.namespace)],
            resource.SECRET: [],
        }, reuse=reuse)


_FOREIGN = "\0foreign"  # the route table key of namespaces that have no services


class _Replaced(Exception):
    """A service already found to break the route tables."""


def _encode(type_url: str, messages: Sequence[Message],
            old: tuple[Resource, ...]) -> tuple[Resource, ...]:
    """Encode each message against the old resource of the same name, if any."""
    by_name = {r.name: r for r in old}
    encoded = []
    for message in messages:
        name = resource_name(message)
        encoded.append(encode_resource(type_url, name, message, by_name.get(name)))
    return tuple(encoded)


def _zoned(assignment: Resource, zone: str) -> Resource:
    preferred = prefer_zone(assignment.message, zone)
    if preferred is None:
        return assignment
    return encode_resource(resource.ENDPOINT, assignment.name, preferred)
