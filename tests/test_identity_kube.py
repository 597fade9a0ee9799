"""From the cluster, no ``--zone`` anywhere: `controlplane serve --source kubernetes`
against the API server double, and a real Envoy connected as an injected sidecar is
(``<pod>.<namespace>``, a service name that is no Service; xDS over TLS to the mesh CA in
its Secret, the pod's projected token as its credential, reviewed by TokenReview). Once
the EndpointSlice lists its pod (targetRef) in zone-b, Envoy holds reviews' zone-b
endpoints at priority 0."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, pod, service, service_account
from tests.support.procs import ControlPlane, Envoy, wait_for
from tests.test_kube_e2e import FAST

pytestmark = pytest.mark.e2e

REVIEWS = "outbound|9080||reviews.shop.svc.cluster.local"
POD = "web-7d4f9-x2x8k"


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    with ApiServerDouble(bookmark_interval=0.5) as double:
        yield double


def envoy_priorities(envoy: Envoy) -> dict[str, int]:
    """address -> priority of reviews' endpoints, as Envoy holds them."""
    status, body, _ = envoy.admin("/config_dump?include_eds")
    assert status == 200, body
    for config in json.loads(body)["configs"]:
        for entry in config.get("dynamic_endpoint_configs", []):
            assignment: dict[str, Any] = entry["endpoint_config"]
            if assignment.get("cluster_name") != REVIEWS:
                continue
            return {lb["endpoint"]["address"]["socket_address"]["address"]:
                    group.get("priority", 0)
                    for group in assignment.get("endpoints", [])
                    for lb in group.get("lb_endpoints", [])}
    return {}


def secure_files(api: ApiServerDouble, tmp_path: Path) -> tuple[Path, Path]:
    """The trust bundle from the server's CA Secret, and the pod's projected token."""
    secret = api.get("secrets", "controlplane-system", "controlplane-ca")
    bundle = tmp_path / "ca.crt"
    bundle.write_bytes(base64.b64decode(secret["data"]["ca.crt"]))
    api.apply(service_account("web", "shop"))
    api.create(pod(POD, "shop").service_account("web").build())
    issued = api.tokens.request("shop", "web", {"spec": {
        "audiences": ["controlplane"], "expirationSeconds": 3600,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": POD}}})
    token = tmp_path / "token"
    token.write_text(issued["status"]["token"])
    return bundle, token


def test_an_endpoint_slice_gives_its_pods_sidecar_zone_preference(
        api: ApiServerDouble, tmp_path: Path) -> None:
    api.create(service("reviews", "shop").port(9080, name="http").build())
    api.create(service("web", "shop").port(8000, name="http").build())
    api.create(endpoint_slice("reviews-abc", service="reviews", namespace="shop")
               .endpoint("10.0.0.1", zone="zone-a", pod="reviews-a")
               .endpoint("10.0.0.2", zone="zone-b", pod="reviews-b")
               .port(8080, name="http").build())
    server = ControlPlane("kubernetes", tmp_path, env=FAST,
                          extra=["--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig"))])
    server.start()
    # As an injected sidecar bootstraps: node id <pod>.<namespace>, its service guessed
    # from the pod's name (here "web-7d4f9", no Service of that name), no zone; TLS to
    # the mesh CA's bundle and the pod's projected token (audience controlplane).
    bundle, token = secure_files(api, tmp_path)
    envoy = Envoy(tmp_path, f"{POD}.shop", "web-7d4f9", server.xds_port,
                  extra=["--namespace", "shop", "--xds-ca", str(bundle),
                         "--token-file", str(token)])
    try:
        envoy.start()
        wait_for(lambda: envoy_priorities(envoy) == {"10.0.0.1": 0, "10.0.0.2": 0},
                 what="reviews without a zone preference", timeout=30)
        # The pod becomes ready: the EndpointSlice controller lists it, with its zone.
        api.create(endpoint_slice("web-abc", service="web", namespace="shop")
                   .endpoint("10.0.1.1", zone="zone-b", node="node-b", pod=POD)
                   .port(8000, name="http").build())
        wait_for(lambda: envoy_priorities(envoy) == {"10.0.0.1": 1, "10.0.0.2": 0},
                 what="reviews' zone-b endpoints preferred", timeout=30)
        [stream] = [s for s in server.json("/debug/proxies") if s["node_id"] == f"{POD}.shop"]
        assert (stream["zone"], stream["service"]) == ("zone-b", "web")
        assert stream["bootstrap"] == {"service": "web-7d4f9", "zone": ""}
        assert stream["workload"] == "spiffe://cluster.local/ns/shop/sa/web"  # its token's
        # The pod leaves the slice: back to no preference, on the same stream.
        api.delete("EndpointSlice", "shop", "web-abc")
        wait_for(lambda: envoy_priorities(envoy) == {"10.0.0.1": 0, "10.0.0.2": 0},
                 what="no preference once the pod is gone", timeout=30)
    finally:
        envoy.stop()
        server.stop()
