"""``policy.fallback``: degradation. When no endpoint of a service can take a call (all
not ready, or all ejected by outlier detection), callers get the configured answer, or
the fallback service's, instead of Envoy's bare ``503 no healthy upstream``.

Built on Envoy's custom response filter, on the egress listener with an empty config
(which changes nothing) and turned on per route. Its matcher is a CEL expression on the
response code details, so it fires on exactly Envoy's own "no healthy upstream" answer:
a 503 from the app, an overflow or a timeout pass through untouched. The service form is
an internal redirect to ``name.namespace``, routed by the same egress table (with the
fallback service's own policies), answered with ``status`` (default 200: Envoy would
otherwise keep the original 503); Envoy redirects only requests without a body.

The clusters of a service with a fallback have no panic threshold: otherwise, with most
hosts ejected, Envoy would send to every host anyway and never say "no healthy upstream".
"""

from __future__ import annotations

from typing import Final

from cel.expr import syntax_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.custom_response.v3 import custom_response_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.custom_response.local_response_policy.v3 import (
    local_response_policy_pb2,
)
from envoy.extensions.http.custom_response.redirect_policy.v3 import redirect_policy_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import cel_pb2 as cel_matcher_pb2
from xds.type.matcher.v3 import http_inputs_pb2, matcher_pb2
from xds.type.v3 import cel_pb2

from controlplane.mesh.model import Fallback as FallbackPolicy
from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import pack, u32

CUSTOM_RESPONSE_FILTER: Final = "envoy.filters.http.custom_response"
NO_HEALTHY_UPSTREAM: Final = "no_healthy_upstream"  # Envoy's response code details
FALLBACK_HEADER: Final = "x-mesh-fallback"
DEFAULT_STATUS: Final = 200
DEFAULT_CONTENT_TYPE: Final = "text/plain"

_Matcher = matcher_pb2.Matcher


class Fallback(Feature):
    name = "fallback"

    def http_filters(self) -> list[hcm_pb2.HttpFilter]:
        return [
            hcm_pb2.HttpFilter(
                name=CUSTOM_RESPONSE_FILTER, typed_config=pack(custom_response_pb2.CustomResponse())
            )
        ]

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        if service.policy.fallback is not None:
            cluster.common_lb_config.healthy_panic_threshold.CopyFrom(
                percent_pb2.Percent(value=0.0)
            )

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        policy = service.policy.fallback
        if policy is not None:
            route.typed_per_filter_config[CUSTOM_RESPONSE_FILTER].CopyFrom(
                pack(custom_response(service, policy))
            )


def custom_response(service: Service, policy: FallbackPolicy) -> custom_response_pb2.CustomResponse:
    """On Envoy's "no healthy upstream" answer: the fallback. Anything else: unchanged."""
    action = extension_pb2.TypedExtensionConfig(
        name="fallback", typed_config=pack(_response_policy(service, policy))
    )
    predicate = _Matcher.MatcherList.Predicate(
        single_predicate=_Matcher.MatcherList.Predicate.SinglePredicate(
            input=extension_pb2.TypedExtensionConfig(
                name="response", typed_config=pack(http_inputs_pb2.HttpAttributesCelMatchInput())
            ),
            custom_match=extension_pb2.TypedExtensionConfig(
                name="no_healthy_upstream",
                typed_config=pack(
                    cel_matcher_pb2.CelMatcher(
                        expr_match=cel_pb2.CelExpression(cel_expr_parsed=_no_healthy_upstream())
                    )
                ),
            ),
        )
    )
    return custom_response_pb2.CustomResponse(
        custom_response_matcher=_Matcher(
            matcher_list=_Matcher.MatcherList(
                matchers=[
                    _Matcher.MatcherList.FieldMatcher(
                        predicate=predicate, on_match=_Matcher.OnMatch(action=action)
                    )
                ]
            )
        )
    )


def _response_policy(service: Service, policy: FallbackPolicy) -> Message:
    target = policy.target(service.namespace)
    mark = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=FALLBACK_HEADER, value=service.key),
        append_action=base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    if target is not None:
        name, namespace = target
        return redirect_policy_pb2.RedirectPolicy(
            redirect_action=route_components_pb2.RedirectAction(
                host_redirect=f"{name}.{namespace}"
            ),
            status_code=u32(policy.status or DEFAULT_STATUS),
            response_headers_to_add=[mark],
        )
    content_type = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(
            key="content-type", value=literal(policy.content_type or DEFAULT_CONTENT_TYPE)
        ),
        append_action=base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    response = local_response_policy_pb2.LocalResponsePolicy(
        status_code=u32(policy.status or DEFAULT_STATUS),
        response_headers_to_add=[content_type, mark],
    )
    response.body.inline_string = policy.body or ""
    return response


def literal(value: str) -> str:
    """A header value as written: Envoy reads headers_to_add values as format strings, in
    which ``%`` starts a command (a bare one makes it refuse the whole route table)."""
    return value.replace("%", "%%")


def _no_healthy_upstream() -> syntax_pb2.ParsedExpr:
    """``response.code_details == "no_healthy_upstream"``, as the parsed CEL tree (the
    custom response matcher takes no expression strings in Envoy 1.40)."""
    expr = syntax_pb2.Expr
    return syntax_pb2.ParsedExpr(
        expr=expr(
            id=1,
            call_expr=expr.Call(
                function="_==_",
                args=[
                    expr(
                        id=2,
                        select_expr=expr.Select(
                            operand=expr(id=3, ident_expr=expr.Ident(name="response")),
                            field="code_details",
                        ),
                    ),
                    expr(id=4, const_expr=syntax_pb2.Constant(string_value=NO_HEALTHY_UPSTREAM)),
                ],
            ),
        )
    )
