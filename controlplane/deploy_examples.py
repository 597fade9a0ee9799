"""The example objects under deploy/kubernetes/examples/ (not applied with the rest):
one of each of our kinds, each using most of its fields, each valid (tests check them
against the CRD's schema and the model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.sources.kubernetes.gateway_examples import EXAMPLES as GATEWAY_EXAMPLES
from controlplane.sources.kubernetes.kinds import (
    GRPC_ROUTES,
    HTTP_ROUTES,
    POLICY_GROUP,
    POLICY_KIND,
    POLICY_VERSION,
    SECURITY_POLICIES,
    SIDECAR_KIND,
    TELEMETRIES,
)


def example_traffic_policy() -> dict[str, Any]:
    """A TrafficPolicy for the ``reviews`` Service that uses most policy fields (not
    ``fault``, nor a split or match to Services that may not exist: an example should
    not break the service it is applied to)."""
    return {
        "apiVersion": f"{POLICY_GROUP}/{POLICY_VERSION}",
        "kind": POLICY_KIND,
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "reviews"},
            "timeout": "2s",
            "connect_timeout": "500ms",
            "idle_timeout": "1h",
            "retries": {"attempts": 3, "per_try_timeout": "500ms",
                        "on": ["5xx", "reset", "connect-failure"]},
            "circuit_breaker": {"max_connections": 100, "max_pending_requests": 10,
                                "max_requests": 100, "max_retries": 10},
            "outlier_detection": {"consecutive_5xx": 5, "interval": "10s",
                                  "base_ejection_time": "30s", "max_ejection_percent": 50},
            "load_balancer": {"policy": "least_request"},
            "rate_limit": {"requests_per_second": 100, "burst": 200},
            "fallback": {"status": 200, "body": "reviews are unavailable",
                         "content_type": "text/plain"},
        },
    }


def example_sidecar() -> dict[str, Any]:
    """A Sidecar for the ``frontend`` sidecars of ``default``: their own namespace and
    ``ratings`` wherever it runs; nothing else of the mesh is sent to them."""
    return {
        "apiVersion": f"{POLICY_GROUP}/{POLICY_VERSION}",
        "kind": SIDECAR_KIND,
        "metadata": {"name": "frontend", "namespace": "default"},
        "spec": {
            "workloadSelector": {"service": "frontend"},
            "egress": [{"hosts": ["./*", "*/ratings"]}],
        },
    }


def example_security_policy() -> dict[str, Any]:
    """A SecurityPolicy for ``ratings``: strict mTLS, and only ``reviews`` may GET it."""
    return {
        "apiVersion": f"{POLICY_GROUP}/{POLICY_VERSION}",
        "kind": SECURITY_POLICIES.kind,
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {
            "target": {"name": "ratings"},
            "mtls": {"mode": "strict"},
            "authorization": [{
                "name": "allow-reviews",
                "action": "allow",
                "from": [{"service_accounts": ["default/reviews"]}],
                "to": [{"methods": ["GET"], "paths": [{"prefix": "/ratings"}]}],
            }],
        },
    }


def example_telemetry() -> dict[str, Any]:
    """A Telemetry for the ``reviews`` Service: its sidecars trace 10% of new requests to
    a collector (their JSON access log is on by default)."""
    return {
        "apiVersion": f"{POLICY_GROUP}/{POLICY_VERSION}",
        "kind": TELEMETRIES.kind,
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "reviews"},
            "accessLog": {"enabled": True},
            "tracing": {"address": "otel-collector.observability:4317", "sampling": 10},
        },
    }


def example_http_route() -> dict[str, Any]:
    """An HTTPRoute canary on the ``reviews`` Service (GAMMA: the Service is the parent):
    requests with ``x-canary: always`` go to ``reviews-v2``, the rest 90/10."""
    return {
        "apiVersion": HTTP_ROUTES.api_version,
        "kind": HTTP_ROUTES.kind,
        "metadata": {"name": "reviews-canary", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "always"}]}],
                 "backendRefs": [{"name": "reviews-v2", "port": 9080}]},
                {"backendRefs": [{"name": "reviews", "port": 9080, "weight": 90},
                                 {"name": "reviews-v2", "port": 9080, "weight": 10}],
                 "timeouts": {"request": "10s", "backendRequest": "2s"}},
            ],
        },
    }


def example_grpc_route() -> dict[str, Any]:
    """A GRPCRoute on the ``ratings`` Service's gRPC port: its ``Get`` method goes to
    ``ratings-v2``, every other call to ``ratings``."""
    return {
        "apiVersion": GRPC_ROUTES.api_version,
        "kind": GRPC_ROUTES.kind,
        "metadata": {"name": "ratings-methods", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "ratings", "port": 9090}],
            "rules": [
                {"matches": [{"method": {"service": "ratings.v1.Ratings", "method": "Get"}}],
                 "backendRefs": [{"name": "ratings-v2", "port": 9090}]},
                {"backendRefs": [{"name": "ratings", "port": 9090}]},
            ],
        },
    }


def _route_header(name: str) -> Callable[[Path], str]:
    def header(directory: Path) -> str:
        return (f"# Needs the Gateway API CRDs (deploy/gateway-api). kubectl apply -f "
                f"{directory}/examples/{name}.yaml;\n# then its status.parents says whether "
                "the control plane accepted it, per parent.\n")
    return header


# deploy/kubernetes/examples/NAME.yaml: (the object, its header) for the Gateway API kinds
GATEWAY_API_EXAMPLES: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[Path], str]]] = {
    "httproute": (example_http_route, _route_header("httproute")),
    "grpcroute": (example_grpc_route, _route_header("grpcroute")),
    **GATEWAY_EXAMPLES,  # the ingress half: GatewayClass, Gateway, its HTTPRoute
}
