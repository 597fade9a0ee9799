"""A proxyless gRPC pod, injected and run as the kubelet runs it (tests/test_inject_pods.py):
real processes in test pods (network namespaces), nothing simulated but the kubelet.

``inject_pod`` makes the client pod's spec (``mesh.controlplane.io/proxyless: grpc``, the
mesh CA). Its volumes become directories: the memory-backed emptyDir, and the projected
volume with the pod's ServiceAccount token (minted here by the CA, as TokenReview would
accept it in a cluster) and the CA file the downward API writes from the pod's own
``mesh.controlplane.io/xds-ca`` annotation. Each injected container's command runs as
written (``$(VAR)`` expanded from the downward API, mount paths mapped to those
directories) as the user its securityContext names: ``controlplane bootstrap --grpc``,
``controlplane certs --once``, then the ``controlplane certs`` agent. Then the app, a real
grpcio client with the env injection gave it, calls ``xds:///echo`` over mTLS. echo is a
STRICT service whose pod has an injected Envoy sidecar (capture, SDS) and whose
authorization allows only the client's ServiceAccount; its app answers with the
``x-forwarded-client-cert`` the sidecar verified.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.bootstrap_cmd import write_secret
from controlplane.inject import proxyless
from controlplane.inject.config import PROXY_NAME, InjectConfig
from controlplane.inject.pod import inject_pod
from controlplane.security import tokens
from controlplane.security.castore import load_dir
from controlplane.security.identity import SpiffeId
from tests.support import pods
from tests.support.procs import ControlPlane, free_port, wait_for
from tests.test_inject_pods import APP_PORT, Kubelet, deployment_pod, expand
from tests.test_inject_pods_secure import mount_token
from tests.test_proxyless_mtls_e2e import CLIENT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300),
              pytest.mark.skipif(pods.available() is not None,
                                 reason=f"test pods: {pods.available()}")]

APP_UID = 1000
CLIENT_POD = "ratings-client-7d9f8b6c5-k2j4x"
SPIFFE = "spiffe://cluster.local/ns/shop/sa/"

# A grpcio server on 0.0.0.0:PORT answering each call with the XFCC it received.
ECHO = r'''
import sys
from concurrent import futures
import grpc

class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: str(
            dict(context.invocation_metadata()).get("x-forwarded-client-cert", "")).encode())

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((Handler(),))
server.add_insecure_port(f"0.0.0.0:{sys.argv[1]}")
server.start()
server.wait_for_termination()
'''


@pytest.fixture
def network() -> Iterator[pods.PodNetwork]:
    with pods.PodNetwork() as network:
        yield network


def client_pod() -> dict[str, Any]:
    """A Deployment's pod whose app runs as APP_UID and asks for the gRPC template."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": CLIENT_POD, "namespace": "shop",
                         "labels": {"app": "ratings-client", "pod-template-hash": "7d9f8b6c5"},
                         "annotations": {proxyless.ANNOTATION: "grpc"}},
            "spec": {"serviceAccountName": "client", "containers": [{
                "name": "app", "image": "example/ratings-client:1",
                "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID}}]}}


class ProxylessKubelet:
    """Runs a proxyless-injected pod's containers in a test pod, as the kubelet would."""

    def __init__(self, pod: pods.Pod, spec: dict[str, Any], token: str) -> None:
        self.pod = pod
        self.spec = spec
        metadata = spec["metadata"]
        self.env = {"POD_NAME": metadata["name"], "POD_NAMESPACE": metadata["namespace"]}
        self.volumes = self._volumes(token)
        self.agent_log = pod.network.workdir / f"{pod.name}-agent.log"
        self.agent: subprocess.Popen[bytes] | None = None

    def _volumes(self, token: str) -> dict[str, Path]:
        """Each volume of the spec as a directory of the node, filled as the kubelet does."""
        made = {}
        for volume in self.spec["spec"]["volumes"]:
            directory = self.pod.network.workdir / f"{self.pod.name}-{volume['name']}"
            directory.mkdir()
            if "emptyDir" in volume:
                directory.chmod(0o777)  # an emptyDir is world-writable
            else:
                sources = volume["projected"]["sources"]
                for source in sources:
                    if "serviceAccountToken" in source:
                        path = directory / source["serviceAccountToken"]["path"]
                        write_secret(path, token)
                        path.chmod(0o644)  # the kubelet's default mode for projections
                    else:
                        (item,) = source["downwardAPI"]["items"]
                        key = re.fullmatch(r"metadata\.annotations\['(.+)'\]",
                                           item["fieldRef"]["fieldPath"])
                        assert key is not None
                        path = directory / item["path"]
                        path.write_text(self.spec["metadata"]["annotations"][key.group(1)])
                        path.chmod(0o644)
                directory.chmod(0o755)
            made[volume["name"]] = directory
        return made

    def _mapped(self, container: dict[str, Any], text: str) -> str:
        """``text`` with the container's mount paths as the node's directories."""
        for mount in container.get("volumeMounts", []):
            text = text.replace(mount["mountPath"], str(self.volumes[mount["name"]]))
        return expand(text, self.env)

    def argv(self, container: dict[str, Any]) -> list[str]:
        for item in container.get("env", []):
            assert "value" in item or item["name"] in self.env, f"{item} not simulated"
        words = [self._mapped(container, word)
                 for word in container["command"] + container["args"]]
        assert words[0] == "controlplane"  # the init image's entry point: this checkout
        return [sys.executable, "-m", "controlplane", *words[1:]]

    def uid(self, container: dict[str, Any]) -> int:
        user = container["securityContext"].get("runAsUser")
        assert isinstance(user, int)
        return user

    def start(self) -> None:
        """The init containers in order, the agent (a native sidecar) started; each must
        exit 0 where an init container must."""
        for container in self.spec["spec"]["initContainers"]:
            if container.get("restartPolicy") == "Always":
                with open(self.agent_log, "ab") as log:
                    self.agent = self.pod.run(self.argv(container), uid=self.uid(container),
                                              stdout=log, stderr=subprocess.STDOUT)
                continue
            done = self.pod.call(self.argv(container), timeout=180, uid=self.uid(container))
            assert done.returncode == 0, f"{container['name']}: {done.stderr[-3000:]}"

    def app_call(self, target: str, timeout: float = 30.0) -> dict[str, str]:
        """One call from the app container, as its user, with the env injection gave it
        (set before grpc is imported, as the kubelet's is before the process starts)."""
        (app,) = self.spec["spec"]["containers"]
        env = {item["name"]: self._mapped(app, item["value"]) for item in app["env"]}
        script = f"import os\nos.environ.update({env!r})\n{CLIENT}"
        done = self.pod.call([sys.executable, "-c", script, target, "xds", str(timeout)],
                             timeout=timeout + 60, uid=self.uid(app))
        assert done.returncode == 0, done.stderr[-3000:]
        found: dict[str, str] = json.loads(done.stdout)
        return found


def test_an_injected_grpc_pod_calls_a_strict_service_with_its_own_identity(
        network: pods.PodNetwork, tmp_path: Path) -> None:
    client = network.pod("client")
    echo = network.pod("echo")
    xds = f"{network.gateway}:{free_port()}"
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [{
        "name": "echo", "namespace": "shop", "port": APP_PORT, "protocol": "grpc",
        "service_accounts": ["echo"],
        "endpoints": [{"address": echo.address, "port": APP_PORT, "service_account": "echo"}],
        "security": {"mtls": {"mode": "strict"}, "authorization": [
            {"name": "only-client", "action": "allow",
             "from": [{"principals": [SPIFFE + "client"]}]}]},
    }]}))
    ca_dir = tmp_path / "ca"
    ca = load_dir(ca_dir, "cluster.local", datetime.now(UTC))
    server = ControlPlane(mesh, tmp_path, xds_port=int(xds.rsplit(":", 1)[1]),
                          extra=["--xds-address", xds, "--ca-dir", str(ca_dir)]).start()
    try:
        config = InjectConfig(xds_address=xds, xds_ca=ca.bundle_pem.decode())

        # echo: an Envoy sidecar in front of a grpcio server (tests/test_inject_pods_secure).
        name = "echo-7d9f8b6c5-x2x4z"
        spec = inject_pod(deployment_pod(name, "echo"), "shop", config)
        proxy = next(c for c in spec["spec"]["initContainers"] if c["name"] == PROXY_NAME)
        mount_token(spec, network.workdir / "echo-token", _token(ca, "echo", name),
                    proxy["securityContext"]["runAsUser"])
        Kubelet(echo, spec).start()
        echo.run([sys.executable, "-c", ECHO, str(APP_PORT)])

        # The client: proxyless, no Envoy, no capture.
        injected = inject_pod(client_pod(), "shop", config)
        assert [c["name"] for c in injected["spec"]["initContainers"]] == list(
            proxyless.OUR_CONTAINERS)
        kubelet = ProxylessKubelet(client, injected, _token(ca, "client", CLIENT_POD))
        kubelet.start()
        certs = kubelet.volumes[proxyless.VOLUME] / "certs"
        key = certs / "key.pem"
        # The agent wrote the key as the app's user, readable by it alone.
        assert (os.stat(key).st_uid, os.stat(key).st_mode & 0o777) == (APP_UID, 0o600)

        answer = kubelet.app_call("xds:///echo")
        assert "ok" in answer, answer
        # echo's sidecar verified the client's certificate: the pod's ServiceAccount.
        assert f"URI={SPIFFE}client" in answer["ok"], answer
        assert f"By={SPIFFE}echo" in answer["ok"], answer

        # The server knows the pod by <pod>.<namespace> as a gRPC client of its service
        # (the agent's stream stays open: the app's closed with its process).
        seen = wait_for(lambda: {p["node_id"]: p for p in server.json("/debug/proxies")}.get(
            f"{CLIENT_POD}.shop"), timeout=60, what="the agent's stream in /debug/proxies")
        assert (seen["service"], seen["namespace"]) == ("ratings-client", "shop")
        assert "grpc" in seen["group"], seen
        # Nothing in the client pod captures: no iptables rules were made there.
        rules = client.call(["iptables-save", "-t", "nat"])
        assert rules.returncode == 0, rules.stderr
        assert "15001" not in rules.stdout and "15006" not in rules.stdout

        # The agent keeps running beside the app (a native sidecar), its key unlogged.
        assert kubelet.agent is not None and kubelet.agent.poll() is None
        print(f"agent resident memory: {_rss_kib(kubelet.agent.pid)} KiB")
        key_body = "".join(key.read_text().splitlines()[1:-1])
        assert key_body[:40] not in kubelet.agent_log.read_text()
        assert key_body[:40] not in server.log_path.read_text()
    finally:
        server.stop()


def _token(ca: Any, account: str, pod: str) -> str:
    """What the kubelet projects; the server in file mode takes the CA's own tokens."""
    return tokens.mint(ca, SpiffeId("cluster.local", "shop", account), f"{pod}.shop",
                       datetime.now(UTC), timedelta(hours=1))


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) if found else 0
