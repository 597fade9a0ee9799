"""The shipped Deployment's zero-trust defaults, end to end: ``controlplane serve`` with the
container args of deploy/kubernetes (TLS from the mesh CA in the Secret
``controlplane-ca``, sidecars authenticated by TokenReview) against the API server double
with the shipped RBAC, and real Envoys that present their pod's projected ServiceAccount
token, as an injected pod does. A pod's Service-account annotation reaches a real
sidecar as the identity it verifies (mTLS to that endpoint, its SPIFFE ID as SAN)."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import deploy
from controlplane.sources.kubernetes.kinds import CA_SECRET, SECRETS
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import endpoint_slice, pod, security_policy, service, service_account
from tests.support import netns
from tests.support.files import write_atomic
from tests.support.netns import NetnsHost
from tests.support.procs import ControlPlane, Envoy, stop_all, wait_for
from tests.test_kube_e2e import FAST

pytestmark = pytest.mark.e2e

NAMESPACE = deploy.NAMESPACE
RATINGS = "outbound|9080||ratings.default.svc.cluster.local"


@pytest.fixture(scope="module")
def host() -> Iterator[NetnsHost]:
    reason = netns.available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"test hosts are needed in CI: {reason}")
        pytest.skip(reason)
    made = NetnsHost("reviews-1").start()
    try:
        yield made
    finally:
        made.stop()


def shipped_args() -> list[str]:
    """The Deployment's ``serve`` args, but for the addresses and directory a test picks."""
    (container,) = deploy.deployment()["spec"]["template"]["spec"]["containers"]
    args: list[str] = list(container["args"])
    assert args[:3] == ["serve", "--source", "kubernetes"]
    kept, rest = [], args[3:]
    while rest:
        flag, value = rest[0], rest[1]
        if flag not in ("--xds-address", "--admin-address", "--snapshot-dir"):
            kept += [flag, value]
        rest = rest[2:]
    return kept


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # The shipped RBAC; tokens may live seconds, and expire on the second (no leeway),
        # so that rotation shows within a test.
        self.api = ApiServerDouble(bookmark_interval=0.5, min_token_seconds=1,
                                   token_leeway=0).start()
        self.server: ControlPlane | None = None
        self.envoys: list[Envoy] = []

    def serve(self) -> ControlPlane:
        kubeconfig = self.api.kubeconfig(self.tmp / "kubeconfig")
        self.server = ControlPlane(
            "kubernetes", self.tmp, extra=["--kubeconfig", str(kubeconfig), *shipped_args()],
            env={**FAST, "CONTROLPLANE_WEBHOOK_NAMESPACE": NAMESPACE}).start()
        return self.server

    def bundle(self) -> Path:
        """The trust bundle an injected sidecar gets: the mesh CA's, from its Secret."""
        def secret() -> dict[str, Any] | None:
            try:
                return self.api.get(SECRETS, NAMESPACE, CA_SECRET)
            except StatusError:
                return None

        found = wait_for(secret, what=f"the Secret {NAMESPACE}/{CA_SECRET}")
        path = self.tmp / "bundle.pem"
        path.write_bytes(base64.b64decode(found["data"]["ca.crt"]))
        return path

    def token_path(self, pod_name: str) -> Path:
        return self.tmp / f"{pod_name}.token"

    def project_token(self, pod_name: str, token_of: str | None = None,
                      seconds: int = 3600) -> None:
        """What the kubelet does for a projected token volume: a fresh token of the pod,
        written over the old one at once."""
        write_atomic(self.token_path(pod_name), self.api.pod_token(
            "default", token_of or pod_name, expiration_seconds=seconds))

    def sidecar(self, pod_name: str, token_of: str | None = None,
                seconds: int = 3600, ready_timeout: float = 30.0) -> Envoy:
        """A real Envoy for pod ``pod_name`` of ``default`` (node id ``<pod>.default``),
        presenting the projected token of ``token_of`` (default: its own pod's)."""
        assert self.server is not None
        self.project_token(pod_name, token_of, seconds)
        token = self.token_path(pod_name)
        envoy = Envoy(self.tmp, f"{pod_name}.default", "frontend", self.server.xds_port,
                      extra=["--namespace", "default", "--xds-ca", str(self.bundle()),
                             "--token-file", str(token)], ready_timeout=ready_timeout)
        self.envoys.append(envoy)
        return envoy.start()

    def close(self) -> None:
        stop_all(self.envoys, self.server, [self.api])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    yield made
    made.close()


def config_dump(envoy: Envoy) -> dict[str, Any]:
    status, body, _ = envoy.admin("/config_dump?include_eds")
    assert status == 200
    found: dict[str, Any] = json.loads(body)
    return found


def cluster_named(envoy: Envoy, name: str) -> dict[str, Any] | None:
    for section in config_dump(envoy)["configs"]:
        for entry in section.get("dynamic_active_clusters", []):
            if entry["cluster"]["name"] == name:
                cluster: dict[str, Any] = entry["cluster"]
                return cluster
    return None


def endpoint_metadata(envoy: Envoy, cluster: str) -> list[dict[str, Any]]:
    for section in config_dump(envoy)["configs"]:
        for entry in section.get("dynamic_endpoint_configs", []):
            config = entry.get("endpoint_config", {})
            if config.get("cluster_name") == cluster:
                return [lb.get("metadata", {}) for group in config.get("endpoints", [])
                        for lb in group.get("lb_endpoints", [])]
    return []


