"""The egress route table as a gRPC client reads it (gRFCs A28, A31, A33, A44, A42).

Built from the sidecars' table by a whitelist, so a field Envoy reads and gRPC does not
never reaches a client (one it NACKs breaks every service's routes at once):
- matches: path (prefix, exact, regex), headers, runtime fraction, as written; a
  path-separated prefix (an HTTPRoute's PathPrefix) as an exact path and a prefix; a
  route with query parameter (or other Envoy-only) matchers is left out (gRPC never
  matches one: leaving it out keeps the order of the rest);
- actions: a cluster or weighted clusters; the timeout becomes ``max_stream_duration``
  (A31: gRPC ignores ``timeout``); retries keep the gRPC status codes they mean
  (``retries.py``); hashing by header is kept (A42);
- per-route filter configs: fault injection only (A33); a rate limit or fallback (local
  rate limit, custom response) is left out;
- a redirect, a direct response, or a route to a cluster a gRPC client does not get
  becomes a non-forwarding route: the call fails (UNAVAILABLE) where Envoy would answer
  for itself, rather than falling through to another route. An HTTPRoute's unresolved
  backend keeps its share (a cluster without endpoints): gRPC fails those calls
  UNAVAILABLE, as Envoy answers them 500.
Everything left out is noted in ``LeftOut``.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane.translator.gateway_api.backends import UNRESOLVED
from controlplane.translator.policies.fallback import CUSTOM_RESPONSE_FILTER
from controlplane.translator.policies.fault import FAULT_FILTER
from controlplane.translator.policies.rate_limit import RATE_LIMIT_FILTER
from controlplane.translator.proxyless.listeners import GRPC_ROUTE
from controlplane.translator.proxyless.notes import LeftOut
from controlplane.translator.proxyless.retries import grpc_retry_policy

_Route = route_components_pb2.Route
_Action = route_components_pb2.RouteAction
_POLICY_OF: Final = {RATE_LIMIT_FILTER: "rate_limit", CUSTOM_RESPONSE_FILTER: "fallback"}
_MATCH_FIELDS: Final = frozenset({"prefix", "path", "safe_regex", "case_sensitive", "headers",
                                  "runtime_fraction", "grpc", "path_separated_prefix"})
# (the actions that are not ``route`` are noted as such, below)
_ROUTE_FIELDS: Final = frozenset({"name", "match", "route", "typed_per_filter_config",
                                  "redirect", "direct_response", "filter_action",
                                  "non_forwarding_action"})
# (cluster_not_found_response_code: a gRPC call to a cluster it does not have fails anyway)
_ACTION_FIELDS: Final = frozenset({"cluster", "weighted_clusters", "timeout", "retry_policy",
                                   "hash_policy", "max_stream_duration",
                                   "cluster_not_found_response_code"})
_LEG_FIELDS: Final = frozenset({"name", "weight", "typed_per_filter_config"})
# The source header (a log field for the called sidecar) is on every mesh host: not noted.
_HOST_FIELDS: Final = frozenset({"name", "domains", "routes", "typed_per_filter_config",
                                 "retry_policy", "request_headers_to_add"})


@dataclass(frozen=True, slots=True)
class GrpcRoutes:
    config: route_pb2.RouteConfiguration  # named GRPC_ROUTE
    left_out: LeftOut
    # The unresolved backends' cluster names it routes to: a gRPC client waits for every
    # cluster of a virtual host before its first call (15 s for one that never comes), so
    # each is served as a cluster without endpoints (``placeholder_cluster``).
    unresolved: tuple[str, ...]


def grpc_route_config(config: route_pb2.RouteConfiguration,
                      clusters: Container[str]) -> GrpcRoutes:
    """``config`` for gRPC clients; ``clusters``: the names of the clusters a gRPC client
    gets (routes to others fail their calls)."""
    left = LeftOut()
    hosts = [_host(host, clusters, left) for host in config.virtual_hosts]
    unresolved = sorted({leg.name for host in hosts for route in host.routes
                         for leg in route.route.weighted_clusters.clusters
                         if leg.name.startswith(UNRESOLVED)})
    return GrpcRoutes(route_pb2.RouteConfiguration(name=GRPC_ROUTE, virtual_hosts=hosts),
                      left, tuple(unresolved))


def _host(host: route_components_pb2.VirtualHost, clusters: Container[str],
          left: LeftOut) -> route_components_pb2.VirtualHost:
    where = f"virtual host {host.name}"
    _note_fields(host, _HOST_FIELDS, where, left)
    made = route_components_pb2.VirtualHost(name=host.name, domains=host.domains)
    for route in host.routes:
        kept = _route(route, clusters, f"route {route.name or '(default)'} of {host.name}",
                      left)
        if kept is not None:
            made.routes.extend(_separated(kept))
    _filter_configs(host.typed_per_filter_config, made.typed_per_filter_config, where, left)
    if host.HasField("retry_policy"):
        retry = grpc_retry_policy(host.retry_policy)
        if retry is not None:
            made.retry_policy.CopyFrom(retry)
    return made


def _separated(route: route_components_pb2.Route) -> list[route_components_pb2.Route]:
    """A path-separated prefix (an HTTPRoute's PathPrefix: ``/api`` matches ``/api`` and
    ``/api/x``, not ``/apix``), which gRPC does not know, as the two routes it means: the
    exact path, then the prefix with its ``/``."""
    if route.match.WhichOneof("path_specifier") != "path_separated_prefix":
        return [route]
    prefix = route.match.path_separated_prefix
    exact, under = _Route(), _Route()
    exact.CopyFrom(route)
    under.CopyFrom(route)
    exact.match.path = prefix
    under.match.prefix = prefix.rstrip("/") + "/"
    return [exact, under]


def _route(route: route_components_pb2.Route, clusters: Container[str], where: str,
           left: LeftOut) -> route_components_pb2.Route | None:
    odd = [f.name for f, _ in route.match.ListFields() if f.name not in _MATCH_FIELDS]
    if odd:
        left.add(f"match on {', '.join(odd)} (the route is left out)", where)
        return None
    _note_fields(route, _ROUTE_FIELDS, where, left)
    made = _Route(name=route.name, match=route.match)
    made.match.ClearField("grpc")  # a gRPC client's every call is gRPC: always true
    action = _action(route.route, clusters, where, left) if route.HasField("route") else None
    if action is None:
        if not route.HasField("route"):
            left.add(f"{route.WhichOneof('action')} (calls fail: UNAVAILABLE)", where)
        made.non_forwarding_action.SetInParent()
        return made
    made.route.CopyFrom(action)
    _filter_configs(route.typed_per_filter_config, made.typed_per_filter_config, where, left)
    return made


def _action(action: route_components_pb2.RouteAction, clusters: Container[str], where: str,
            left: LeftOut) -> route_components_pb2.RouteAction | None:
    """None when the call cannot be forwarded (a cluster gRPC clients do not get)."""
    _note_fields(action, _ACTION_FIELDS, where, left)
    made = _Action()
    kind = action.WhichOneof("cluster_specifier")
    if kind == "cluster":
        if action.cluster not in clusters:
            left.add(f"cluster {action.cluster} (not for gRPC clients; calls fail)", where)
            return None
        made.cluster = action.cluster
    elif kind == "weighted_clusters":
        for leg in action.weighted_clusters.clusters:
            if leg.name not in clusters and not leg.name.startswith(UNRESOLVED):
                left.add(f"cluster {leg.name} (not for gRPC clients; calls fail)", where)
                return None
            _note_fields(leg, _LEG_FIELDS, where, left)
            kept = made.weighted_clusters.clusters.add(name=leg.name, weight=leg.weight)
            _filter_configs(leg.typed_per_filter_config, kept.typed_per_filter_config,
                            where, left)
    else:
        left.add(f"cluster_specifier {kind} (calls fail)", where)
        return None
    if action.HasField("max_stream_duration"):
        made.max_stream_duration.CopyFrom(action.max_stream_duration)
    elif action.HasField("timeout") and (action.timeout.seconds or action.timeout.nanos):
        made.max_stream_duration.max_stream_duration.CopyFrom(action.timeout)
    if action.HasField("retry_policy"):
        retry = grpc_retry_policy(action.retry_policy)
        if retry is not None:
            made.retry_policy.CopyFrom(retry)
    for policy in action.hash_policy:
        if policy.HasField("header"):
            made.hash_policy.append(policy)
        else:
            left.add(f"hash on {policy.WhichOneof('policy_specifier')}", where)
    return made


def _filter_configs(given: Mapping[str, any_pb2.Any], into: Any, where: str,
                    left: LeftOut) -> None:
    """Fault injection's per-route config is kept (``into``: the new message's map);
    the others (Envoy-only filters) are noted."""
    for name in sorted(given):
        if name == FAULT_FILTER:
            into[name].CopyFrom(given[name])
        else:
            left.add(_POLICY_OF.get(name, name), where)


def _note_fields(message: Message, known: frozenset[str], where: str, left: LeftOut) -> None:
    for described, _ in message.ListFields():
        if described.name not in known:
            left.add(described.name, where)
