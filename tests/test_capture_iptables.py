"""``controlplane capture`` installed for real: iptables in test pods (network namespaces
on a bridge, tests/support/pods.py), real TCP connections through the rules.

The captured pod runs plain listeners on 15001 and 15006 that answer with the original
destination of each connection (SO_ORIGINAL_DST), so every test reads where the kernel
sent a connection and where it was going: outbound to 15001, inbound to 15006, and what
capture must leave alone (the proxy's UID, loopback, exclusions, the xDS address)
reaching its real destination.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.inject.capture import CaptureConfig, clean_plan, plan, render
from tests.support import pods

pytestmark = pytest.mark.skipif(pods.capture_available() is not None,
                                reason=f"capture in test pods: {pods.capture_available()}")

CONTROLPLANE = [sys.executable, "-m", "controlplane"]
APP_UID = 1000  # any UID but the proxy's


class _Banner(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(f"{self.server.name} - -\n".encode())  # type: ignore[attr-defined]


def host_listener(address: str, name: str) -> tuple[socketserver.ThreadingTCPServer, int]:
    """A listener in the host's namespace (on the bridge's gateway), like the control
    plane's xDS in end-to-end tests."""
    server = socketserver.ThreadingTCPServer((address, 0), _Banner)
    server.daemon_threads = True
    server.name = name  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


@dataclass
class Mesh:
    network: pods.PodNetwork
    app: pods.Pod  # captured
    other: pods.Pod
    far: pods.Pod  # in an excluded CIDR
    xds_port: int  # excluded address on the gateway
    gateway_port: int  # not excluded


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with pods.PodNetwork() as network:
        app, other, far = network.pod("app"), network.pod("other"), network.pod("far")
        xds, xds_port = host_listener(network.gateway, "xds")
        gateway, gateway_port = host_listener(network.gateway, "gateway")
        try:
            for port, name in ((15001, "outbound"), (15006, "inbound"), (8080, "app8080"),
                               (8081, "app8081"), (15000, "admin")):
                app.serve_tcp(port, name)
            app.serve_tcp(7000, "local", "127.0.0.1")
            other.serve_tcp(9000, "other9000", other.address)
            other.serve_tcp(9090, "other9090", other.address)
            far.serve_tcp(9000, "far9000", far.address)
            app.capture("--exclude-outbound-ports", "9090",
                        "--exclude-outbound-cidrs", f"{far.address}/32",
                        "--exclude-inbound-ports", "8081",
                        "--exclude-address", f"{network.gateway}:{xds_port}")
            yield Mesh(network, app, other, far, xds_port, gateway_port)
        finally:
            for server in (xds, gateway):
                server.shutdown()
                server.server_close()


def test_outbound_from_the_app_lands_on_15001_with_its_original_destination(mesh: Mesh) -> None:
    dst = f"{mesh.other.address}:9000"
    assert mesh.app.tcp_connect(mesh.other.address, 9000).startswith(f"outbound {dst} ")
    assert mesh.app.tcp_connect(mesh.other.address, 9000, uid=APP_UID).startswith(
        f"outbound {dst} ")
    # an address no process owns (a ClusterIP) is captured all the same
    assert mesh.app.tcp_connect("10.96.0.10", 80, uid=APP_UID).startswith(
        "outbound 10.96.0.10:80 ")


def test_the_proxys_own_connections_are_not_captured(mesh: Mesh) -> None:
    """No loop: the sidecar's upstream connections reach their destination."""
    assert mesh.app.tcp_connect(mesh.other.address, 9000, uid=pods.PROXY_UID).startswith(
        "other9000 ")


def test_loopback_is_left_alone(mesh: Mesh) -> None:
    assert mesh.app.tcp_connect("127.0.0.1", 7000).startswith("local ")
    assert mesh.app.tcp_connect("127.0.0.1", 7000, uid=pods.PROXY_UID).startswith("local ")
    # the app calling its own pod IP goes straight to itself, as in Istio
    assert mesh.app.tcp_connect(mesh.app.address, 8080, uid=APP_UID).startswith("app8080 ")


