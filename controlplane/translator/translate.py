"""Mesh state + proxy identity -> the Envoy resources that proxy is served."""

from __future__ import annotations

from typing import Any, TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator.clusters import inbound_cluster, outbound_cluster
from controlplane.translator.endpoints import load_assignment
from controlplane.translator.listeners import egress_listener, inbound_listener
from controlplane.translator.routes import egress_route

Resources: TypeAlias = dict[str, list[Message]]


def translate(mesh: Mesh, proxy: ProxyIdentity) -> Resources:
    """Every type URL present (an empty list means "none", which SotW needs to say),
    each list sorted by resource name so that equal input gives equal output."""
    own = mesh.service(proxy.service, proxy.namespace)

    clusters: list[cluster_pb2.Cluster] = [outbound_cluster(s) for s in mesh.services]
    assignments: list[endpoint_pb2.ClusterLoadAssignment] = [
        load_assignment(s) for s in mesh.services
    ]
    listeners: list[Message] = [egress_listener(proxy)]

    inbound = inbound_cluster(proxy, own)
    if inbound is not None:
        clusters.append(inbound)
        listener = inbound_listener(proxy, own, str(inbound.name))
        if listener is not None:
            listeners.append(listener)

    return {
        resource.CLUSTER: _sorted(clusters),
        resource.ENDPOINT: _sorted(assignments),
        resource.LISTENER: _sorted(listeners),
        resource.ROUTE: [egress_route(mesh, proxy)],
        resource.SECRET: [],
    }


def resource_name(message: Message) -> str:
    """The name xDS addresses a resource by: a ClusterLoadAssignment has no ``name``."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(message.name)


def _sorted(messages: list[Any]) -> list[Message]:
    return sorted(messages, key=resource_name)
