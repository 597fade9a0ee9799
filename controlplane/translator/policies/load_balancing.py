"""``policy.load_balancer``: how a cluster picks a host."""

from __future__ import annotations

from typing import Final

from envoy.config.cluster.v3 import cluster_pb2

from controlplane.mesh.model import LbPolicy, Service, ServicePort
from controlplane.translator.policies.base import Feature

_Cluster = cluster_pb2.Cluster
_LB_POLICIES: Final[dict[LbPolicy, int]] = {
    "round_robin": _Cluster.LbPolicy.ROUND_ROBIN,
    "least_request": _Cluster.LbPolicy.LEAST_REQUEST,
    "random": _Cluster.LbPolicy.RANDOM,
    "ring_hash": _Cluster.LbPolicy.RING_HASH,
    "maglev": _Cluster.LbPolicy.MAGLEV,
}


class LoadBalancing(Feature):
    name = "load_balancer"

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        balancer = service.policy.load_balancer
        cluster.lb_policy = _LB_POLICIES[balancer.policy if balancer else "round_robin"]
