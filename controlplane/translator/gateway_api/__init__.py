"""Gateway API route rules (GAMMA's, and a gateway's) as Envoy Routes.

``rule_routes`` turns the rules attached to one parent (``mesh/attach.py``) into the
routes of its virtual host: one Envoy Route per match, sorted by the spec's precedence
(``matches.precedence``), ties kept in the order the rules are given (route order, then
rule order). One module per concern: matches, filters, backends, timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.route.v3 import route_components_pb2

from controlplane.mesh.attach import ResolvedRule
from controlplane.mesh.model import ServicePort
from controlplane.mesh.route_match import GRPCRouteMatch, HTTPRouteMatch
from controlplane.translator.gateway_api import backends, filters, matches, timeouts

__all__ = ["route_name", "rule_routes"]


def route_name(rule: ResolvedRule, match: int) -> str:
    """``HTTPRoute/default/reviews-canary/rule/0/match/1``: which rule a route comes
    from, in config dumps and access logs."""
    kind, namespace, name = rule.route
    return f"{kind}/{namespace}/{name}/rule/{rule.rule}/match/{match}"


def rule_routes(rules: Sequence[ResolvedRule],
                port: ServicePort | None = None) -> list[route_components_pb2.Route]:
    """Envoy Routes for one parent's rules, most specific match first. ``port``: the
    Service port they attach to (None for a gateway listener); not needed to build
    them today, given so that port-specific features have it."""
    ordered = sorted(
        ((matches.precedence(match), position, at, rule, match)
         for position, rule in enumerate(rules) for at, match in enumerate(rule.matches)),
        key=lambda item: (item[0], item[1], item[2]))
    return [_route(rule, at, match) for _, _, at, rule, match in ordered]


def _route(rule: ResolvedRule, at: int,
           match: HTTPRouteMatch | GRPCRouteMatch) -> route_components_pb2.Route:
    route = route_components_pb2.Route(
        name=route_name(rule, at),
        match=matches.grpc_match(match) if isinstance(match, GRPCRouteMatch)
        else matches.http_match(match))
    prefix = _prefix(match)
    filters.apply_header_filters(rule.filters, route)
    for found in rule.filters:
        if found.request_redirect is not None:
            route.redirect.CopyFrom(filters.redirect(found.request_redirect, prefix))
            return route
    if not backends.set_backends(rule, rule.backends, route):
        return route
    for found in rule.filters:
        if found.url_rewrite is not None:
            filters.rewrite(found.url_rewrite, prefix, route.route)
    route.route.request_mirror_policies.extend(filters.mirror_policy(m) for m in rule.mirrors)
    timeouts.apply(rule.timeouts, rule.retry, route.route)
    return route


def _prefix(match: HTTPRouteMatch | GRPCRouteMatch) -> str | None:
    if isinstance(match, HTTPRouteMatch) and match.path_or_default.type == "PathPrefix":
        return match.path_or_default.value
    return None
