"""RBAC for the API server double: the shipped ClusterRole decides what the server may do.

Why: a request the manifests do not allow works against the double but is a 403 in a
real cluster, which a test would never notice. With this, the double authorizes the
control plane's service account with the rules of deploy/kubernetes/*.yaml (read, not
copied), bound cluster-wide as the manifests bind it, or only in the namespaces a test
names (as RoleBindings would), plus the manifests' Roles bound to it (the webhook's Secret
in the control plane's own namespace). ``resourceNames`` restrict a rule to those objects,
as in the real authorizer: such a rule never allows list, watch or create. The 403 is the
real server's Status, message included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from controlplane.sources.kubernetes.kinds import Kind

MANIFESTS: Final = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
SERVICE_ACCOUNT: Final = "system:serviceaccount:controlplane-system:controlplane"


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str] = frozenset()  # resourceNames: empty is every object

    def allows(self, verb: str, group: str, resource: str, name: str | None = None) -> bool:
        return ((verb in self.verbs or "*" in self.verbs)
                and (group in self.groups or "*" in self.groups)
                and (resource in self.resources or "*" in self.resources)
                and (not self.names or name in self.names))


def _rule(raw: Mapping[str, Any]) -> Rule:
    return Rule(frozenset(raw.get("apiGroups") or []), frozenset(raw.get("resources") or []),
                frozenset(raw.get("verbs") or []), frozenset(raw.get("resourceNames") or []))


def _documents(directory: Path) -> list[Mapping[str, Any]]:
    return [doc for path in sorted(directory.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, Mapping)]


def shipped_roles(directory: Path = MANIFESTS,
                  account: str = SERVICE_ACCOUNT) -> dict[str, list[Rule]]:
    """Per namespace, the rules of the manifests' Roles that a RoleBinding there grants
    to ``account`` (``system:serviceaccount:NS:NAME``)."""
    docs = _documents(directory)
    roles = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs
             if d.get("kind") == "Role"}
    # A RoleBinding may grant a ClusterRole's rules in its own namespace only.
    cluster_roles = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ClusterRole"}
    _, _, namespace_name = account.partition("system:serviceaccount:")
    found: dict[str, list[Rule]] = {}
    for binding in (d for d in docs if d.get("kind") == "RoleBinding"):
        namespace = binding["metadata"].get("namespace")
        subjects = {f"{s.get('namespace')}:{s.get('name')}"
                    for s in binding.get("subjects") or [] if s.get("kind") == "ServiceAccount"}
        ref = binding.get("roleRef", {})
        role = (cluster_roles.get(ref.get("name")) if ref.get("kind") == "ClusterRole"
                else roles.get((namespace, ref.get("name"))))
        if role is not None and namespace_name in subjects:
            found.setdefault(namespace, []).extend(_rule(r) for r in role.get("rules") or [])
    return found


def granted_certificates(*namespaces: str) -> dict[str, list[Rule]]:
    """The shipped Roles, plus the Secrets-reading ClusterRole granted in ``namespaces``
    as the example RoleBinding (examples/gateway-certificates.yaml) grants it there."""
    roles = shipped_roles()
    binding = yaml.safe_load((MANIFESTS / "examples" / "gateway-certificates.yaml").read_text())
    [role] = [d for d in _documents(MANIFESTS) if d.get("kind") == "ClusterRole"
              and d["metadata"]["name"] == binding["roleRef"]["name"]]
    for namespace in namespaces:
        roles.setdefault(namespace, []).extend(_rule(r) for r in role.get("rules") or [])
    return roles


def shipped_rules(directory: Path = MANIFESTS, role: str = "controlplane",
                  account: str = SERVICE_ACCOUNT) -> list[Rule]:
    """The rules of the ClusterRole ``role`` in the manifests, and of every other
    ClusterRole a ClusterRoleBinding there grants to ``account`` (the gateways'
    certificates)."""
    docs = _documents(directory)
    _, _, namespace_name = account.partition("system:serviceaccount:")
    bound = {role} | {
        binding.get("roleRef", {}).get("name") for binding in docs
        if binding.get("kind") == "ClusterRoleBinding"
        and namespace_name in {f"{s.get('namespace')}:{s.get('name')}"
                               for s in binding.get("subjects") or []
                               if s.get("kind") == "ServiceAccount"}}
    rules: list[Rule] = []
    for doc in docs:
        if doc.get("kind") == "ClusterRole" and doc.get("metadata", {}).get("name") in bound:
            rules.extend(_rule(r) for r in doc.get("rules") or [])
    if not rules:
        raise ValueError(f"no ClusterRole {role!r} with rules in {directory}")
    return rules


class Rbac:
    """The role's rules, bound cluster-wide (``namespaces=None``, a ClusterRoleBinding)
    or only in ``namespaces`` (RoleBindings: nothing at the cluster scope)."""

    def __init__(self, rules: Iterable[Rule] | None = None,
                 namespaces: Iterable[str] | None = None, user: str = SERVICE_ACCOUNT,
                 roles: Mapping[str, Iterable[Rule]] | None = None) -> None:
        """``roles``: per namespace, rules granted there only (default: the shipped
        Roles when the shipped ClusterRole is used, else none)."""
        self.rules = list(rules) if rules is not None else shipped_rules()
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        self.user = user
        if roles is None:
            roles = shipped_roles() if rules is None else {}
        self.roles = {ns: list(found) for ns, found in roles.items()}

    def allows(self, verb: str, kind: Kind, namespace: str | None,
               subresource: str | None = None, name: str | None = None) -> bool:
        resource = f"{kind.plural}/{subresource}" if subresource else kind.plural
        if namespace is not None and any(rule.allows(verb, kind.group, resource, name)
                                         for rule in self.roles.get(namespace, [])):
            return True
        if self.namespaces is not None and (namespace is None
                                            or namespace not in self.namespaces):
            return False
        return any(rule.allows(verb, kind.group, resource, name) for rule in self.rules)

    def forbidden(self, verb: str, kind: Kind, namespace: str | None, name: str | None,
                  subresource: str | None = None, user: str | None = None) -> dict[str, Any]:
        """The Status the real server sends (k8s.io/apiserver's forbiddenMessage) to
        ``user`` (default: the control plane's account)."""
        qualified = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
        resource = f"{kind.plural}/{subresource}" if subresource else kind.plural
        scope = (f'in the namespace "{namespace}"' if namespace is not None
                 else "at the cluster scope")
        why = (f'User "{user or self.user}" cannot {verb} resource "{resource}" in API group '
               f'"{kind.group}" {scope}')
        subject = f'{qualified} "{name}"' if name else qualified
        details: dict[str, Any] = {}
        if name:
            details["name"] = name
        if kind.group:
            details["group"] = kind.group
        details["kind"] = kind.plural
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"{subject} is forbidden: {why}", "reason": "Forbidden",
                "details": details, "code": 403}
