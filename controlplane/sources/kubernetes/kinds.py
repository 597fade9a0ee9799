"""The Kubernetes resources the source watches: API groups, versions, plurals.

Shared by the source, the manifests in deploy/kubernetes (RBAC, the CRD) and the API
server double in the tests, so the three cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

POLICY_GROUP: Final = "mesh.controlplane.io"
POLICY_VERSION: Final = "v1alpha1"
POLICY_KIND: Final = "TrafficPolicy"
POLICY_PLURAL: Final = "trafficpolicies"
POLICY_SINGULAR: Final = "trafficpolicy"
POLICY_SHORT_NAMES: Final = ("tp",)
SIDECAR_KIND: Final = "Sidecar"  # same group and version as TrafficPolicy
SIDECAR_PLURAL: Final = "sidecars"
SIDECAR_SINGULAR: Final = "sidecar"
SECURITY_POLICY_KIND: Final = "SecurityPolicy"  # same group and version as TrafficPolicy
SECURITY_POLICY_PLURAL: Final = "securitypolicies"
SECURITY_POLICY_SINGULAR: Final = "securitypolicy"
SECURITY_POLICY_SHORT_NAMES: Final = ("secpol",)
TELEMETRY_KIND: Final = "Telemetry"  # same group and version as TrafficPolicy
TELEMETRY_PLURAL: Final = "telemetries"
TELEMETRY_SINGULAR: Final = "telemetry"
# A SecurityPolicy (or Telemetry) without a target in this namespace (the control plane's
# own) applies to the whole mesh (Istio's root namespace); elsewhere, to its namespace.
ROOT_NAMESPACE: Final = "controlplane-system"
# The ClusterRole that lets the server read Secrets (Gateways' certificates): shipped
# unbound, granted by a RoleBinding in each namespace whose Gateways terminate TLS.
CERTIFICATES_ROLE: Final = "controlplane-gateway-certificates"
# On a Service: where it is visible (the mesh file's exportTo), a comma list of "*", "."
# (its own namespace) or namespace names.
EXPORT_TO_ANNOTATION: Final = f"{POLICY_GROUP}/export-to"
ACCEPTED: Final = "Accepted"  # the status condition type set on every TrafficPolicy
RESOLVED_REFS: Final = "ResolvedRefs"  # on accepted ones: does every subset select endpoints
# (TrafficPolicy), does every host pattern match a Service (Sidecar), does the target
# Service exist (SecurityPolicy)


@dataclass(frozen=True)
class Kind:
    """One watched resource: where it lives in the API."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True  # False: cluster-scoped (no namespace in its paths or keys)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None) -> str:
        """The collection's URL path, cluster-wide or in one namespace."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is None or not self.namespaced:
            return f"{root}/{self.plural}"
        return f"{root}/namespaces/{namespace}/{self.plural}"


SERVICES: Final = Kind("", "v1", "services", "Service")
ENDPOINT_SLICES: Final = Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
TRAFFIC_POLICIES: Final = Kind(POLICY_GROUP, POLICY_VERSION, POLICY_PLURAL, POLICY_KIND)
SIDECARS: Final = Kind(POLICY_GROUP, POLICY_VERSION, SIDECAR_PLURAL, SIDECAR_KIND)
SECURITY_POLICIES: Final = Kind(POLICY_GROUP, POLICY_VERSION, SECURITY_POLICY_PLURAL,
                                SECURITY_POLICY_KIND)
TELEMETRIES: Final = Kind(POLICY_GROUP, POLICY_VERSION, TELEMETRY_PLURAL, TELEMETRY_KIND)
# Pods are watched as metadata only (PartialObjectMetadata): their labels are what label
# subsets select, and nothing else of a Pod matters to routing.
PODS: Final = Kind("", "v1", "pods", "Pod")
# The Gateway API (upstream CRDs, deploy/gateway-api): optional kinds, so a cluster
# without them is served as before. Its own group; routes at v1, ReferenceGrant v1beta1.
GATEWAY_API_GROUP: Final = "gateway.networking.k8s.io"
GATEWAY_API_RELEASE: Final = "v1.4.1"  # the upstream release deploy/gateway-api pins
HTTP_ROUTES: Final = Kind(GATEWAY_API_GROUP, "v1", "httproutes", "HTTPRoute")
GRPC_ROUTES: Final = Kind(GATEWAY_API_GROUP, "v1", "grpcroutes", "GRPCRoute")
REFERENCE_GRANTS: Final = Kind(GATEWAY_API_GROUP, "v1beta1", "referencegrants",
                               "ReferenceGrant")
ROUTES: Final = (HTTP_ROUTES, GRPC_ROUTES)  # status written by us (status.parents)
# Ingress through the Gateway API (issue 13): GatewayClasses naming our controller, their
# Gateways (each gets a Deployment, Service and ServiceAccount of its own, owned by it:
# sources/kubernetes/deployer.py) and TLSRoutes. Optional like the routes.
GATEWAY_GROUP: Final = GATEWAY_API_GROUP
GATEWAY_CONTROLLER: Final = "mesh.controlplane.io/gateway-controller"  # DESIGN.md section 5
GATEWAY_CLASSES: Final = Kind(GATEWAY_GROUP, "v1", "gatewayclasses", "GatewayClass",
                              namespaced=False)
GATEWAYS: Final = Kind(GATEWAY_GROUP, "v1", "gateways", "Gateway")
TLS_ROUTES: Final = Kind(GATEWAY_GROUP, "v1alpha2", "tlsroutes", "TLSRoute")
TCP_ROUTES: Final = Kind(GATEWAY_GROUP, "v1alpha2", "tcproutes", "TCPRoute")
INGRESS: Final = (GATEWAY_CLASSES, GATEWAYS, TLS_ROUTES, TCP_ROUTES)  # status written by us
DEPLOYMENTS: Final = Kind("apps", "v1", "deployments", "Deployment")  # written, not watched
# On what the deployer creates: the Gateway it serves (also the pods' selector).
GATEWAY_LABEL: Final = f"{GATEWAY_GROUP}/gateway-name"
# On a Gateway: the type of its Service (LoadBalancer, the default, ClusterIP, NodePort).
SERVICE_TYPE_ANNOTATION: Final = f"{POLICY_GROUP}/service-type"
GATEWAY_API: Final = (HTTP_ROUTES, GRPC_ROUTES, REFERENCE_GRANTS, *INGRESS)  # optional
WATCHED: Final = (SERVICES, ENDPOINT_SLICES, TRAFFIC_POLICIES, SIDECARS, SECURITY_POLICIES,
                  PODS, TELEMETRIES, *GATEWAY_API)
# ours: a CRD each, status written by us
CUSTOM: Final = (TRAFFIC_POLICIES, SIDECARS, SECURITY_POLICIES, TELEMETRIES)
# Written, never watched, by the injection webhook: its serving certificate (a Secret in
# the control plane's namespace) and the caBundle of its MutatingWebhookConfiguration.
SECRETS: Final = Kind("", "v1", "secrets", "Secret")
MUTATING_WEBHOOKS: Final = Kind("admissionregistration.k8s.io", "v1",
                                "mutatingwebhookconfigurations",
                                "MutatingWebhookConfiguration", namespaced=False)
WEBHOOK_CONFIGURATION: Final = "controlplane-injector"  # its name (deploy/kubernetes)
WEBHOOK_SECRET: Final = "controlplane-webhook-tls"  # its Secret's name
# The mesh CA, shared by replicas: a Secret of the control plane's namespace in
# cert-manager's format (tls.crt, tls.key, ca.crt).
CA_SECRET: Final = "controlplane-ca"
# Proxy authentication: the server asks the API server whether a sidecar's projected
# ServiceAccount token is valid (never mints one: no serviceaccounts/token).
TOKEN_REVIEWS: Final = Kind("authentication.k8s.io", "v1", "tokenreviews", "TokenReview",
                            namespaced=False)
# What tokens are requested for (POST .../serviceaccounts/NAME/token): the kubelet does it
# for projected volumes; the API server double serves it for tests.
SERVICE_ACCOUNTS: Final = Kind("", "v1", "serviceaccounts", "ServiceAccount")
TOKEN_SUBRESOURCE: Final = "token"
# Written by injection on every injected pod: the pod's spec.serviceAccountName (pods are
# watched as metadata only, so this is how the source learns a workload's identity, and
# that it has a sidecar).
SERVICE_ACCOUNT_ANNOTATION: Final = f"{POLICY_GROUP}/service-account"
# Written by proxyless injection (value ``grpc``): the pod has no sidecar, its app is a
# proxyless gRPC server (``grpc.server(xds=True)``), so callers use mesh mTLS to it only
# under STRICT (mesh/security.takes_mtls).
PROXYLESS_LABEL: Final = f"{POLICY_GROUP}/proxyless"
PROXYLESS_KIND: Final = "grpc"

# The Accept headers of client-go's metadata client, JSON only: the server sends
# PartialObjectMetadata(List), or whole objects if it cannot (the plain fallback).
METADATA_LIST_ACCEPT: Final = (
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json")
METADATA_WATCH_ACCEPT: Final = (
    "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json")

# The label that ties an EndpointSlice to its Service (set by the EndpointSlice controller).
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
