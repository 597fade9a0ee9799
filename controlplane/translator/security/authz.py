"""Authorization: Envoy's RBAC filters on a sidecar's inbound side, HTTP and TCP.

Deny rules first, in a DENY filter (any match: denied); then, when any allow rule
applies to the service, an ALLOW filter (a request must match one of its rules; none
may apply to this port, and then every request on it is denied, as in Istio). A denied
HTTP request gets 403 and a body naming the service and the rule (Envoy's response code
details, ``rbac_access_denied_matched_policy[<scope>:<rule>]``, ``[none]`` when no
allow rule matched); a denied TCP connection is closed. Both are counted in the
sidecar's stats (``DENY_PREFIX`` / ``ALLOW_PREFIX``).
"""

from __future__ import annotations

from typing import Final

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2

from controlplane.translator.protoutil import pack
from controlplane.translator.security import rbac
from controlplane.translator.security.base import Inbound, Port, SecurityFeature

HTTP_RBAC: Final = "envoy.filters.http.rbac"
NETWORK_RBAC: Final = "envoy.filters.network.rbac"
DENY_PREFIX: Final = "authz_deny."
ALLOW_PREFIX: Final = "authz_allow."
DENIED_STATUS_KEY: Final = "controlplane.authz.denied_status"  # runtime key, never set

_Action = rbac_pb2.RBAC.Action


def rules_for(ctx: Inbound, port: Port) -> list[rbac_pb2.RBAC]:
    """The RBAC rule sets of ``port``: the DENY set, then the ALLOW set, each only when
    the service has rules of that action."""
    made = []
    for action, kind in ((_Action.DENY, "deny"), (_Action.ALLOW, "allow")):
        scoped = [r for r in ctx.rules if r.rule.action == kind]
        if not scoped:
            continue
        found = rbac_pb2.RBAC(action=action)
        for rule in scoped:
            policy = rbac.policy(rule.rule, ctx.identity, port)
            if policy is not None:
                found.policies[rule.policy_name].CopyFrom(policy)
        made.append(found)
    return made


def _prefix(rules: rbac_pb2.RBAC) -> str:
    return DENY_PREFIX if rules.action == _Action.DENY else ALLOW_PREFIX


class Authorization(SecurityFeature):
    name = "authorization"

    def http_filters(self, ctx: Inbound, port: Port) -> list[hcm_pb2.HttpFilter]:
        return [hcm_pb2.HttpFilter(name=f"{HTTP_RBAC}.{_prefix(r).rstrip('.')}",
                                   typed_config=pack(http_rbac_pb2.RBAC(
                                       rules=r, rules_stat_prefix=_prefix(r),
                                       track_per_rule_stats=True)))
                for r in rules_for(ctx, port)]

    def manager(self, ctx: Inbound, port: Port, manager: hcm_pb2.HttpConnectionManager) -> None:
        if not ctx.rules:
            return
        text = (f"403 Forbidden: {ctx.key} denied this request "
                "(%RESPONSE_CODE_DETAILS%: a deny rule by name, or [none] when no allow "
                "rule matched it)\n")
        manager.local_reply_config.mappers.append(hcm_pb2.ResponseMapper(
            filter=accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
                comparison=accesslog_pb2.ComparisonFilter(
                    op=accesslog_pb2.ComparisonFilter.Op.EQ,
                    value=base_pb2.RuntimeUInt32(default_value=403,
                                                 runtime_key=DENIED_STATUS_KEY)))),
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
                text_format_source=base_pb2.DataSource(inline_string=text))))

    def network_filters(self, ctx: Inbound,
                        port: Port) -> list[listener_components_pb2.Filter]:
        return [listener_components_pb2.Filter(
            name=f"{NETWORK_RBAC}.{_prefix(r).rstrip('.')}",
            typed_config=pack(network_rbac_pb2.RBAC(rules=r, stat_prefix=f"inbound_{_prefix(r)}")))
            for r in rules_for(ctx, port)]
