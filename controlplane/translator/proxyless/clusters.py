"""Clusters as a gRPC client reads them (gRFCs A27, A32, A37, A42, A50).

gRPC takes EDS clusters, and LOGICAL_DNS ones of exactly one host (A37); a service of
the mesh is EDS. An external service (one DNS name) becomes LOGICAL_DNS; a service whose
endpoints are several DNS names (STRICT_DNS for Envoy) has no gRPC form and is left out.
Load balancing: round robin and ring hash (A42) as written; least request as a policy
list (least request, else round robin: A48, A52); maglev becomes ring hash (both hash
consistently; gRPC has no maglev) and random becomes round robin, because a gRPC client
NACKs a policy it does not know. Of the circuit breaker, gRPC keeps
``max_requests`` (A32); of outlier detection, ejection by success rate and failure
percentage (A50: the consecutive-error counters are Envoy's). mTLS (A29, ``tls.py``):
only for a client with the mesh certificates (``mtls`` given) calling a STRICT service;
otherwise plaintext, noted (a PERMISSIVE sidecar tells mesh mTLS from an app's own TLS
by the mesh ALPN, which a gRPC client does not offer, so it takes plaintext there).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2

from controlplane.translator.names import METADATA
from controlplane.translator.protoutil import ads, pack
from controlplane.translator.proxyless.notes import LeftOut
from controlplane.translator.proxyless.tls import grpc_mtls_socket, mesh_sans

_Cluster = cluster_pb2.Cluster
# Enum values read once (each lookup through the enum wrapper costs a Python call).
_EDS: Final = _Cluster.DiscoveryType.EDS
_DNS: Final = (_Cluster.DiscoveryType.STRICT_DNS, _Cluster.DiscoveryType.LOGICAL_DNS)
_LOGICAL_DNS: Final = _Cluster.DiscoveryType.LOGICAL_DNS
_ROUND_ROBIN: Final = _Cluster.LbPolicy.ROUND_ROBIN
_RING_HASH: Final = _Cluster.LbPolicy.RING_HASH
_LEAST_REQUEST: Final = _Cluster.LbPolicy.LEAST_REQUEST
_LB: Final = {  # (least request: a policy list, ``_least_request``)
    _ROUND_ROBIN: _ROUND_ROBIN,
    _Cluster.LbPolicy.RANDOM: _ROUND_ROBIN,
    _RING_HASH: _RING_HASH,
    _Cluster.LbPolicy.MAGLEV: _RING_HASH,
}
_CONSECUTIVE: Final = ("consecutive_5xx", "consecutive_gateway_failure",
                       "consecutive_local_origin_failure", "enforcing_consecutive_5xx",
                       "enforcing_consecutive_gateway_failure",
                       "enforcing_consecutive_local_origin_failure")


def grpc_cluster(cluster: cluster_pb2.Cluster, left: LeftOut,
                 strict: Container[str] | None = None) -> cluster_pb2.Cluster | None:
    """``cluster`` for gRPC clients; None when it has no gRPC form. ``strict``: for a
    client with the mesh certificates, the STRICT services (``name.namespace``), called
    with mTLS; None for a client without them (plaintext everywhere)."""
    where = f"cluster {cluster.name}"
    made = _Cluster(name=cluster.name)
    kind = cluster.WhichOneof("cluster_discovery_type")
    if kind == "type" and cluster.type == _EDS:
        made.type = _EDS
        made.eds_cluster_config.CopyFrom(cluster.eds_cluster_config)
    elif kind == "type" and cluster.type in _DNS:
        hosts = [lb.endpoint.address for group in cluster.load_assignment.endpoints
                 for lb in group.lb_endpoints]
        if len(hosts) != 1:
            left.add("the whole service (several DNS endpoints: gRPC resolves one name)",
                     where)
            return None
        made.type = _LOGICAL_DNS
        assignment = made.load_assignment
        assignment.cluster_name = cluster.load_assignment.cluster_name
        assignment.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(hosts[0])
    else:
        left.add("the whole service (a cluster type gRPC does not know)", where)
        return None
    _load_balancing(cluster, made, where, left)
    _limits(cluster, made)
    if cluster.HasField("outlier_detection"):
        made.outlier_detection.CopyFrom(_outlier_detection(cluster.outlier_detection,
                                                           where, left))
    _tls(cluster, made, strict, where, left)
    return made


def _tls(cluster: cluster_pb2.Cluster, made: cluster_pb2.Cluster,
         strict: Container[str] | None, where: str, left: LeftOut) -> None:
    sans = mesh_sans(cluster)
    if sans is not None and strict is not None and service_of(cluster) in strict:
        made.transport_socket.CopyFrom(grpc_mtls_socket(sans))
    elif sans is not None and strict is None:
        left.add("mTLS (a gRPC client without certificates calls in plaintext, which a "
                 "STRICT service refuses: bootstrap --grpc --cert-dir and controlplane "
                 "certs give it some)", where)
    elif sans is not None:
        left.add("mTLS (not STRICT: gRPC clients call it in plaintext)", where)
    elif cluster.HasField("transport_socket") or cluster.transport_socket_matches:
        left.add("TLS (gRPC clients call in plaintext)", where)


def service_of(cluster: cluster_pb2.Cluster) -> str:
    """The ``name.namespace`` of the service a sidecar's cluster calls ("" if none)."""
    found = cluster.metadata.filter_metadata
    if METADATA not in found or "service" not in found[METADATA].fields:
        return ""  # (reading a map entry that is not there would add it)
    return str(found[METADATA].fields["service"].string_value)


