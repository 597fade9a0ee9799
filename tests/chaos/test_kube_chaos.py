"""Bad TrafficPolicies against `controlplane serve --source kubernetes` (the official
client and the API server double) with a real Envoy: each bad object gets its own
status naming the field, the process stays up, Envoy rejects nothing, and later changes
to other objects still reach the sidecar. No traffic is sent (the endpoints are test
addresses nobody listens on), so no network namespaces are needed: what Envoy holds is
read from its admin API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.sources.kubernetes.kinds import ACCEPTED, TRAFFIC_POLICIES
from tests.chaos.harness import alive, healthz
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import endpoint_slice, service, traffic_policy
from tests.support.procs import ControlPlane, Envoy, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

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


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    made = Kube(tmp_path)
    yield made
    made.close()


def test_bad_traffic_policies_stay_with_their_object(kube: Kube) -> None:
    kube.service("steady", "10.231.9.1")
    names = [*BAD_POLICIES, *ODD_BUT_VALID]
    for i, name in enumerate(names):
        kube.service(f"svc-{name}", f"10.231.8.{i + 1}")
    kube.server = ControlPlane("kubernetes", kube.tmp, env=FAST,
                               extra=["--kubeconfig", str(kube.kubeconfig)]).start()
    server = kube.server
    kube.envoy = Envoy(kube.tmp, "frontend-1", "frontend", server.xds_port).start()
    wait_for(lambda: kube.envoy_hosts("steady") == {"10.231.9.1"}, what="steady in Envoy")

    refused_by_schema = []
    for name, (spec, _) in BAD_POLICIES.items():
        try:
            kube.api.create(traffic_policy(name, f"svc-{name}", spec).build())
        except StatusError:
            refused_by_schema.append(name)  # the API server's own validation: fine too
    for name, spec in ODD_BUT_VALID.items():
        kube.api.create(traffic_policy(name, f"svc-{name}", spec).build())

    for name, (_, field) in BAD_POLICIES.items():
        if name in refused_by_schema:
            continue
        verdict = wait_for(lambda n=name: kube.condition(n), timeout=30,
                           what=f"a status on {name}")
        assert verdict["status"] == "False", (name, verdict)
        assert field in verdict["message"], (name, verdict)
    for name in ODD_BUT_VALID:
        verdict = wait_for(lambda n=name: kube.condition(n), timeout=30,
                           what=f"a status on {name}")
        assert verdict["status"] == "True", (name, verdict)

    # The process is up and ready, Envoy took every update, and a later change to
    # another object still reaches it.
    assert alive(server) and healthz(server) == 200 and server.get("/readyz")[0] == 200
    kube.api.apply(endpoint_slice("steady-abc", service="steady")
                   .endpoint("10.231.9.2").port(8080, name="http").build())
    wait_for(lambda: kube.envoy_hosts("steady") == {"10.231.9.2"}, timeout=30,
             what="a later endpoint change reaching Envoy")
    _, body, _ = kube.envoy.admin("/stats?filter=update_rejected$")
    rejected = dict(line.split(": ") for line in body.splitlines() if ": " in line)
    assert "cluster_manager.cds.update_rejected" in rejected, rejected
    assert any(".rds." in key for key in rejected), rejected
    assert set(rejected.values()) == {"0"}, rejected
    (proxy,) = [p for p in server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    assert all(t["last_nack"] is None for t in proxy["types"].values()), proxy

    # Deleted and created again, a policy gets its status written again.
    name = next(n for n in BAD_POLICIES if n not in refused_by_schema)
    spec, field = BAD_POLICIES[name]
    kube.api.delete(TRAFFIC_POLICIES, "default", name)
    kube.api.create(traffic_policy(name, f"svc-{name}", spec).build())
    verdict = wait_for(lambda: kube.condition(name), timeout=30,
                       what=f"a status on {name} after it was created again")
    assert verdict["status"] == "False" and field in verdict["message"], verdict