def test_the_shipped_deployment_serves_a_sidecar_by_its_pod_token_over_tls(
        world: World, host: NetnsHost) -> None:
    api = world.api
    api.create(service("reviews").port(9080, name="http", target="http").build())
    api.apply(endpoint_slice("reviews-a", service="reviews").endpoint(host.address)
              .port(8080, name="http").build())
    api.create(service_account("frontend"))
    api.create(pod("frontend-1").injected("frontend").build())
    api.create(pod("frontend-2").injected("frontend").build())
    server = world.serve()

    envoy = world.sidecar("frontend-1")
    wait_for(lambda: envoy.request("reviews")[0] == 200, what="reviews through the sidecar")
    assert envoy.request("reviews")[1] == host.name
    [proxy] = [p for p in server.json("/debug/proxies") if p["node_id"] == "frontend-1.default"]
    assert proxy["workload"] == "spiffe://cluster.local/ns/default/sa/frontend"
    assert api.count("create", "tokenreviews") >= 1  # asked the API server, as shipped RBAC allows

    # Another pod's token does not serve this node id: that sidecar never gets config,
    # so it never becomes ready.
    before = refused(server, "permission_denied")
    with pytest.raises(AssertionError, match=re.escape("frontend-2.default ready")):
        world.sidecar("frontend-2", token_of="frontend-1", ready_timeout=8)
    assert refused(server, "permission_denied") > before
    assert all(p["node_id"] != "frontend-2.default" for p in server.json("/debug/proxies"))


def refused(server: ControlPlane, reason: str) -> float:
    status, body, _ = server.get("/metrics")
    assert status == 200
    prefix = f'controlplane_xds_streams_refused_total{{reason="{reason}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(prefix))


def test_a_pods_service_account_is_the_identity_its_callers_verify(
        world: World, host: NetnsHost) -> None:
    """ratings runs in an injected pod as ServiceAccount ``ratings``: a caller's sidecar
    uses mesh mTLS to it and checks its SPIFFE ID; a SecurityPolicy's strict mode is
    in what is served too (the inbound side of ratings, for its own sidecar)."""
    api = world.api
    api.create(service("ratings").port(9080, name="http", target="http").build())
    api.create(service_account("ratings"))
    api.create(pod("ratings-1").injected("ratings").build())
    api.apply(endpoint_slice("ratings-a", service="ratings")
              .endpoint(host.address, pod="ratings-1").port(8080, name="http").build())
    api.create(service_account("frontend"))
    api.create(pod("frontend-1").injected("frontend").build())
    api.create(security_policy("ratings", target="ratings").mtls("strict").build())
    world.serve()
    envoy = world.sidecar("frontend-1")

    def mtls_cluster() -> dict[str, Any] | None:
        found = cluster_named(envoy, RATINGS)
        return found if found and found.get("transport_socket_matches") else None

    cluster = wait_for(mtls_cluster, what="the ratings cluster with mTLS")
    text = json.dumps(cluster["transport_socket_matches"])
    assert "spiffe://cluster.local/ns/default/sa/ratings" in text
    assert [m.get("filter_metadata", {}).get("envoy.transport_socket_match")
            for m in endpoint_metadata(envoy, RATINGS)] == [{"tlsMode": "mtls"}]


def connected(server: ControlPlane, node_id: str) -> bool:
    return any(p["node_id"] == node_id and p.get("workload")
               for p in server.json("/debug/proxies"))


def test_a_sidecar_keeps_working_across_token_rotation(world: World, host: NetnsHost) -> None:
    """Tokens that live 4 s, rotated by a "kubelet" every second: each reconnect (here,
    a server restart) presents the current token and is served; once rotation stops and
    the token expires, the next reconnect is refused as UNAUTHENTICATED."""
    api = world.api
    api.create(service("reviews").port(9080, name="http", target="http").build())
    api.apply(endpoint_slice("reviews-a", service="reviews").endpoint(host.address)
              .port(8080, name="http").build())
    api.create(service_account("frontend"))
    api.create(pod("frontend-1").injected("frontend").build())
    server = world.serve()
    stop = threading.Event()

    def kubelet() -> None:
        while not stop.wait(1.0):
            world.project_token("frontend-1", seconds=4)

    # Rotating from the start: a loaded machine may take longer than a token's life to
    # bring the sidecar up, and its first connection must present a live token.
    world.project_token("frontend-1", seconds=4)
    rotating = threading.Thread(target=kubelet, daemon=True)
    rotating.start()
    try:
        envoy = world.sidecar("frontend-1", seconds=4)
        wait_for(lambda: connected(server, "frontend-1.default"), what="the sidecar served")
        for _ in range(2):  # well past the first token's life, twice
            time.sleep(5)
            server.stop()
            server.start()
            wait_for(lambda: connected(server, "frontend-1.default"), timeout=30,
                     what="the sidecar served again with its rotated token")
            assert envoy.request("reviews")[:2] == (200, host.name)
    finally:
        stop.set()
        rotating.join(5)
    time.sleep(5)  # the last token expires
    server.stop()
    server.start()
    wait_for(lambda: refused(server, "unauthenticated") > 0, timeout=30,
             what="the expired token refused")
    assert not connected(server, "frontend-1.default")
