"""Names that tie resources together. Istio's cluster-name shape, so the names read
familiar in Envoy's admin output: ``outbound|9080||reviews.default.svc.cluster.local``."""

from __future__ import annotations

from controlplane.mesh.model import Service

EGRESS_LISTENER = "egress"
EGRESS_ROUTE = "egress"
INBOUND_LISTENER = "inbound"
INBOUND_ROUTE = "inbound"
PASSTHROUGH_CLUSTER = "passthrough"  # a captured connection's original destination
BLACKHOLE_CLUSTER = "blackhole"  # no hosts: a connection sent here is closed
INBOUND_PASSTHROUGH_CLUSTER = "inbound-passthrough"  # inbound, to a port no service names
CLUSTER_DOMAIN = "cluster.local"
METADATA = "controlplane"  # clusters' filter_metadata key: {service: name.namespace}
SOURCE_HEADER = "x-controlplane-source"  # the calling sidecar's name.namespace


def fqdn(service: Service) -> str:
    return f"{service.name}.{service.namespace}.svc.{CLUSTER_DOMAIN}"


def outbound_cluster(service: Service, port: int, subset: str = "") -> str:
    """The cluster (and ClusterLoadAssignment) name for calls to one port of ``service``."""
    return f"outbound|{port}|{subset}|{fqdn(service)}"


def virtual_host(service: Service, port: int) -> str:
    """``name.namespace``, and ``name.namespace:port`` for one of several named ports."""
    return f"{service.key}:{port}" if service.named_ports else service.key


def inbound_cluster(service_name: str, namespace: str, inbound_port: int) -> str:
    """The static cluster from a sidecar's inbound listener to its own app."""
    return f"inbound|{inbound_port}||{service_name}.{namespace}.svc.{CLUSTER_DOMAIN}"


def domains(service: Service, proxy_namespace: str, port: int, bare: bool = True) -> list[str]:
    """Every Host a client may use for ``port``: ``svc``, ``svc.ns``, ``svc.ns.svc``, the
    FQDN, each with ``:port`` and, when ``bare``, without (only one port of a service
    may take the bare forms: Envoy rejects a route configuration in which two virtual
    hosts share a domain). The plain ``svc`` only for the proxy's own namespace, as in
    Kubernetes DNS: two namespaces may both have a ``reviews``. Then the service's
    cluster IPs (``[v6]`` bracketed), as an app that calls one by address sends it."""
    hosts = [service.name] if service.namespace == proxy_namespace else []
    hosts += [
        f"{service.name}.{service.namespace}",
        f"{service.name}.{service.namespace}.svc",
        fqdn(service),
        *(f"[{ip}]" if ":" in ip else ip for ip in service.cluster_ips or ()),
    ]
    return [*(hosts if bare else []), *(f"{h}:{port}" for h in hosts)]
