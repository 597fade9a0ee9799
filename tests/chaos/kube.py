"""The Kubernetes side of the chaos suite: the official client against the API server
double, a real ``controlplane serve --source kubernetes`` and a real Envoy whose view is
read from its admin API (no traffic, so no network namespaces are needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from controlplane.sources.kubernetes.kinds import ACCEPTED, TRAFFIC_POLICIES
from tests.chaos.harness import alive, healthz
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, service
from tests.support.procs import ControlPlane, Envoy, wait_for

FAST = {"CONTROLPLANE_DEBOUNCE_QUIET": "0.1", "CONTROLPLANE_DEBOUNCE_MAX": "2",
        "CONTROLPLANE_WATCH_INACTIVITY": "3"}

# policy name -> (spec, the field its Accepted=False message must name)
BAD_POLICIES: dict[str, tuple[dict[str, Any], str]] = {
    "timeout-huge": ({"timeout": "9999999999999h"}, "timeout"),
    "timeout-over-envoy": ({"timeout": "99999999h"}, "timeout"),
    "max-connections-over-2-32": ({"circuit_breaker": {"max_connections": 99999999999}},
                                  "max_connections"),
    "hash-header-newline": ({"load_balancer": {"policy": "ring_hash",
                                               "hash": {"header": "x-user\nx-evil"}}},
                            "header"),
    "fallback-crlf": ({"fallback": {"status": 503, "body": "down",
                                    "content_type": "text/plain\r\nx-evil: 1"}},
                      "content_type"),
}
# Valid, but once froze the event loop (the token bucket looped over the numerator).
ODD_BUT_VALID: dict[str, dict[str, Any]] = {
    "rate-decimal": {"rate_limit": {"requests_per_second": 12345.677, "burst": 10}},
}


class Kube:
    def __init__(self, tmp: Path) -> None:
        self.api = ApiServerDouble(bookmark_interval=0.5).start()
        self.kubeconfig = self.api.kubeconfig(tmp / "kubeconfig")
        self.tmp = tmp
        self.server: ControlPlane | None = None
        self.envoy: Envoy | None = None

    def service(self, name: str, address: str) -> None:
        self.api.apply(service(name).port(9080, name="http", target="http").build())
        self.api.apply(endpoint_slice(f"{name}-abc", service=name)
                       .endpoint(address).port(8080, name="http").build())

    def condition(self, name: str) -> dict[str, Any] | None:
        obj = self.api.get(TRAFFIC_POLICIES, "default", name)
        for item in (obj.get("status") or {}).get("conditions", []):
            if item["type"] == ACCEPTED:
                return dict(item)
        return None

    def envoy_hosts(self, service_name: str) -> set[str]:
        """Addresses Envoy itself holds for a service's cluster."""
        assert self.envoy is not None
        _, body, _ = self.envoy.admin("/clusters?format=json")
        wanted = f"outbound|9080||{service_name}.default.svc.cluster.local"
        for cluster in json.loads(body).get("cluster_statuses", []):
            if cluster["name"] == wanted:
                return {h["address"]["socket_address"]["address"]
                        for h in cluster.get("host_statuses", [])}
        return set()

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        if self.server is not None:
            self.server.stop()
        self.api.stop()


def api_outage(kube: Kube, outage_seconds: float) -> dict[str, Any]:
    """The API server goes away for a while (the endpoints change meanwhile) and comes
    back: seconds until the sidecar holds the new endpoint, counted from its return."""
    kube.service("reviews", "10.231.7.1")
    # Discovery under chaos, not identity (tests/test_security_kube_e2e.py): unauthenticated.
    kube.server = ControlPlane("kubernetes", kube.tmp, env=FAST,
                               extra=["--kubeconfig", str(kube.kubeconfig),
                                      "--authentication", "none"]).start()
    server = kube.server
    kube.envoy = Envoy(kube.tmp, "frontend-1", "frontend", server.xds_port).start()
    wait_for(lambda: kube.envoy_hosts("reviews") == {"10.231.7.1"}, what="reviews in Envoy")
    kube.api.stop()
    kube.api.apply(endpoint_slice("reviews-abc", service="reviews")
                   .endpoint("10.231.7.2").port(8080, name="http").build())
    ended = time.monotonic() + outage_seconds
    while time.monotonic() < ended:  # the state under test: the API is down this long
        assert alive(server) and healthz(server) == 200
        time.sleep(0.5)
    assert kube.envoy_hosts("reviews") == {"10.231.7.1"}, "the last good state was lost"
    kube.api.start()
    back = time.monotonic()
    wait_for(lambda: kube.envoy_hosts("reviews") == {"10.231.7.2"}, timeout=60,
             interval=0.05, what="the change made during the outage reaching Envoy")
    return {"outage_seconds": outage_seconds,
            "recovery_seconds": round(time.monotonic() - back, 2)}