def placeholder_cluster(name: str) -> cluster_pb2.Cluster:
    """An EDS cluster whose assignment has no endpoints (``empty_assignment``): what a
    gRPC client gets for an HTTPRoute backend that does not resolve (calls fail)."""
    made = _Cluster(name=name, type=_EDS)
    made.eds_cluster_config.eds_config.CopyFrom(ads())
    made.eds_cluster_config.service_name = name
    return made


def _load_balancing(cluster: cluster_pb2.Cluster, made: cluster_pb2.Cluster, where: str,
                    left: LeftOut) -> None:
    if cluster.lb_policy == _LEAST_REQUEST:
        made.load_balancing_policy.CopyFrom(_least_request())
        return
    policy = _LB.get(cluster.lb_policy, _ROUND_ROBIN)
    if policy != cluster.lb_policy:
        left.add(f"lb_policy {_Cluster.LbPolicy.Name(cluster.lb_policy)} (as "
                 f"{_Cluster.LbPolicy.Name(policy)})", where)
    made.lb_policy = policy
    if policy == _RING_HASH and cluster.HasField("ring_hash_lb_config"):
        made.ring_hash_lb_config.CopyFrom(cluster.ring_hash_lb_config)


def _least_request() -> cluster_pb2.LoadBalancingPolicy:
    """Least request where the client has it (grpc-go, grpc-java: gRFC A48), round robin
    where it does not (grpcio's C core NACKs ``lb_policy: LEAST_REQUEST``): a client takes
    the first policy of the list it knows (gRFC A52)."""
    policies = cluster_pb2.LoadBalancingPolicy()
    for name, config in (("envoy.load_balancing_policies.least_request",
                          least_request_pb2.LeastRequest()),
                         ("envoy.load_balancing_policies.round_robin",
                          round_robin_pb2.RoundRobin())):
        policies.policies.add().typed_extension_config.CopyFrom(
            extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(config)))
    return policies


def _limits(cluster: cluster_pb2.Cluster, made: cluster_pb2.Cluster) -> None:
    """gRPC reads ``max_requests`` of the default priority only."""
    for limits in cluster.circuit_breakers.thresholds:
        if limits.priority == 0 and limits.HasField("max_requests"):
            made.circuit_breakers.thresholds.append(circuit_breaker_pb2.CircuitBreakers
                                                    .Thresholds(max_requests=limits
                                                                .max_requests))


def _outlier_detection(given: outlier_detection_pb2.OutlierDetection, where: str,
                       left: LeftOut) -> outlier_detection_pb2.OutlierDetection:
    made = outlier_detection_pb2.OutlierDetection()
    made.CopyFrom(given)
    if any(made.HasField(name) for name in _CONSECUTIVE[:3]):
        left.add("outlier_detection consecutive errors (gRPC ejects by success rate)", where)
    for name in _CONSECUTIVE:
        made.ClearField(name)
    return made
