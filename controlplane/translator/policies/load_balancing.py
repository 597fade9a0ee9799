"""``policy.load_balancer``: how a cluster picks a host."""

from __future__ import annotations

from typing import Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2

from controlplane.mesh.model import HashOn, LbPolicy, Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration

_Cluster = cluster_pb2.Cluster
_LB_POLICIES: Final[dict[LbPolicy, int]] = {
    "round_robin": _Cluster.LbPolicy.ROUND_ROBIN,
    "least_request": _Cluster.LbPolicy.LEAST_REQUEST,
    "random": _Cluster.LbPolicy.RANDOM,
    "ring_hash": _Cluster.LbPolicy.RING_HASH,
    "maglev": _Cluster.LbPolicy.MAGLEV,
}


class LoadBalancing(Feature):
    """The cluster picks the algorithm; for consistent hashing the route says what to
    hash on (Envoy hashes per route, so that the same cluster can be reached by
    differently hashed routes)."""

    name = "load_balancer"

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        balancer = service.policy.load_balancer
        cluster.lb_policy = _LB_POLICIES[balancer.policy if balancer else "round_robin"]

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        balancer = service.policy.load_balancer
        if balancer is not None and balancer.hash is not None:
            route.route.hash_policy.append(hash_policy(balancer.hash))


def hash_policy(on: HashOn) -> route_components_pb2.RouteAction.HashPolicy:
    policy = route_components_pb2.RouteAction.HashPolicy
    if on.header is not None:
        return policy(header=policy.Header(header_name=on.header.lower()))
    if on.cookie is not None:
        cookie = policy.Cookie(name=on.cookie)
        if on.cookie_ttl is not None:
            cookie.ttl.CopyFrom(duration(on.cookie_ttl))
        return policy(cookie=cookie)
    return policy(connection_properties=policy.ConnectionProperties(source_ip=True))
