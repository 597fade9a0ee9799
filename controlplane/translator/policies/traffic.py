"""``policy.split`` and ``policy.match``: canary, blue-green and header routes.

A split leg or match target is a label subset of the service's endpoints or another
service. A label subset is its own EDS cluster, ``outbound|PORT|SUBSET|fqdn``, whose
ClusterLoadAssignment holds only the endpoints carrying those labels (the clusters and
endpoints builders ask ``subsets`` which to make). Every subset any split leg or match
names exists whatever its weight, so moving weights (100/0 -> 0/100) changes the route
table alone: no cluster to add and warm, no request lost.

Another service is reached on the same port number (the mesh validator demands that it
has it, as HTTP or gRPC). Weights are relative (Envoy's ``weighted_clusters`` take any
total): 90/10 and 9/1 split alike; a leg of weight 0 is left out of the route, not its
cluster. Match routes go ahead of the default route, in the order given, and match
header values exactly.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import string_pb2

from controlplane.mesh.model import Endpoint, MatchRoute, Service, ServicePort, SplitTarget
from controlplane.translator import names
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import u32

_ROUTED = ("http", "grpc")
# Match routes are named match-0, match-1, ... (as in the policy): the default route is
# the one without a name, and shows so in config dumps.
MATCH_ROUTE = "match-"


def subset_name(labels: dict[str, str]) -> str:
    """``version=v2``; several labels sorted by key and joined by ``,``. Kubernetes label
    keys and values hold neither ``=`` nor ``,``, so two label sets never share a name
    (``-`` would: {a: b-c} and {a-b: c})."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def subsets(service: Service) -> list[dict[str, str]]:
    """The distinct label sets the service's split and match name, by subset name."""
    targets: list[SplitTarget | MatchRoute] = [
        *(service.policy.split or []), *(service.policy.match or [])
    ]
    found = {subset_name(t.labels): t.labels for t in targets if t.labels is not None}
    return [found[name] for name in sorted(found)]


def subset_ports(service: Service) -> list[ServicePort]:
    """The ports that get subset clusters: those routed by Host header (HTTP, gRPC)."""
    if service.external_name is not None:
        return []
    return [port for port in service.service_ports if port.protocol in _ROUTED]


def in_subset(endpoint: Endpoint, labels: dict[str, str]) -> bool:
    return all(endpoint.labels.get(key) == value for key, value in labels.items())


def target_cluster(service: Service, port: ServicePort, target: SplitTarget | MatchRoute) -> str:
    if target.labels is not None:
        return names.outbound_cluster(service, port.port, subset_name(target.labels))
    assert target.service is not None  # the model demands labels or service
    other = Service.model_construct(
        name=target.service, namespace=target.namespace or service.namespace
    )
    return names.outbound_cluster(other, port.port)


class Traffic(Feature):
    name = "traffic"

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        """The default route (not a named match route) splits by weight."""
        split = service.policy.split
        if not split or route.name.startswith(MATCH_ROUTE) or not route.HasField("route"):
            return
        legs = [
            route_components_pb2.WeightedCluster.ClusterWeight(
                name=target_cluster(service, port, leg), weight=u32(leg.weight)
            )
            for leg in split
            if leg.weight > 0
        ]
        route.route.ClearField("cluster")
        route.route.weighted_clusters.CopyFrom(route_components_pb2.WeightedCluster(clusters=legs))

    def routes(self, service: Service, port: ServicePort) -> list[route_components_pb2.Route]:
        """One route per ``match`` entry, ahead of the default route."""
        return [_match_route(service, port, index, match)
                for index, match in enumerate(service.policy.match or [])]


def _match_route(
    service: Service, port: ServicePort, index: int, match: MatchRoute
) -> route_components_pb2.Route:
    route_match = route_components_pb2.RouteMatch(
        headers=[
            route_components_pb2.HeaderMatcher(
                name=name, string_match=string_pb2.StringMatcher(exact=value)
            )
            for name, value in sorted((match.headers or {}).items())
        ],
    )
    if match.path is not None and match.path.exact is not None:
        route_match.path = match.path.exact
    else:
        route_match.prefix = match.path.prefix if match.path is not None else "/"
    return route_components_pb2.Route(
        name=f"{MATCH_ROUTE}{index}",
        match=route_match,
        route=route_components_pb2.RouteAction(cluster=target_cluster(service, port, match)),
    )
