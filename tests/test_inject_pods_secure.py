"""Injected pods with identity, run as the kubelet runs them (tests/test_inject_pods.py):
the mesh CA's bundle in the injected bootstrap, the pod's token in its projected volume,
and the sidecars reach xDS over TLS, get their own certificates and call each other over
mTLS by a Service's name.

The server runs in file mode (``serve --ca-dir``), so the "kubelet" here writes a token
the CA minted for the pod's ServiceAccount into the volume's directory (in a cluster: the
projected ServiceAccount token, checked by TokenReview; tests/test_security_protocol_kube.py).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.bootstrap_cmd import write_secret
from controlplane.inject.config import PROXY_NAME, TOKEN_DIR, InjectConfig
from controlplane.inject.pod import inject_pod
from controlplane.security import tokens
from controlplane.security.castore import load_dir
from controlplane.security.identity import SpiffeId
from tests.support import pods
from tests.support.procs import ControlPlane, free_port, wait_for
from tests.test_inject_pods import APP_PORT, NAMED_HTTP, REVIEWS_IP, Kubelet, deployment_pod

pytestmark = pytest.mark.skipif(pods.available() is not None,
                                reason=f"test pods: {pods.available()}")


@pytest.fixture
def network() -> Iterator[pods.PodNetwork]:
    with pods.PodNetwork() as network:
        yield network


def mount_token(spec: dict[str, Any], directory: Path, token: str, uid: int) -> None:
    """What the kubelet does for the projected volume: the token in a directory of the
    node, mounted at TOKEN_DIR in the proxy (here: the path rewritten to it)."""
    directory.mkdir(mode=0o755)
    write_secret(directory / "token", token)
    os.chown(directory / "token", uid, uid)
    proxy = next(c for c in spec["spec"]["initContainers"] if c["name"] == PROXY_NAME)
    (mount,) = proxy["volumeMounts"]
    assert mount["mountPath"] == TOKEN_DIR
    proxy["args"] = [arg.replace(TOKEN_DIR, str(directory)) for arg in proxy["args"]]


def test_injected_pods_reach_xds_over_tls_and_call_each_other_over_mtls(
        network: pods.PodNetwork, tmp_path: Path) -> None:
    frontend = network.pod("frontend", hosts={"reviews": REVIEWS_IP})
    reviews = network.pod("reviews")
    xds_port = free_port()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [
        {"name": "reviews", "namespace": "shop", "port": APP_PORT,
         "cluster_ips": [REVIEWS_IP], "service_accounts": ["reviews"],
         "endpoints": [{"address": reviews.address, "port": APP_PORT}]},
        {"name": "frontend", "namespace": "shop", "port": APP_PORT,
         "cluster_ips": ["10.96.0.11"], "service_accounts": ["frontend"],
         "endpoints": [{"address": frontend.address, "port": APP_PORT}]},
    ]}))
    ca_dir = tmp_path / "ca"
    ca = load_dir(ca_dir, "cluster.local", datetime.now(UTC))
    server = ControlPlane(mesh, tmp_path, xds_port=xds_port,
                          extra=["--xds-address", f"{network.gateway}:{xds_port}",
                                 "--ca-dir", str(ca_dir)]).start()
    try:
        config = InjectConfig(xds_address=f"{network.gateway}:{xds_port}",
                              xds_ca=ca.bundle_pem.decode())
        for pod, name in ((reviews, "reviews-7d9f8b6c5-x2x4z"),
                          (frontend, "frontend-7d9f8b6c5-q8w7e")):
            spec = inject_pod(deployment_pod(name, pod.name), "shop", config)
            assert spec["spec"]["volumes"][-1]["name"] == "controlplane-token"
            account = spec["metadata"]["annotations"]["mesh.controlplane.io/service-account"]
            token = tokens.mint(ca, SpiffeId("cluster.local", "shop", account),
                                f"{name}.shop", datetime.now(UTC), timedelta(hours=1))
            proxy = next(c for c in spec["spec"]["initContainers"] if c["name"] == PROXY_NAME)
            mount_token(spec, network.workdir / f"{pod.name}-token", token,
                        proxy["securityContext"]["runAsUser"])
            Kubelet(pod, spec).start()  # its startup probe: Envoy has its config
            pod.run([sys.executable, NAMED_HTTP, "0.0.0.0", str(APP_PORT), pod.name])

        # Each sidecar holds its own workload certificate, from the server over SDS.
        for pod, account in ((reviews, "reviews"), (frontend, "frontend")):
            uri = f"spiffe://cluster.local/ns/shop/sa/{account}"
            wait_for(_holds(pod, uri), timeout=30, what=f"{pod.name}'s certificate {uri}")

        # The app in frontend calls http://reviews:9080/ in plaintext; its sidecar makes
        # it mTLS to the reviews sidecar, which verified frontend's certificate.
        wait_for(lambda: frontend.http_get(f"http://reviews:{APP_PORT}/") == (200, "reviews"),
                 timeout=30, what="frontend -> reviews by Service name")
        handshakes = _admin(reviews, "/stats?filter=ssl.handshake$")
        assert re.search(r"15006\.ssl\.handshake: [1-9]", handshakes), handshakes
    finally:
        server.stop()


def _holds(pod: pods.Pod, uri: str) -> Callable[[], bool]:
    return lambda: uri in _admin(pod, "/certs")


def _admin(pod: pods.Pod, path: str) -> str:
    """The sidecar's admin (127.0.0.1:15000 inside the pod)."""
    status, body = pod.http_get(f"http://127.0.0.1:15000{path}", timeout=3)
    return body if status == 200 else ""
