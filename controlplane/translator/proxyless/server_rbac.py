"""Authorization for a proxyless gRPC server (gRFC A41): the sidecars' RBAC, as gRPC reads it.

The rules are the ones a sidecar of the service enforces (``translator/security``: the
DENY set, then the ALLOW set, per port), so a service answers the same whether its pods
run a sidecar or serve xDS themselves. gRPC reads RBAC's principals (``authenticated``
by the peer certificate's URI SAN, ``any``, ``and``/``or``/``not``) and permissions
(``url_path``, ``header``, ``any``, ``and``/``or``/``not``) as Envoy does, but NACKs the
whole listener for a header matcher on ``:scheme`` or a ``grpc-`` header. Such a
condition is replaced on the safe side, as a sidecar does for HTTP conditions on a TCP
port: in an allow rule it never matches (the rule grants less), in a deny rule it always
matches (the rule denies more). Each one is noted.
"""

from __future__ import annotations

from typing import Final

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.translator.protoutil import pack
from controlplane.translator.proxyless.notes import LeftOut
from controlplane.translator.security.authz import HTTP_RBAC, rules_for
from controlplane.translator.security.base import Inbound, Port

_Perm = rbac_pb2.Permission
_Action = rbac_pb2.RBAC.Action
REFUSED_HEADERS: Final = (":scheme",)
REFUSED_PREFIX: Final = "grpc-"


def grpc_rbac_filters(ctx: Inbound, port: Port, left: LeftOut) -> list[hcm_pb2.HttpFilter]:
    """The service's RBAC filters on ``port`` (DENY, then ALLOW; none without rules)."""
    made = []
    for rules in rules_for(ctx, port):
        deny = rules.action == _Action.DENY
        for name, policy in rules.policies.items():
            kept = [_safe(p, deny, f"rule {name} of {ctx.key}", left)
                    for p in policy.permissions]
            del policy.permissions[:]
            policy.permissions.extend(kept)
        suffix = "deny" if deny else "allow"
        made.append(hcm_pb2.HttpFilter(name=f"{HTTP_RBAC}.{suffix}",
                                       typed_config=pack(http_rbac_pb2.RBAC(rules=rules))))
    return made


def _safe(permission: rbac_pb2.Permission, deny: bool, where: str,
          left: LeftOut) -> rbac_pb2.Permission:
    """``permission`` with every header condition gRPC refuses replaced (see above)."""
    which = permission.WhichOneof("rule")
    if which in ("and_rules", "or_rules"):
        group = getattr(permission, which)
        rules = [_safe(p, deny, where, left) for p in group.rules]
        return _Perm(**{which: _Perm.Set(rules=rules)})
    if which == "not_rule":
        return _Perm(not_rule=_safe(permission.not_rule, not deny, where, left))
    if which == "header" and _refused(permission.header.name):
        left.add(f"header condition {permission.header.name!r} (gRPC servers refuse it; "
                 f"{'denied always' if deny else 'never allowed'})", where)
        return _Perm(any=True) if deny else _Perm(not_rule=_Perm(any=True))
    return permission


def _refused(name: str) -> bool:
    lowered = name.lower()
    return lowered in REFUSED_HEADERS or lowered.startswith(REFUSED_PREFIX)
