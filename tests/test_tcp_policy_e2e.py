"""TCP policies through a real captured sidecar (issue 10, item 3): ``idle_timeout``
closes a TCP connection left idle that long, and only such a one; ``connect_timeout``
reaches the sidecar's clusters and gives up on an endpoint that never answers.

Pod ``client`` has a captured sidecar (tests/support/pods.py); pod ``echo`` runs a TCP
echo (no sidecar: the client's is the one under test). The client dials the echo
service's cluster IP, which no process owns: only the sidecar can carry it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.bootstrap import capture_options, render_bootstrap
from tests.support import pods
from tests.support.files import write_atomic
from tests.support.procs import ControlPlane, http_get, wait_for

pytestmark = [
    pytest.mark.skipif(pods.capture_available() is not None,
                       reason=str(pods.capture_available())),
    pytest.mark.xdist_group("tcp_policy_e2e"),  # one set of pods for the module's tests
]

ECHO_IP = "10.233.0.20"
VOID_IP = "10.233.0.21"
ECHO = "outbound|7000||echo.default.svc.cluster.local"
VOID = "outbound|7000||void.default.svc.cluster.local"
SILENT_PORT = 7001  # the echo pod drops every packet for it: a connect never completes

# In pod client: one connection to HOST:PORT through the sidecar, its banner read, then
# "active": a line every 0.2 s for 2.4 s in all, each echoed back (never idle 1 s);
# "idle": nothing sent, and how long until the connection is closed (up to 10 s).
# Seconds are counted from the connection's start.
CLIENT = """
import json, socket, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = socket.create_connection((host, port), timeout=10)
started, reader = time.monotonic(), conn.makefile("rb")
result = {"banner": reader.readline().decode().strip()}
try:
    if mode == "active":
        echoed = []
        for i in range(12):
            time.sleep(0.2)
            conn.sendall(f"line {i}\\n".encode())
            echoed.append(reader.readline().decode().strip())
        result["echoed"] = echoed
    else:
        result["read"] = reader.readline().decode()
except OSError as exc:
    result["error"] = str(exc)
result["seconds"] = round(time.monotonic() - started, 3)
print(json.dumps(result))
"""


@dataclass
class Rig:
    network: pods.PodNetwork
    control: ControlPlane
    path: Path
    client: pods.Pod
    echo: pods.Pod

    def write(self, echo_policy: str) -> None:
        write_atomic(self.path, f"""services:
  - name: client
    port: 8080
    endpoints: [{{address: {self.client.address}, port: 8080}}]
  - name: echo
    port: 7000
    protocol: tcp
    cluster_ips: [{ECHO_IP}]
    endpoints: [{{address: {self.echo.address}, port: 7000}}]
    policy: {echo_policy}
  - name: void
    port: 7000
    protocol: tcp
    cluster_ips: [{VOID_IP}]
    endpoints: [{{address: {self.echo.address}, port: {SILENT_PORT}}}]
    policy: {{connect_timeout: 2s}}
