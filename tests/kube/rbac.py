"""RBAC for the API server double: the shipped ClusterRole decides what the server may do.

Why: a request the manifests do not allow works against the double but is a 403 in a
real cluster, which a test would never notice. With this, the double authorizes the
control plane's service account with the rules of deploy/kubernetes/*.yaml (read, not
copied), bound cluster-wide as the manifests bind it, or only in the namespaces a test
names (as RoleBindings would). The 403 is the real server's Status, message included.
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

    def allows(self, verb: str, group: str, resource: str) -> bool:
        return ((verb in self.verbs or "*" in self.verbs)
                and (group in self.groups or "*" in self.groups)
                and (resource in self.resources or "*" in self.resources))


def shipped_rules(directory: Path = MANIFESTS, role: str = "controlplane") -> list[Rule]:
    """The rules of the ClusterRole ``role`` in the manifests."""
    rules: list[Rule] = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if (isinstance(doc, Mapping) and doc.get("kind") == "ClusterRole"
                    and doc.get("metadata", {}).get("name") == role):
                rules.extend(Rule(frozenset(r.get("apiGroups") or []),
                                  frozenset(r.get("resources") or []),
                                  frozenset(r.get("verbs") or []))
                             for r in doc.get("rules") or [])
    if not rules:
        raise ValueError(f"no ClusterRole {role!r} with rules in {directory}")
    return rules


class Rbac:
    """The role's rules, bound cluster-wide (``namespaces=None``, a ClusterRoleBinding)
    or only in ``namespaces`` (RoleBindings: nothing at the cluster scope)."""

    def __init__(self, rules: Iterable[Rule] | None = None,
                 namespaces: Iterable[str] | None = None, user: str = SERVICE_ACCOUNT) -> None:
        self.rules = list(rules) if rules is not None else shipped_rules()
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        self.user = user

    def allows(self, verb: str, kind: Kind, namespace: str | None,
               subresource: str | None = None) -> bool:
        if self.namespaces is not None and (namespace is None
                                            or namespace not in self.namespaces):
            return False
        resource = f"{kind.plural}/{subresource}" if subresource else kind.plural
        return any(rule.allows(verb, kind.group, resource) for rule in self.rules)

    def forbidden(self, verb: str, kind: Kind, namespace: str | None, name: str | None,
                  subresource: str | None = None) -> dict[str, Any]:
        """The Status the real server sends (k8s.io/apiserver's forbiddenMessage)."""
        qualified = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
        resource = f"{kind.plural}/{subresource}" if subresource else kind.plural
        scope = (f'in the namespace "{namespace}"' if namespace is not None
                 else "at the cluster scope")
        why = (f'User "{self.user}" cannot {verb} resource "{resource}" in API group '
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
