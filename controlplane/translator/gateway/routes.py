"""A gateway's route tables: one per HTTP port, one per HTTPS listener.

A virtual host per hostname the attached HTTPRoutes and GRPCRoutes serve there (the intersection of
the listener's and the route's hostnames, ``mesh/gateway_attach.py``), holding every
rule of those routes in the spec's precedence (``rule_routes``; a GRPCRoute's method
match is a path match on ``/service/method``, as for a sidecar, so both kinds share a
host). A Host no virtual host
names gets Envoy's 404, as the spec asks for a request no route matches. Each route then
takes the backend service's own policy, as a sidecar's call to it would: fault, rate
limit, fallback and consistent hashing always; its timeout and retries where the rule
sets none (a rule's own win, as on a sidecar's port with a route attached).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from envoy.config.route.v3 import route_components_pb2, route_pb2

from controlplane.mesh.attach import ResolvedRule, attach
from controlplane.mesh.gateway_attach import ServedListener
from controlplane.mesh.model import Mesh
from controlplane.mesh.routes import GRPCRoute, HTTPRoute
from controlplane.translator.gateway import names
from controlplane.translator.gateway_api import route_name, rule_routes
from controlplane.translator.policies import FEATURES
from controlplane.translator.routes import source_header

ALWAYS: Final = frozenset({"fault", "rate_limit", "fallback"})  # per-route filter configs
WITH_ACTION: Final = frozenset({"load_balancer"})
Routed = HTTPRoute | GRPCRoute  # the kinds an HTTP or HTTPS listener serves


def resolved_rules(mesh: Mesh, route: Routed) -> list[ResolvedRule]:
    """The route's rules with their backends resolved (a gateway parent has no port:
    each backendRef names its own, as the spec requires for a Service)."""
    return attach(mesh).resolve(route)


def route_table(mesh: Mesh, name: str, listeners: Iterable[ServedListener]
                ) -> route_pb2.RouteConfiguration:
    """The route configuration ``name`` over the HTTP and gRPC routes attached to
    ``listeners``.

    A request is the most specific listener's (an exact hostname, then the longest
    wildcard, then none), so a host is taken by the first listener in that order that
    serves it. Within a listener, a host's virtual host holds the rules of the routes for
    that host first, then those of each wildcard covering it (the spec gives the rules
    of the route with the more specific hostname precedence)."""
    hosts: dict[str, route_components_pb2.VirtualHost] = {}
    for served in sorted(listeners, key=lambda s: specificity(s.listener.hostname)):
        by_host: dict[str, list[Routed]] = {}
        for attached in served.routes:
            if isinstance(attached.route, HTTPRoute | GRPCRoute):
                for host in attached.hostnames:
                    by_host.setdefault(host, []).append(attached.route)
        for host in by_host:
            if host in hosts:
                continue
            tiers = [host, *sorted((w for w in by_host if w != host and covers(w, host)),
                                   key=specificity)]
            hosts[host] = virtual_host(mesh, name, host, [by_host[t] for t in tiers])
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[hosts[h] for h in sorted(hosts)])


def specificity(host: str | None) -> tuple[int, int]:
    """Sort key: exact hostnames, then wildcards, longest first, then any host."""
    if host is None or host == "*":
        return (2, 0)
    return (1 if host.startswith("*.") else 0, -len(host))


def covers(wildcard: str, host: str) -> bool:
    """``wildcard`` ("*" or ``*.suffix``) takes requests for ``host``."""
    return wildcard == "*" or (wildcard.startswith("*.") and host != wildcard
                               and host.endswith(wildcard[1:]))


def virtual_host(mesh: Mesh, table: str, host: str, tiers: Sequence[Sequence[Routed]]
                 ) -> route_components_pb2.VirtualHost:
    """The host's routes: each tier's rules in the spec's match precedence, tier after
    tier; a rule already placed by an earlier tier is not repeated."""
    made: list[route_components_pb2.Route] = []
    seen: set[tuple[tuple[str, str, str], int]] = set()
    for routes in tiers:
        unique = {route.key: route for route in routes}.values()  # in the order given
        rules = [rule for route in unique for rule in resolved_rules(mesh, route)
                 if (rule.route, rule.rule) not in seen]
        seen.update((rule.route, rule.rule) for rule in rules)
        by_name = {route_name(rule, at): rule for rule in rules
                   for at in range(len(rule.matches))}
        for route in rule_routes(rules):
            rule = by_name.get(str(route.name))
            if rule is not None:
                apply_policies(mesh, rule, route)
            made.append(route)
    return route_components_pb2.VirtualHost(
        name=f"{table}/{host}", domains=[host], routes=made,
        request_headers_to_add=[source_header()])


def apply_policies(mesh: Mesh, rule: ResolvedRule, route: route_components_pb2.Route) -> None:
    """The policy of the rule's first backend with weight (the service the call is for)."""
    backend = next((b for b in rule.backends if b.weight > 0 and b.service_key), None)
    if backend is None or backend.service_key is None:
        return
    service = mesh.by_key.get(backend.service_key)
    port = next((p for p in service.service_ports if p.port == backend.port), None) \
        if service is not None else None
    if service is None or port is None:
        return
    action = route.HasField("route")
    wanted = set(ALWAYS)
    if action:
        wanted |= WITH_ACTION
        if rule.timeouts is None:
            wanted.add("timeout")
        if rule.retry is None:
            wanted.add("retries")
    for feature in FEATURES:
        if feature.name in wanted:
            feature.route(service, port, route)


def http_table_name(port: int) -> str:
    return names.route(port)
