"""The pieces of envoy_memory.py's ``captured`` mode: the generated mesh given a cluster IP
per service, HTTP backends on a pod network's gateway, and a captured sidecar (``controlplane
bootstrap --capture`` in a pod after ``controlplane capture``) seen through the same admin
and call surface as tests' ``Envoy``, so the memory figures are taken the same way.

The pods come from tests/support/pods.py (network namespaces on a bridge, root and
iptables needed), exactly as the capture end-to-end tests make them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from meshgen import NAMESPACE, SERVICE_PORT, service_name

from tests.support import pods
from tests.support.procs import Backend, admin_stat, http_get, wait_for

ADMIN_PORT = 15000  # capture_options' admin port: capture leaves it alone


def unavailable() -> str | None:
    """None when captured sidecars can run here, else why not (for the skip line)."""
    return pods.capture_available()


def cluster_ip(index: int) -> str:
    """Service ``index``'s cluster IP: 10.96.1.1 on, 250 a /24 (no process owns it)."""
    return f"10.96.{1 + index // 250}.{1 + index % 250}"


def captured_mesh(mesh_text: str, endpoint_address: str) -> str:
    """The generated mesh with a cluster IP per service and every endpoint on
    ``endpoint_address`` (the gateway, where a pod's sidecar reaches the backends)."""
    mesh: dict[str, Any] = yaml.safe_load(mesh_text)
    for index, service in enumerate(mesh["services"]):
        if service["name"] != service_name(index):
            raise ValueError(f"services[{index}] is {service['name']}, not {service_name(index)}")
        service["cluster_ips"] = [cluster_ip(index)]
        for endpoint in service["endpoints"]:
            endpoint["address"] = endpoint_address
    return yaml.safe_dump(mesh, sort_keys=False)


class GatewayBackend(Backend):
    """procs' HTTP app answering with its own name, on ``host`` (a pod network's gateway)."""

    def __init__(self, name: str, host: str) -> None:
        super().__init__(name, host=host)


class PodSidecar:
    """A captured Envoy in its own pod. ``proc`` is Envoy itself (``ip netns exec`` and
    ``setpriv`` exec in place), so its RSS is read from /proc like a local Envoy's;
    ``request`` is the pod's app (curl, as root, so iptables sends it to 15001) calling
    ``http://NAME:9080/`` by the name its hosts file maps to the service's cluster IP."""

    def __init__(self, network: pods.PodNetwork, index: int, targets: list[int],
                 xds_port: int, workdir: Path) -> None:
        name = service_name(index)
        self.pod = network.pod(name, hosts={service_name(t): cluster_ip(t) for t in targets})
        self.pod.capture()
        config = workdir / f"{name}-bootstrap.yaml"
        subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--capture",
                        "--node-id", f"{name}.{NAMESPACE}", "--service", name,
                        "--xds-address", f"{network.gateway}:{xds_port}",
                        "--admin-address", self.pod.address, "-o", str(config)],
                       check=True, timeout=60, capture_output=True)
        self.proc: subprocess.Popen[bytes] | None = self.pod.envoy(config.read_text())

    def wait_configured(self, clusters: int, timeout: float) -> None:
        """Until the sidecar has its egress listener, at least ``clusters`` active
        clusters and nothing warming: the config is loaded."""
        def loaded() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log = self.pod.envoy_log.read_text()[-2000:] if self.pod.envoy_log else ""
                raise RuntimeError(f"envoy in pod {self.pod.name} exited: {log}")
            return ('"egress"' in self.admin("/listeners?format=json")[1]
                    and self.stat("cluster_manager.active_clusters") >= clusters
                    and self.stat("cluster_manager.warming_clusters") == 0)
        wait_for(loaded, timeout=timeout, interval=0.5,
                 what=f"the config of {self.pod.name}'s captured sidecar "
                      f"(log: {self.pod.envoy_log})")

    def admin(self, path: str) -> tuple[int, str, dict[str, str]]:
        return http_get(f"http://{self.pod.address}:{ADMIN_PORT}{path}", timeout=10)

    def stat(self, name: str) -> int:
        return admin_stat(self.admin, name)

    def request(self, host: str) -> tuple[int, str, dict[str, str]]:
        status, body = self.pod.http_get(f"http://{host}:{SERVICE_PORT}/", timeout=10)
        return status, body, {}
