"""One mesh translated and encoded once, then assembled into a snapshot per proxy group.

Most of a snapshot is the same for every proxy: each service's cluster and endpoints.
A MeshBuild translates and serializes those once per mesh, and only for the services
that changed since the previous mesh; the egress route table once per namespace; and per
group only the listeners and the inbound cluster. A one-endpoint change in a mesh of a
thousand services re-encodes one ClusterLoadAssignment, not a thousand per group.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, build_snapshot, encode_resource
from controlplane.mesh.model import Mesh, Service
from controlplane.proxy import ProxyIdentity
from controlplane.translator import egress_route, proxy_resources, resource_name, service_resources


@dataclass(frozen=True, slots=True)
class _Encoded:
    service: Service
    cluster: Resource
    load_assignment: Resource


class MeshBuild:
    """Immutable once made; the pipeline swaps in a new one when a mesh is accepted."""

    def __init__(self, mesh: Mesh, previous: MeshBuild | None = None) -> None:
        self.mesh = mesh
        before = previous._services if previous is not None else {}
        self._services: dict[str, _Encoded] = {}
        self.encoded_bytes = 0
        for service in mesh.services:
            old = before.get(service.key)
            if old is not None and old.service == service:
                self._services[service.key] = old
                continue
            made = service_resources(service)
            cluster = encode_resource(resource.CLUSTER, resource_name(made.cluster),
                                      made.cluster, old.cluster if old else None)
            assignment = encode_resource(resource.ENDPOINT, resource_name(made.load_assignment),
                                         made.load_assignment,
                                         old.load_assignment if old else None)
            self.encoded_bytes += cluster.size + assignment.size  # both serialized
            self._services[service.key] = _Encoded(service, cluster, assignment)
        self._clusters = sorted((e.cluster for e in self._services.values()),
                                key=lambda r: r.name)
        self._assignments = sorted((e.load_assignment for e in self._services.values()),
                                   key=lambda r: r.name)
        self._routes: dict[str, Resource] = {}
        self._previous_routes = previous._routes if previous is not None else {}

    def route(self, namespace: str) -> Resource:
        """The egress route table of a namespace, encoded once for all its proxies."""
        found = self._routes.get(namespace)
        if found is None:
            config = egress_route(self.mesh, namespace)
            found = encode_resource(resource.ROUTE, resource_name(config), config,
                                    self._previous_routes.get(namespace))
            self._routes[namespace] = found
        return found

    def snapshot(self, proxy: ProxyIdentity, reuse: Snapshot | None = None) -> Snapshot:
        """The group's snapshot; proxy-specific resources are encoded against ``reuse``."""
        own = proxy_resources(self.mesh, proxy)
        return build_snapshot({
            resource.CLUSTER: [*self._clusters,
                               *((resource_name(m), m) for m in own[resource.CLUSTER])],
            resource.ENDPOINT: self._assignments,
            resource.LISTENER: [(resource_name(m), m) for m in own[resource.LISTENER]],
            resource.ROUTE: [self.route(proxy.namespace)],
            resource.SECRET: [],
        }, reuse=reuse)
