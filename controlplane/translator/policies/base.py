"""The interface every governance feature implements (Envoy Gateway's one file per
filter): a feature turns its part of a service's policy into Envoy config through a few
hooks, each optional. Adding a feature adds a module and a line in ``FEATURES``; the
cluster, route and listener builders never grow an if-chain."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.mesh.model import Service, ServicePort


class Feature:
    """A governance feature. Hooks mutate the message they are given."""

    name = "feature"

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        """Adjust the outbound cluster of ``service``'s ``port``."""

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        """Adjust the egress route that sends to ``service``'s ``port``."""

    def routes(self, service: Service, port: ServicePort) -> list[route_components_pb2.Route]:
        """Routes to put ahead of the port's default route (header matches, say). Every
        feature's ``route`` hook then shapes them as it shapes the default one."""
        return []

    def http_filters(self) -> list[hcm_pb2.HttpFilter]:
        """HTTP filters this feature needs on the egress listener, before the router.
        They should do nothing unless a route turns them on (typed_per_filter_config)."""
        return []

    def inbound_http_filters(self, service: Service,
                             port: ServicePort) -> list[hcm_pb2.HttpFilter]:
        """HTTP filters a captured sidecar puts in front of its own app's ``port``
        (``service`` is the sidecar's own), before the router: policies the receiving
        side enforces, whoever calls (a caller without a sidecar too)."""
        return []
