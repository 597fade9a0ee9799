"""Gateway API matches as Envoy RouteMatches, and the spec's precedence between them.

HTTPRoute: ``PathPrefix`` matches whole segments (Envoy's ``path_separated_prefix``:
``/foo`` takes ``/foo`` and ``/foo/bar``, not ``/foobar``), ``Exact`` the whole path,
``RegularExpression`` the whole path by RE2; headers and query parameters by exact
value or RE2; ``method`` as the ``:method`` header. GRPCRoute: a method match is a path
match on ``/service/method``.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2
from envoy.config.route.v3.route_components_pb2 import RouteMatch as _RouteMatch
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from controlplane.mesh.route_match import GRPCRouteMatch, HeaderMatch, HTTPRouteMatch

# Precedence ranks of the path kinds (lower first): the spec puts exact before prefix;
# where regular expressions go is left to implementations: here between the two, so a
# catch-all prefix (``/``) never hides them.
_EXACT, _REGEX, _PREFIX = 0, 1, 2

PrecedenceKey = tuple[int, int, int, int, int]


def _string(kind: str, value: str) -> string_pb2.StringMatcher:
    if kind == "RegularExpression":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))
    return string_pb2.StringMatcher(exact=value)


def _headers(headers: list[HeaderMatch] | None) -> list[route_components_pb2.HeaderMatcher]:
    return [route_components_pb2.HeaderMatcher(name=h.name.lower(),
                                               string_match=_string(h.type, h.value))
            for h in headers or ()]


def _set_path(match: _RouteMatch, kind: str, value: str) -> None:
    if kind == "Exact":
        match.path = value
    elif kind == "RegularExpression":
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=value))
    else:
        trimmed = value.rstrip("/")
        if trimmed:
            match.path_separated_prefix = trimmed
        else:
            match.prefix = "/"


def http_match(match: HTTPRouteMatch) -> _RouteMatch:
    path = match.path_or_default
    found = _RouteMatch(headers=_headers(match.headers))
    _set_path(found, path.type, path.value)
    if match.method is not None:
        found.headers.append(route_components_pb2.HeaderMatcher(
            name=":method", string_match=string_pb2.StringMatcher(exact=match.method)))
    found.query_parameters.extend(
        route_components_pb2.QueryParameterMatcher(name=q.name,
                                                   string_match=_string(q.type, q.value))
        for q in match.query_params or ())
    return found


def grpc_path(match: GRPCRouteMatch) -> tuple[str, str]:
    """(path kind, value) for a gRPC method match: ``/service/method`` exactly, the
    ``/service/`` prefix, or an RE2 over the whole path."""
    method = match.method
    if method is None:
        return "PathPrefix", "/"
    pattern = method.path_regex()
    if pattern is not None:
        return "RegularExpression", pattern
    if method.method is not None:
        return "Exact", f"/{method.service}/{method.method}"
    return "PathPrefix", f"/{method.service}/"


def grpc_match(match: GRPCRouteMatch) -> _RouteMatch:
    """A service's methods by the plain prefix ``/service/`` (gRPC paths always have
    that shape, and proxyless gRPC clients know no ``path_separated_prefix``); only gRPC
    requests (``grpc: {}``, content-type application/grpc), so a GRPCRoute rule without
    matches does not take an HTTPRoute's plain HTTP requests on a shared host."""
    found = _RouteMatch(headers=_headers(match.headers))
    found.grpc.SetInParent()
    kind, value = grpc_path(match)
    if kind == "PathPrefix":
        found.prefix = value
    else:
        _set_path(found, kind, value)
    return found


def precedence(match: HTTPRouteMatch | GRPCRouteMatch) -> PrecedenceKey:
    """Sort key (smaller first): exact path, (regular expressions, longest first), then
    the longest prefix, then a method match, then the most header matches, then the
    most query parameter matches. Ties keep route, rule and match order."""
    if isinstance(match, GRPCRouteMatch):
        kind, value = grpc_path(match)
        method, queries = 0, 0
    else:
        path = match.path_or_default
        kind, value = path.type, path.value.rstrip("/") or "/"
        method, queries = int(match.method is None), -len(match.query_params or ())
    rank = {"Exact": _EXACT, "PathPrefix": _PREFIX}.get(kind, _REGEX)
    return (rank, -len(value), method, -len(match.headers or ()), queries)
