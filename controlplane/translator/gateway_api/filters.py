"""Gateway API filters on an Envoy Route: header modifiers, redirect, URL rewrite,
mirror. Header values are literals (Envoy reads ``%`` as a command: doubled here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import regex_pb2
from envoy.type.v3 import percent_pb2

from controlplane.mesh.attach import ResolvedMirror
from controlplane.mesh.route_filters import (
    HeaderModifier,
    PathModifier,
    RouteFilter,
    strip_prefix_pattern,
)
from controlplane.mesh.route_filters import RequestRedirect as Redirect
from controlplane.mesh.route_filters import URLRewrite as Rewrite

_Option = base_pb2.HeaderValueOption
_Options = list[base_pb2.HeaderValueOption]
_CODES: Final = {301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
                 302: route_components_pb2.RedirectAction.FOUND,
                 303: route_components_pb2.RedirectAction.SEE_OTHER,
                 307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
                 308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT}
_WELL_KNOWN: Final = {"http": 80, "https": 443}
_PER_MILLION: Final = 1_000_000


def literal(value: str) -> str:
    return value.replace("%", "%%")


def header_options(modifier: HeaderModifier) -> _Options:
    """``set`` overwrites, ``add`` appends to what is there."""
    return [
        *(_Option(header=base_pb2.HeaderValue(key=h.name.lower(), value=literal(h.value)),
                  append_action=_Option.OVERWRITE_IF_EXISTS_OR_ADD)
          for h in modifier.set or ()),
        *(_Option(header=base_pb2.HeaderValue(key=h.name.lower(), value=literal(h.value)),
                  append_action=_Option.APPEND_IF_EXISTS_OR_ADD)
          for h in modifier.add or ()),
    ]


def removed(modifier: HeaderModifier) -> list[str]:
    return [name.lower() for name in modifier.remove or ()]


def apply_header_filters(filters: Sequence[RouteFilter],
                         target: route_components_pb2.Route
                         | route_components_pb2.WeightedCluster.ClusterWeight) -> None:
    """Request/ResponseHeaderModifier on a route (or on one weighted cluster)."""
    for found in filters:
        if found.request_header_modifier is not None:
            target.request_headers_to_add.extend(header_options(found.request_header_modifier))
            target.request_headers_to_remove.extend(removed(found.request_header_modifier))
        if found.response_header_modifier is not None:
            target.response_headers_to_add.extend(
                header_options(found.response_header_modifier))
            target.response_headers_to_remove.extend(removed(found.response_header_modifier))


def _prefix_regex(prefix: str, replacement: str) -> regex_pb2.RegexMatchAndSubstitute:
    """The matched prefix and the slashes after it, replaced by ``replacement`` (which
    ends in ``/``): ``/strip`` -> ``/`` makes ``/strip/x`` ``/x`` and ``/strip`` ``/``."""
    return regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=strip_prefix_pattern(prefix)),
        substitution=replacement)


def _path(path: PathModifier, prefix: str | None,
          action: route_components_pb2.RouteAction | route_components_pb2.RedirectAction
          ) -> None:
    """ReplaceFullPath, or ReplacePrefixMatch of the rule's (single) path prefix."""
    if path.type == "ReplaceFullPath":
        if isinstance(action, route_components_pb2.RedirectAction):
            action.path_redirect = path.value
        else:
            action.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
                pattern=regex_pb2.RegexMatcher(regex="^/.*$"), substitution=path.value))
        return
    trimmed = (prefix or "/").rstrip("/")
    value = path.value
    if value.endswith("/"):
        action.regex_rewrite.CopyFrom(_prefix_regex(trimmed, value))
    elif trimmed:
        action.prefix_rewrite = value
    else:  # the prefix "/": keep the path after the new prefix
        action.regex_rewrite.CopyFrom(_prefix_regex("", value + "/"))


def redirect(found: Redirect, prefix: str | None) -> route_components_pb2.RedirectAction:
    """No port given: the request's, or with a new scheme that scheme's well-known
    one, which Envoy leaves out of the Location (as the spec asks; a port equal to the
    new scheme's well-known one is left out the same way)."""
    action = route_components_pb2.RedirectAction(response_code=_CODES[found.status_code])
    if found.scheme is not None:
        action.scheme_redirect = found.scheme
    if found.hostname is not None:
        action.host_redirect = found.hostname
    if found.port is not None and (found.scheme is None
                                   or found.port != _WELL_KNOWN[found.scheme]):
        action.port_redirect = found.port
    if found.path is not None:
        _path(found.path, prefix, action)
    return action


def rewrite(found: Rewrite, prefix: str | None,
            action: route_components_pb2.RouteAction) -> None:
    if found.hostname is not None:
        action.host_rewrite_literal = found.hostname
    if found.path is not None:
        _path(found.path, prefix, action)


def mirror_policy(mirror: ResolvedMirror) -> route_components_pb2.RouteAction.RequestMirrorPolicy:
    share = round(mirror.numerator * _PER_MILLION / mirror.denominator)
    return route_components_pb2.RouteAction.RequestMirrorPolicy(
        cluster=mirror.cluster,
        runtime_fraction=base_pb2.RuntimeFractionalPercent(
            default_value=percent_pb2.FractionalPercent(
                numerator=share, denominator=percent_pb2.FractionalPercent.MILLION)))
