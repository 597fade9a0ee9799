"""The server's RBAC in deploy/kubernetes/02-rbac.yaml, from the kinds the source watches
and writes (controlplane.sources.kubernetes.kinds), so the two cannot drift."""

from __future__ import annotations

from typing import Any, Final

from controlplane.sources.kubernetes.deployer import certificate_rules
from controlplane.sources.kubernetes.deployer import rbac_rules as gateway_rules
from controlplane.sources.kubernetes.kinds import (
    CA_SECRET,
    CERTIFICATES_ROLE,
    ENDPOINT_SLICES,
    MUTATING_WEBHOOKS,
    PODS,
    REFERENCE_GRANTS,
    ROUTES,
    SECRETS,
    SECURITY_POLICIES,
    SERVICES,
    SIDECARS,
    TELEMETRIES,
    TOKEN_REVIEWS,
    TRAFFIC_POLICIES,
    WEBHOOK_CONFIGURATION,
    WEBHOOK_SECRET,
    Kind,
)

NAME: Final = "controlplane"
NAMESPACE: Final = "controlplane-system"
LABELS: Final = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "xds-server"}
_WATCH: Final = ["get", "list", "watch"]


def meta(name: str, namespaced: bool = True) -> dict[str, Any]:
    """The metadata of every object the manifests make: our labels, our namespace."""
    found: dict[str, Any] = {"name": name}
    if namespaced:
        found["namespace"] = NAMESPACE
    found["labels"] = dict(LABELS)
    return found


def _own_kind(kind: Kind) -> list[dict[str, Any]]:
    """Watch one of our kinds, and write its status (nothing else of it)."""
    return [{"apiGroups": [kind.group], "resources": [kind.plural], "verbs": _WATCH},
            {"apiGroups": [kind.group], "resources": [f"{kind.plural}/status"],
             "verbs": ["get", "update", "patch"]}]


def cluster_role_rules() -> list[dict[str, Any]]:
    """Least privilege: read what the source watches, write only the status of our own
    kinds (TrafficPolicy, Sidecar, SecurityPolicy, Telemetry), review proxies' tokens."""
    return [
        {"apiGroups": [SERVICES.group], "resources": [SERVICES.plural], "verbs": _WATCH},
        {"apiGroups": [ENDPOINT_SLICES.group], "resources": [ENDPOINT_SLICES.plural],
         "verbs": _WATCH},
        # Read as metadata only (labels, for label subsets); --no-pod-labels needs none.
        {"apiGroups": [PODS.group], "resources": [PODS.plural], "verbs": _WATCH},
        *(rule for kind in (TRAFFIC_POLICIES, SIDECARS, SECURITY_POLICIES, TELEMETRIES)
          for rule in _own_kind(kind)),
        # Gateway API routes: read, and status.parents written for the parents that are ours.
        *(rule for kind in ROUTES for rule in _own_kind(kind)),
        {"apiGroups": [REFERENCE_GRANTS.group], "resources": [REFERENCE_GRANTS.plural],
         "verbs": _WATCH},
        # Gateways of our class: their status, their Envoy's objects, their certificates.
        *gateway_rules(),
        # The injection webhook writes its CA into its own configuration, and no other.
        {"apiGroups": [MUTATING_WEBHOOKS.group], "resources": [MUTATING_WEBHOOKS.plural],
         "resourceNames": [WEBHOOK_CONFIGURATION], "verbs": ["get", "patch"]},
        # Proxy authentication: is a sidecar's projected token valid, for our audience, and
        # for which pod. TokenReview's only verb is create, and it stores nothing.
        {"apiGroups": [TOKEN_REVIEWS.group], "resources": [TOKEN_REVIEWS.plural],
         "verbs": ["create"]},
    ]


def secret_role_rules() -> list[dict[str, Any]]:
    """In the control plane's namespace only: two Secrets, the mesh CA (shared by the
    replicas: the first to start creates it, ``controlplane ca rotate`` replaces it) and
    the webhook's serving certificate. RBAC cannot name an object that does not exist
    yet, so ``create`` is for any Secret of this namespace; reading and replacing are for
    those two."""
    return [
        {"apiGroups": [SECRETS.group], "resources": [SECRETS.plural], "verbs": ["create"]},
        {"apiGroups": [SECRETS.group], "resources": [SECRETS.plural],
         "resourceNames": [CA_SECRET, WEBHOOK_SECRET], "verbs": ["get", "update"]},
    ]


def rbac() -> list[dict[str, Any]]:
    """Cluster-wide, because ``serve`` watches every namespace unless told otherwise."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NAME)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": meta(NAME, namespaced=False), "rules": cluster_role_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": meta(NAME, namespaced=False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": NAME},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]},
        # Gateways' certificates: a ClusterRole without a cluster-wide binding. Each
        # namespace whose Gateways terminate TLS grants it with a RoleBinding (the
        # example gateway-certificates.yaml), so no Secret elsewhere is readable.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": meta(CERTIFICATES_ROLE, namespaced=False), "rules": certificate_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": meta(f"{NAME}-secrets"), "rules": secret_role_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": meta(f"{NAME}-secrets"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": f"{NAME}-secrets"},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]},
    ]