""")

    def admin(self, path: str) -> str:
        status, body, _ = http_get(f"http://{self.client.address}:15000{path}", timeout=5)
        assert status == 200, body
        return body

    def stat(self, name: str) -> int:
        escaped = "".join("\\" + c if c in ".|[]()" else c for c in name)
        found: dict[str, Any] = json.loads(
            self.admin(f"/stats?format=json&filter=^{escaped}$"))
        values = [s.get("value", 0) for s in found.get("stats", []) if s.get("name") == name]
        return int(values[0]) if values else 0

    def connect(self, host: str, mode: str) -> dict[str, Any]:
        run = self.client.call([sys.executable, "-c", CLIENT, host, "7000", mode], timeout=30)
        assert run.returncode == 0, run.stderr
        found: dict[str, Any] = json.loads(run.stdout)
        return found

    def tcp_proxy(self, cluster: str) -> dict[str, Any]:
        """The tcp_proxy config of the client sidecar's chain for ``cluster``."""
        dump = json.loads(self.admin("/config_dump?resource=dynamic_listeners"))
        for listener in dump["configs"]:
            for chain in listener["active_state"]["listener"].get("filter_chains", []):
                if chain.get("name") == cluster:
                    config: dict[str, Any] = chain["filters"][0]["typed_config"]
                    return config
        raise AssertionError(f"no chain {cluster} in the client sidecar's listeners")

    def cluster(self, name: str) -> dict[str, Any]:
        dump = json.loads(self.admin("/config_dump?resource=dynamic_active_clusters"))
        for entry in dump["configs"]:
            if entry["cluster"]["name"] == name:
                found: dict[str, Any] = entry["cluster"]
                return found
        raise AssertionError(f"no cluster {name} at the client sidecar")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("tcp-policy")
    with pods.PodNetwork() as network:
        client = network.pod("client", hosts={"echo": ECHO_IP, "void": VOID_IP})
        echo = network.pod("echo")
        path = workdir / "mesh.yaml"
        control = ControlPlane(path, workdir, extra=["--xds-address", f"{network.gateway}:0"])
        found = Rig(network, control, path, client, echo)
        found.write("{idle_timeout: 1s, connect_timeout: 750ms}")
        control.start()
        try:
            echo.serve_tcp(7000, name="echo")
            dropped = echo.call(["iptables", "-w", "5", "-A", "INPUT", "-p", "tcp", "--dport",
                                 str(SILENT_PORT), "-j", "DROP"])
            assert dropped.returncode == 0, dropped.stderr
            client.capture()
            options = capture_options("client-0.default", "client", admin_address=client.address,
                                      xds_address=f"{network.gateway}:{control.xds_port}")
            client.envoy(render_bootstrap(options))
            wait_for(lambda: ECHO in found.admin("/config_dump?resource=dynamic_listeners"),
                     timeout=30,
                     what=f"the echo chain at the client's sidecar (log: {client.envoy_log})")
            yield found
        finally:
            control.stop()


def test_an_idle_tcp_connection_is_closed_after_idle_timeout(rig: Rig) -> None:
    closed = rig.stat(f"tcp.{ECHO}.idle_timeout")
    found = rig.connect("echo", "idle")
    assert found["banner"].startswith("echo "), found  # through the sidecar to the echo
    assert found.get("read") == "" and "error" not in found, found  # closed by the sidecar
    assert 0.9 <= found["seconds"] < 10, found  # not before the timeout; not the 1 h default
    assert rig.stat(f"tcp.{ECHO}.idle_timeout") == closed + 1


def test_a_connection_never_idle_that_long_stays_open(rig: Rig) -> None:
    closed = rig.stat(f"tcp.{ECHO}.idle_timeout")
    found = rig.connect("echo", "active")
    assert found["banner"].startswith("echo "), found
    assert found.get("echoed") == [f"line {i}" for i in range(12)], found
    assert found["seconds"] > 2, found  # open longer than idle_timeout, never idle that long
    assert rig.stat(f"tcp.{ECHO}.idle_timeout") == closed


def test_the_policy_reaches_the_sidecar_and_changes_live(rig: Rig) -> None:
    assert rig.tcp_proxy(ECHO)["idle_timeout"] == "1s"
    assert rig.cluster(ECHO)["connect_timeout"] == "0.750s"
    assert rig.cluster(VOID)["connect_timeout"] == "2s"
    rig.write("{idle_timeout: 0s}")  # never; connect_timeout back to the default
    try:
        wait_for(lambda: rig.tcp_proxy(ECHO)["idle_timeout"] == "0s", timeout=20,
                 what="idle_timeout 0s at the client's sidecar")
        wait_for(lambda: rig.cluster(ECHO)["connect_timeout"] == "1s", timeout=20,
                 what="the default connect_timeout at the client's sidecar")
    finally:
        rig.write("{idle_timeout: 1s, connect_timeout: 750ms}")
        wait_for(lambda: rig.tcp_proxy(ECHO)["idle_timeout"] == "1s", timeout=20,
                 what="idle_timeout 1s again at the client's sidecar")


def test_connect_timeout_gives_up_on_an_endpoint_that_never_answers(rig: Rig) -> None:
    """void's only endpoint drops every packet: the connection attempt hangs (the kernel
    would retry for minutes) until the sidecar gives up after void's 2 s, not the 1 s
    default; the caller's connection is then closed."""
    before = rig.stat(f"cluster.{VOID}.upstream_cx_connect_timeout")
    found = rig.connect("void", "idle")
    assert found["banner"] == "", found  # closed, nothing sent
    assert 1.9 <= found["seconds"] < 10, found  # void's connect_timeout, not the default
    wait_for(lambda: rig.stat(f"cluster.{VOID}.upstream_cx_connect_timeout") > before,
             timeout=10, what="a connect timeout counted at the client's sidecar")