def test_excluded_port_cidr_and_xds_address_are_left_alone(mesh: Mesh) -> None:
    assert mesh.app.tcp_connect(mesh.other.address, 9090).startswith("other9090 ")
    assert mesh.app.tcp_connect(mesh.far.address, 9000).startswith("far9000 ")
    assert mesh.app.tcp_connect(mesh.network.gateway, mesh.xds_port).startswith("xds ")
    # the gateway's other ports are captured: the exclusion is that address alone
    gateway = f"{mesh.network.gateway}:{mesh.gateway_port}"
    assert mesh.app.tcp_connect(mesh.network.gateway, mesh.gateway_port).startswith(
        f"outbound {gateway} ")


def test_inbound_to_an_app_port_lands_on_15006_with_its_original_destination(
        mesh: Mesh) -> None:
    dst = f"{mesh.app.address}:8080"
    assert mesh.other.tcp_connect(mesh.app.address, 8080).startswith(f"inbound {dst} ")


def test_excluded_and_sidecar_inbound_ports_reach_the_app_directly(mesh: Mesh) -> None:
    assert mesh.other.tcp_connect(mesh.app.address, 8081).startswith("app8081 ")
    assert mesh.other.tcp_connect(mesh.app.address, 15000).startswith("admin ")  # Envoy admin


def test_the_proxy_calling_its_own_pod_goes_inbound_but_its_passthrough_does_not(
        mesh: Mesh) -> None:
    """An app calling its own Service: the outbound sidecar picks its own pod IP, and
    that connection (UID 1337 over lo) goes to the inbound listener; the inbound
    listener's forward to the app (from 127.0.0.6, as Istio's) reaches the app."""
    dst = f"{mesh.app.address}:8080"
    assert mesh.app.tcp_connect(mesh.app.address, 8080, uid=pods.PROXY_UID).startswith(
        f"inbound {dst} ")
    assert mesh.app.tcp_connect(mesh.app.address, 8080, uid=pods.PROXY_UID,
                                 bind="127.0.0.6").startswith("app8080 ")


# -- install, re-run, clean, dry run, errors: each in a fresh pod -----------------------


@pytest.fixture
def pod() -> Iterator[pods.Pod]:
    with pods.PodNetwork() as network:
        yield network.pod("app")


def nat(pod: pods.Pod, binary: str = "iptables") -> str:
    """The pod's nat table, without iptables-save's timestamped comments."""
    result = pod.call([f"{binary}-save", "-t", "nat"])
    assert result.returncode == 0, result.stderr
    return "".join(line + "\n" for line in result.stdout.splitlines()
                   if not line.startswith("#"))


def ours(table: str) -> list[str]:
    return [line for line in table.splitlines() if "CONTROLPLANE_" in line]


def planned(config: CaptureConfig, family: int = 4) -> list[str]:
    """The plan as iptables-save prints it: chains first, then the rules."""
    rules = plan(config, family)
    chains = sorted(f":{r[3]} - [0:0]" for r in rules if r[2] == "-N")
    hooks = ("PREROUTING", "OUTPUT")
    body = [" ".join(r[2:]) for r in rules if r[2] == "-A"]
    return [*chains, *(b for b in body if b.split()[1] in hooks),
            *(b for b in body if b.split()[1] not in hooks)]


def by_chain(lines: list[str]) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    for line in lines:
        chains.setdefault(line.split()[1] if line.startswith("-A") else ":", []).append(line)
    return chains


def test_installed_rules_are_the_plan_exactly_and_a_rerun_leaves_one_copy(pod: pods.Pod) -> None:
    args = ["--exclude-outbound-ports", "9090", "--exclude-address", "10.96.0.20:18000"]
    config = CaptureConfig(exclude_outbound_ports=(9090,), exclude_addresses=("10.96.0.20:18000",))
    pod.capture(*args)
    first = nat(pod)
    assert by_chain(ours(first)) == by_chain(planned(config))  # the plan, as written
    pod.capture(*args)
    assert nat(pod) == first  # re-run: the same table, one copy of everything


def test_a_rerun_with_another_config_replaces_the_rules(pod: pods.Pod) -> None:
    pod.capture()
    pod.capture("--include-inbound-ports", "")
    table = ours(nat(pod))
    assert by_chain(table) == by_chain(planned(CaptureConfig(include_inbound_ports="")))
    assert not any(line.startswith("-A PREROUTING") for line in table)


