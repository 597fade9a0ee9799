"""Authorization rules as Envoy RBAC policies, for one inbound port.

Istio's semantics: a rule's sources are ORed, the fields of one source ANDed (each
field's values ORed); the same for its operations. A header list is ANDed (every header
condition must hold). ``ports`` are decided here, per port, so a rule whose operations
all name other ports is left out of that port's filter. On a TCP port an allow rule's
HTTP-only operation never matches, while a deny rule's applies without its HTTP
conditions (the safe side). Without a mesh identity no caller has a principal: a
principal, service account or namespace condition never matches.
"""

from __future__ import annotations

from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import path_pb2, string_pb2

from controlplane.mesh.policy import PathMatch
from controlplane.mesh.security import (
    AuthorizationRule,
    HeaderCondition,
    MeshIdentity,
    Operation,
    Source,
)
from controlplane.translator.security.base import Port

_P = rbac_pb2.Principal
_Perm = rbac_pb2.Permission


def policy(rule: AuthorizationRule, identity: MeshIdentity | None,
           port: Port) -> rbac_pb2.Policy | None:
    """The RBAC policy of ``rule`` on ``port``; None when it cannot apply there."""
    if rule.to is None:
        permissions = [_Perm(any=True)]
    else:
        permissions = [p for op in rule.to
                       if (p := _permission(op, port, rule.action == "deny")) is not None]
        if not permissions:
            return None
    principals = ([_principal(s, identity) for s in rule.from_] if rule.from_ is not None
                  else [_P(any=True)])
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


def _principal(source: Source, identity: MeshIdentity | None) -> rbac_pb2.Principal:
    groups: list[list[string_pb2.StringMatcher]] = []
    if source.principals:
        groups.append([_principal_match(p) for p in source.principals])
    if identity is not None:
        if source.service_accounts:
            groups.append([string_pb2.StringMatcher(exact=identity.spiffe(*a.split("/", 1)))
                           for a in source.service_accounts])
        if source.namespaces:
            groups.append([string_pb2.StringMatcher(
                prefix=f"spiffe://{identity.trust_domain}/ns/{n}/sa/")
                for n in source.namespaces])
    elif source.service_accounts or source.namespaces:
        return _never()
    if identity is None and source.principals:
        return _never()
    if not groups:
        return _P(any=True)
    return _all_of([_any_of([_authenticated(m) for m in group]) for group in groups])


def _principal_match(value: str) -> string_pb2.StringMatcher | None:
    if value == "*":
        return None  # any authenticated peer
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=value[:-1])
    return string_pb2.StringMatcher(exact=value)


def _authenticated(match: string_pb2.StringMatcher | None) -> rbac_pb2.Principal:
    authenticated = _P.Authenticated()
    if match is not None:
        authenticated.principal_name.CopyFrom(match)
    return _P(authenticated=authenticated)


def _never() -> rbac_pb2.Principal:
    return _P(not_id=_P(any=True))


def _any_of(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return ids[0] if len(ids) == 1 else _P(or_ids=_P.Set(ids=ids))


def _all_of(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return ids[0] if len(ids) == 1 else _P(and_ids=_P.Set(ids=ids))


def _permission(op: Operation, port: Port, deny: bool) -> rbac_pb2.Permission | None:
    if op.ports is not None and not port.named(op.ports):
        return None
    if not port.http and op.http_only and not deny:
        return None
    rules: list[rbac_pb2.Permission] = []
    if port.http:
        if op.methods:
            rules.append(_one_of([_header(":method", exact=m) for m in op.methods]))
        if op.paths:
            rules.append(_one_of([_path(p) for p in op.paths]))
        rules += [_header_condition(h) for h in op.headers or []]
    if not rules:
        return _Perm(any=True)
    return rules[0] if len(rules) == 1 else _Perm(and_rules=_Perm.Set(rules=rules))


def _one_of(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rules[0] if len(rules) == 1 else _Perm(or_rules=_Perm.Set(rules=rules))


def _header(name: str, exact: str) -> rbac_pb2.Permission:
    return _Perm(header=route_components_pb2.HeaderMatcher(
        name=name, string_match=string_pb2.StringMatcher(exact=exact)))


def _header_condition(condition: HeaderCondition) -> rbac_pb2.Permission:
    matcher = route_components_pb2.HeaderMatcher(name=condition.name)
    if condition.present:
        matcher.present_match = True
    elif condition.prefix is not None:
        matcher.string_match.prefix = condition.prefix
    else:
        matcher.string_match.exact = condition.exact or ""
    return _Perm(header=matcher)


def _path(path: PathMatch) -> rbac_pb2.Permission:
    """The path without its query string, as Envoy's ``url_path`` reads it."""
    match = (string_pb2.StringMatcher(exact=path.exact) if path.exact is not None
             else string_pb2.StringMatcher(prefix=path.prefix or "/"))
    return _Perm(url_path=path_pb2.PathMatcher(path=match))
