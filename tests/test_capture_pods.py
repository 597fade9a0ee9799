"""The test pod network (tests/support/pods.py) every capture and injection end-to-end test
stands on: pods on a bridge reach each other and the gateway, names from a pod's hosts file
resolve inside it, processes run as UID 1337 (Envoy included), and nothing is left after."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import pods
from tests.support.procs import http_get, wait_for

pytestmark = pytest.mark.skipif(pods.available() is not None,
                                reason=f"test pods: {pods.available()}")

NAMED_HTTP = str(Path(__file__).parent / "support" / "named_http.py")


def serve_named(pod: pods.Pod, name: str, port: int = 8080) -> subprocess.Popen[bytes]:
    proc = pod.run([sys.executable, NAMED_HTTP, pod.address, str(port), name])
    wait_for(lambda: pod.http_get(f"http://{pod.address}:{port}/") == (200, name),
             what=f"{name} on {pod.address}:{port}")
    return proc


@pytest.fixture
def network() -> Iterator[pods.PodNetwork]:
    with pods.PodNetwork() as network:
        yield network


def test_pods_reach_each_other_and_names_resolve(network: pods.PodNetwork) -> None:
    a = network.pod("a")
    b = network.pod("b", hosts={"reviews": network.pods[0].address})
    serve_named(a, "app-a")
    serve_named(b, "app-b")
    assert b.http_get(f"http://{a.address}:8080/") == (200, "app-a")
    assert a.http_get(f"http://{b.address}:8080/") == (200, "app-b")
    assert b.http_get("http://reviews:8080/") == (200, "app-a")  # b's hosts file
    assert b.http_get("http://b:8080/") == (200, "app-b")  # its own name
    status, error = a.http_get("http://reviews:8080/", timeout=4)
    assert status == 0 and "resolve" in error  # a's hosts file does not have it


def test_pod_reaches_the_gateway(network: pods.PodNetwork) -> None:
    """The control plane's xDS listens on the gateway in end-to-end tests."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((network.gateway, 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pod = network.pod("a")
        assert pod.http_get(f"http://{network.gateway}:{server.server_address[1]}/") == (
            200, "hello")
    finally:
        server.shutdown()
        server.server_close()


def test_run_as_the_proxy_uid(network: pods.PodNetwork) -> None:
    pod = network.pod("a")
    result = pod.call(["id", "-u"], uid=pods.PROXY_UID)
    assert result.stdout.strip() == "1337", result.stderr
    assert pod.call(["id", "-u"]).stdout.strip() == "0"


def test_envoy_runs_as_1337_with_its_admin_on_the_pod_address(network: pods.PodNetwork) -> None:
    pod = network.pod("a")
    bootstrap = (f"admin:\n  address:\n    socket_address: "
                 f"{{address: {pod.address}, port_value: 15000}}\n"
                 "node: {id: a.default, cluster: a}\n")
    proc = pod.envoy(bootstrap)
    wait_for(lambda: http_get(f"http://{pod.address}:15000/ready")[1].strip() == "LIVE",
             timeout=20, what=f"Envoy admin in pod a (log: {pod.envoy_log})")
    owner = subprocess.run(["ps", "-o", "uid=", "-p", str(proc.pid)], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert owner == "1337"


def test_cleanup_leaves_nothing() -> None:
    with pods.PodNetwork() as network:
        a = network.pod("a", hosts={"reviews": "10.96.0.10"})
        proc = serve_named(a, "app-a")
        names = (a.ns, network.bridge, f"cpp{network.number}v0")
        assert Path(f"/etc/netns/{a.ns}/hosts").read_text().count("10.96.0.10 reviews") == 1
    assert proc.poll() is not None  # ended with the network
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert names[0] not in namespaces.split()
    assert f" {names[1]}:" not in links and f" {names[2]}@" not in links
    assert not Path(f"/etc/netns/{names[0]}").exists()
    assert not network.workdir.exists()


def test_sweep_removes_a_crashed_runs_network() -> None:
    """A network whose lease died with its process (here: closed by hand) is swept, and
    a live one is not. (Once its lease is closed the number is anyone's: a parallel
    worker may lease it and clear it first, so the crashed network is never close()d
    here, which would remove that worker's pods.)"""
    live = pods.PodNetwork().__enter__()
    try:
        live.pod("a")
        crashed = pods.PodNetwork().__enter__()
        crashed.pod("a")
        ns = crashed.pods[0].ns
        crashed._lease.close()  # as if its process had died
        cleaned = pods.sweep()
        shutil.rmtree(crashed.workdir, ignore_errors=True)
        assert live.number not in cleaned
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout.split()
        assert ns not in namespaces and live.pods[0].ns in namespaces
    finally:
        live.close()
