"""Names that tie resources together. Istio's cluster-name shape, so the names read
familiar in Envoy's admin output: ``outbound|9080||reviews.default.svc.cluster.local``."""

from __future__ import annotations

from controlplane.mesh.model import Service

EGRESS_LISTENER = "egress"
EGRESS_ROUTE = "egress"
INBOUND_LISTENER = "inbound"
INBOUND_ROUTE = "inbound"
CLUSTER_DOMAIN = "cluster.local"


def fqdn(service: Service) -> str:
    return f"{service.name}.{service.namespace}.svc.{CLUSTER_DOMAIN}"


def outbound_cluster(service: Service, subset: str = "") -> str:
    """The EDS cluster (and ClusterLoadAssignment) name for calls to ``service``."""
    return f"outbound|{service.port}|{subset}|{fqdn(service)}"


def inbound_cluster(service_name: str, namespace: str, inbound_port: int) -> str:
    """The static cluster from a sidecar's inbound listener to its own app."""
    return f"inbound|{inbound_port}||{service_name}.{namespace}.svc.{CLUSTER_DOMAIN}"


def domains(service: Service, proxy_namespace: str) -> list[str]:
    """Every Host a client may use: ``svc``, ``svc.ns``, ``svc.ns.svc``, the FQDN, each
    bare and with ``:port``. The bare ``svc`` only for the proxy's own namespace, as in
    Kubernetes DNS: two namespaces may both have a ``reviews``, and Envoy rejects a route
    configuration in which two virtual hosts share a domain."""
    hosts = [service.name] if service.namespace == proxy_namespace else []
    hosts += [
        f"{service.name}.{service.namespace}",
        f"{service.name}.{service.namespace}.svc",
        fqdn(service),
    ]
    return [*hosts, *(f"{h}:{service.port}" for h in hosts)]
