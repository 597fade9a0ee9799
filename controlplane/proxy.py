"""Who a proxy is, read from its Envoy Node, and the group it shares a snapshot with.

``node.id`` is unique per proxy; ``node.cluster`` is the service the sidecar belongs to;
``node.metadata`` carries the namespace and the ports the bootstrap set. Proxies that
agree on everything but their id get the same config, so they share one snapshot.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2

from controlplane.mesh.workloads import WorkloadIndex

DEFAULT_NAMESPACE = "default"
DEFAULT_EGRESS_PORT = 15001
DEFAULT_INBOUND_ADDRESS = "0.0.0.0"
CAPTURE_INBOUND_PORT = 15006  # where capture sends inbound connections (DESIGN.md §5)
# What a proxy is (node.metadata.kind): a sidecar beside an app (the default), an ingress
# gateway in front of the mesh (node.metadata.gateway names its Gateway), or a gRPC
# client that speaks xDS itself (proxyless: no Envoy). Each kind gets its own resources
# (assembly/kinds.py); the kind is part of the group.
SIDECAR = "sidecar"
GATEWAY = "gateway"
GRPC = "grpc"
KINDS = (SIDECAR, GATEWAY, GRPC)


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """What the translator needs to know about a proxy. ``node_id`` is not part of the
    group: two replicas of a service share one snapshot."""

    node_id: str
    service: str
    namespace: str = DEFAULT_NAMESPACE
    egress_port: int = DEFAULT_EGRESS_PORT
    inbound_port: int | None = None
    app_port: int | None = None
    inbound_address: str = DEFAULT_INBOUND_ADDRESS
    zone: str = ""  # node.locality.zone: endpoints in this zone are preferred
    # node.metadata.on_demand: the sidecar starts with only its own config and fetches a
    # service's routes and clusters the first time its app calls it (VHDS, on-demand CDS).
    on_demand: bool = False
    # node.metadata.capture: iptables send the pod's traffic to the sidecar (``controlplane
    # capture``), so its listeners follow each connection's original destination.
    capture: bool = False
    # The workload identity (a SPIFFE URI) its verified credential says it runs as; "" when
    # the server runs no CA. Not part of the group: the group's snapshot is identity-free,
    # and the server answers the SDS secrets per stream (cache/secrets.py).
    workload: str = ""
    kind: str = SIDECAR  # one of KINDS
    gateway: str = ""  # with kind GATEWAY: the Gateway's name (in ``namespace``)
    # With kind GRPC: node.metadata.certificates, the client reads the mesh certificates
    # from files (``bootstrap --grpc --cert-dir``), so its clusters may use mTLS.
    certificates: bool = False
    # With kind GRPC: node.metadata.grpc_server, the process also serves with
    # grpc.server(xds=True) (``bootstrap --grpc --grpc-server``): it gets the server
    # listeners of its service (gRFC A36).
    serves: bool = False

    group: str = field(init=False, compare=False, repr=False)
    """The snapshot group key: readable, stable, and free of the node id. Made once: the
    server and the cache ask for it several times per stream per change."""

    def __post_init__(self) -> None:
        if self.capture:  # no app port: the inbound listener follows the original destination
            object.__setattr__(self, "inbound_port", self.inbound_port or CAPTURE_INBOUND_PORT)
            object.__setattr__(self, "app_port", None)
            # Captured calls carry no Host to fetch by before they are routed: a captured
            # sidecar gets its full (or scoped) config.
            object.__setattr__(self, "on_demand", False)
        key = f"{self.service}.{self.namespace}~egress={self.egress_port}"
        if self.zone:
            key += f"~zone={self.zone}"
        if self.inbound_port is not None and self.app_port is not None:
            key += f"~inbound={self.inbound_address}:{self.inbound_port}->{self.app_port}"
        if self.kind != SIDECAR:
            key += f"~kind={self.kind}"
        if self.gateway:
            key += f"~gateway={self.gateway}"
            if self.inbound_address != DEFAULT_INBOUND_ADDRESS:  # where its listeners bind
                key += f"~address={self.inbound_address}"
        if self.certificates:
            key += "~certs"
        if self.serves:
            key += "~server"
        if self.on_demand:
            key += "~on-demand"
        if self.capture:
            key += "~capture"
            if (self.inbound_address, self.inbound_port) != (DEFAULT_INBOUND_ADDRESS,
                                                             CAPTURE_INBOUND_PORT):
                key += f"~inbound={self.inbound_address}:{self.inbound_port}"
        object.__setattr__(self, "group", key)

    @classmethod
    def from_node(cls, node: base_pb2.Node, delta: bool = False) -> ProxyIdentity:
        """Read identity from a Node; missing metadata falls back to the bootstrap defaults.
        On-demand discovery needs delta xDS, so ``on_demand`` is read only for a node that
        speaks it (``delta``): over state of the world, an on-demand sidecar is served
        like any other, with its full config. A captured sidecar (``capture: "true"``)
        has no app port: its inbound listener (15006 unless given) forwards each
        connection to where it was going."""
        fields = node.metadata.fields
        namespace = _text(fields.get("namespace")) or DEFAULT_NAMESPACE
        capture = _flag(fields.get("capture"))
        inbound = _port(fields.get("inbound_port"))
        app = _port(fields.get("app_port"))
        if not capture and (inbound is None or app is None):
            inbound = app = None
        kind = _kind(node)
        return cls(
            node_id=node.id,
            service=node.cluster,
            namespace=namespace,
            egress_port=_port(fields.get("egress_port")) or DEFAULT_EGRESS_PORT,
            inbound_port=inbound,
            app_port=app,
            inbound_address=_text(fields.get("inbound_address")) or DEFAULT_INBOUND_ADDRESS,
            zone=node.locality.zone,
            on_demand=delta and _flag(fields.get("on_demand")),
            capture=capture,
            kind=kind,
            gateway=(_text(fields.get("gateway")) or "") if kind == GATEWAY else "",
            certificates=kind == GRPC and _flag(fields.get("certificates")),
            serves=kind == GRPC and _flag(fields.get("grpc_server")),
        )


def resolve(proxy: ProxyIdentity, workloads: WorkloadIndex,
            services: Container[str]) -> ProxyIdentity:
    """``proxy`` completed by what the mesh knows of its pod (``mesh/workloads.py``).

    Only a proxy whose node id is ``<pod>.<namespace>`` of its own namespace and whose pod
    an endpoint names is resolved; any other comes back as it is. Its bootstrap wins: the
    pod's zone fills in only a missing zone, and the pod's service replaces
    ``node.cluster`` only when that is no service of the mesh in its namespace. A pod
    behind several services takes the first of them by name (``services`` sorted), the
    same on every replica."""
    if not proxy.node_id.endswith("." + proxy.namespace):
        return proxy
    found = workloads.get(proxy.node_id)
    if found is None:
        return proxy
    zone = proxy.zone or found.zone
    service = proxy.service
    if f"{service}.{proxy.namespace}" not in services and found.services:
        service = found.services[0].rpartition(".")[0]
    if (zone, service) == (proxy.zone, proxy.service):
        return proxy
    return dataclasses.replace(proxy, zone=zone, service=service)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return str(value.string_value) or None
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if math.isfinite(number) else None
    return None


def _kind(node: base_pb2.Node) -> str:
    """``node.metadata.kind`` when it is one of KINDS. A node that says nothing but is a
    gRPC library (``user_agent_name`` "gRPC Go", "gRPC Java", "gRPC C-core"...: a
    bootstrap written by hand or by another tool) is a proxyless gRPC client."""
    said = (_text(node.metadata.fields.get("kind")) or "").lower()
    if said in KINDS:
        return said
    if node.user_agent_name.lower().startswith("grpc"):
        return GRPC
    return SIDECAR


def _flag(value: Any) -> bool:
    """``true`` (a bool) or ``"true"`` (any case, as a string metadata value)."""
    if value is None:
        return False
    if value.WhichOneof("kind") == "bool_value":
        return bool(value.bool_value)
    return (_text(value) or "").lower() == "true"


def _port(value: Any) -> int | None:
    text = _text(value)
    if text is None:
        return None
    try:
        port = int(float(text))
    except (ValueError, OverflowError):  # "abc", "nan", "1e400"
        return None
    return port if 0 < port < 65536 else None