def test_clean_removes_exactly_what_capture_added(pod: pods.Pod) -> None:
    """A foreign chain and rules of the test's own survive; so does the table around."""
    for rule in (["-N", "TEST_KEEP"], ["-A", "TEST_KEEP", "-p", "tcp", "-j", "RETURN"],
                 ["-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN"],
                 ["-A", "PREROUTING", "-p", "tcp", "--dport", "22", "-j", "TEST_KEEP"]):
        assert pod.call(["iptables", "-t", "nat", *rule]).returncode == 0
    before = nat(pod)
    pod.capture()
    pod.capture()
    assert len(ours(nat(pod))) == len(planned(CaptureConfig()))
    pod.capture("--clean")
    assert nat(pod) == before
    pod.capture("--clean")  # nothing of ours left: a no-op, not an error
    assert nat(pod) == before


def test_dry_run_changes_nothing_and_prints_the_plan(pod: pods.Pod) -> None:
    before = nat(pod)
    result = pod.call([*CONTROLPLANE, "capture", "--dry-run", "--exclude-outbound-ports", "9090"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == render(plan(CaptureConfig(exclude_outbound_ports=(9090,))))
    assert nat(pod) == before
    pod.capture()
    installed = nat(pod)
    result = pod.call([*CONTROLPLANE, "capture", "--clean", "--dry-run"])
    assert result.returncode == 0 and result.stdout == render(clean_plan())
    assert nat(pod) == installed


def test_what_was_installed_is_logged(pod: pods.Pod) -> None:
    result = pod.call([*CONTROLPLANE, "capture", "--exclude-outbound-ports", "9090"])
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["capture.installed"]
    assert events[0]["rules"] == sum(1 for r in plan(CaptureConfig(
        exclude_outbound_ports=(9090,))) if r[2] == "-A")
    assert events[0]["exclude_outbound_ports"] == [9090] and events[0]["proxy_uid"] == 1337


def test_ipv6_installs_and_cleans_ip6tables_too(pod: pods.Pod) -> None:
    pod.capture("--ipv6")
    assert by_chain(ours(nat(pod, "ip6tables"))) == by_chain(planned(CaptureConfig(), 6))
    assert ours(nat(pod))
    pod.capture("--clean")  # without --ipv6: what it added is removed all the same
    assert ours(nat(pod, "ip6tables")) == [] and ours(nat(pod)) == []


def test_not_permitted_names_net_admin_and_what_to_do(pod: pods.Pod) -> None:
    before = nat(pod)
    result = pod.call([*CONTROLPLANE, "capture"], uid=APP_UID)
    assert result.returncode == 1
    assert "NET_ADMIN" in result.stderr and "run controlplane capture as root" in result.stderr
    assert "Traceback" not in result.stderr
    assert nat(pod) == before


def test_missing_iptables_says_to_install_it(pod: pods.Pod, tmp_path: Path) -> None:
    result = pod.call(["env", f"PATH={tmp_path}", *CONTROLPLANE, "capture"])
    assert result.returncode == 1
    assert "iptables not found" in result.stderr and "apt-get install iptables" in result.stderr


def test_the_test_listener_sees_unredirected_connections_as_such(pod: pods.Pod) -> None:
    """The check the other tests stand on: without capture, nothing reaches 15001."""
    pod.serve_tcp(15001, "outbound")
    pod.serve_tcp(8080, "app8080")
    assert pod.tcp_connect(pod.address, 8080).startswith("app8080 ")
    with socket.socket() as probe:  # and the host reaches the pod directly
        probe.settimeout(5)
        probe.connect((pod.address, 8080))
        assert probe.recv(100).startswith(b"app8080 ")


def test_net_admin_and_net_raw_are_all_it_needs(pod: pods.Pod) -> None:
    """What the injected init container holds: root with NET_ADMIN and NET_RAW only."""
    only = ["setpriv", "--bounding-set", "-all,+net_admin,+net_raw", "--inh-caps", "-all", "--"]
    result = pod.call([*only, *CONTROLPLANE, "capture"])
    assert result.returncode == 0, result.stderr
    assert by_chain(ours(nat(pod))) == by_chain(planned(CaptureConfig()))
    assert pod.call([*only, *CONTROLPLANE, "capture", "--clean"]).returncode == 0
    assert ours(nat(pod)) == []


def test_root_without_net_admin_is_told_to_add_it(pod: pods.Pod) -> None:
    without = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-all", "--"]
    result = pod.call([*without, *CONTROLPLANE, "capture"])
    assert result.returncode == 1
    assert "capabilities.add [NET_ADMIN, NET_RAW]" in result.stderr
    assert ours(nat(pod)) == []
