"""An injected sidecar pod calls an injected proxyless gRPC *server* pod: test pods
(network namespaces), nothing simulated but the kubelet (tests/test_inject_pods*.py).

echo's pod carries ``mesh.controlplane.io/proxyless: grpc``: injection gives it the gRPC
bootstrap with ``--grpc-server``, its first certificate and the agent
(tests/test_inject_proxyless_pods.ProxylessKubelet runs them as written). Its app is the
real grpcio ``grpc.server(xds=True)`` of tests/test_proxyless_server_e2e.py on
0.0.0.0:9080, with the env injection gave it. web's pod has an injected Envoy sidecar
with capture; its app dials ``echo:9080`` in plaintext, and the sidecar makes it mTLS
(offering h2) to the proxyless endpoint of the STRICT service echo, whose rule allows
web only. The server answers with the identity its gRPC verified.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject import proxyless
from controlplane.inject.config import PROXY_NAME, InjectConfig
from controlplane.inject.pod import inject_pod
from controlplane.security import tokens
from controlplane.security.castore import load_dir
from controlplane.security.identity import SpiffeId
from tests.support import pods
from tests.support.procs import ControlPlane, end, free_port, wait_for
from tests.test_inject_pods import APP_PORT, Kubelet, deployment_pod
from tests.test_inject_pods_secure import mount_token
from tests.test_inject_proxyless_pods import APP_UID, ProxylessKubelet
from tests.test_proxyless_mtls_e2e import CLIENT
from tests.test_proxyless_server_e2e import SERVER

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300),
              pytest.mark.skipif(pods.available() is not None,
                                 reason=f"test pods: {pods.available()}")]

ECHO_IP = "10.96.0.20"
ECHO_POD = "echo-6c9d8f7b5-m4n8p"
WEB_POD = "web-7d9f8b6c5-q8w7e"
SPIFFE = "spiffe://cluster.local/ns/shop/sa/"


@pytest.fixture
def network() -> Iterator[pods.PodNetwork]:
    with pods.PodNetwork() as network:
        yield network


def echo_pod() -> dict[str, Any]:
    """A Deployment's pod whose app serves gRPC over xDS, as APP_UID."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": ECHO_POD, "namespace": "shop",
                         "labels": {"app": "echo", "pod-template-hash": "6c9d8f7b5"},
                         "annotations": {proxyless.ANNOTATION: "grpc"}},
            "spec": {"serviceAccountName": "echo", "containers": [{
                "name": "app", "image": "example/echo:1",
                "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID}}]}}


def mesh_data(echo: pods.Pod, web: pods.Pod) -> dict[str, Any]:
    return {"services": [
        {"name": "echo", "namespace": "shop", "port": APP_PORT, "protocol": "grpc",
         "cluster_ips": [ECHO_IP],
         "endpoints": [{"address": echo.address, "port": APP_PORT, "service_account": "echo",
                        "proxyless": True}],
         "security": {"mtls": {"mode": "strict"}, "authorization": [
             {"name": "only-web", "action": "allow",
              "from": [{"principals": [SPIFFE + "web"]}]}]}},
        {"name": "web", "namespace": "shop", "port": APP_PORT, "cluster_ips": ["10.96.0.21"],
         "service_accounts": ["web"],
         "endpoints": [{"address": web.address, "port": APP_PORT}]},
    ]}


def test_an_injected_sidecar_calls_an_injected_proxyless_server_over_mtls(
        network: pods.PodNetwork, tmp_path: Path) -> None:
    echo = network.pod("echo")
    web = network.pod("web", hosts={"echo": ECHO_IP})
    xds = f"{network.gateway}:{free_port()}"
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump(mesh_data(echo, web)))
    ca_dir = tmp_path / "ca"
    ca = load_dir(ca_dir, "cluster.local", datetime.now(UTC))
    server = ControlPlane(mesh, tmp_path, xds_port=int(xds.rsplit(":", 1)[1]),
                          extra=["--xds-address", xds, "--ca-dir", str(ca_dir)]).start()
    app: subprocess.Popen[bytes] | None = None
    kubelet: ProxylessKubelet | None = None
    try:
        config = InjectConfig(xds_address=xds, xds_ca=ca.bundle_pem.decode())

        # echo: proxyless; its bootstrap is a server's too, and it carries its identity.
        injected = inject_pod(echo_pod(), "shop", config)
        assert "--grpc-server" in injected["spec"]["initContainers"][0]["args"]
        assert injected["metadata"]["annotations"][
            "mesh.controlplane.io/service-account"] == "echo"
        kubelet = ProxylessKubelet(echo, injected, _token(ca, "echo", ECHO_POD))
        kubelet.start()
        (container,) = injected["spec"]["containers"]
        env = {item["name"]: kubelet._mapped(container, item["value"])
               for item in container["env"]}
        log = tmp_path / "echo-app.log"
        with open(log, "wb") as out:
            app = echo.run([sys.executable, "-c",
                            f"import os\nos.environ.update({env!r})\n{SERVER}",
                            f"0.0.0.0:{APP_PORT}"], uid=APP_UID, stdout=out,
                           stderr=subprocess.STDOUT)

        # web: an Envoy sidecar with capture.
        spec = inject_pod(deployment_pod(WEB_POD, "web"), "shop", config)
        proxy = next(c for c in spec["spec"]["initContainers"] if c["name"] == PROXY_NAME)
        mount_token(spec, network.workdir / "web-token", _token(ca, "web", WEB_POD),
                    proxy["securityContext"]["runAsUser"])
        Kubelet(web, spec).start()

        # web's app calls echo:9080 in plaintext; its sidecar brings mTLS and web's
        # identity, which the proxyless server's gRPC verified.
        answer = wait_for(lambda: _ok(web), timeout=90, what="web -> echo (proxyless)")
        found = json.loads(answer["ok"])
        assert found.get("transport_security_type") == ["tls"], found
        assert found.get("peer_spiffe_id") == [SPIFFE + "web"], found
        key = kubelet.volumes[proxyless.VOLUME] / "certs" / "key.pem"
        key_body = "".join(key.read_text().splitlines()[1:-1])
        assert key_body[:40] not in server.log_path.read_text()
        assert key_body[:40] not in log.read_text()
    finally:
        end(app)
        end(kubelet.agent if kubelet is not None else None)
        server.stop()


def _ok(web: pods.Pod) -> dict[str, str] | None:
    done = web.call([sys.executable, "-c", CLIENT, f"echo:{APP_PORT}", "plain", "5"],
                    timeout=60)
    if done.returncode != 0:
        return None
    found: dict[str, str] = json.loads(done.stdout)
    return found if "ok" in found else None


def _token(ca: Any, account: str, pod: str) -> str:
    return tokens.mint(ca, SpiffeId("cluster.local", "shop", account), f"{pod}.shop",
                       datetime.now(UTC), timedelta(hours=1))
