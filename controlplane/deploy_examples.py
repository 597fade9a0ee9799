"""The example objects under deploy/kubernetes/examples/ (not applied with the rest):
one of each of our kinds, each using most of its fields, each valid (tests check them
against the CRD's schema and the model)."""

from __future__ import annotations

from typing import Any

from controlplane.sources.kubernetes.kinds import (
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
