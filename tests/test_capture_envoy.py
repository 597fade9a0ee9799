"""Capture with a real Envoy as the sidecar (UID 1337), configured statically so that
only the rules are under test (tests/test_capture_e2e.py runs the whole mesh): Envoy's
original-destination listeners on 15001 and 15006 forward to where each connection was
going, and its own upstream connections are not captured again (no loop)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import pods
from tests.support.procs import end, http_get, wait_for

pytestmark = pytest.mark.skipif(pods.capture_available() is not None,
                                reason=f"capture in test pods: {pods.capture_available()}")

_ORIGINAL_DST = ("- name: envoy.filters.listener.original_dst\n"
                 "      typed_config: {'@type': type.googleapis.com/envoy.extensions.filters."
                 "listener.original_dst.v3.OriginalDst}")


def listener(name: str, port: int, cluster: str) -> str:
    return f"""
  - name: {name}
    address: {{socket_address: {{address: 0.0.0.0, port_value: {port}}}}}
    listener_filters:
    {_ORIGINAL_DST}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}"""


def cluster(name: str, bind: str | None = None) -> str:
    text = f"""
  - name: {name}
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s"""
    if bind:
        text += ("\n    upstream_bind_config: "
                 f"{{source_address: {{address: {bind}, port_value: 0}}}}")
    return text


def bootstrap(pod: pods.Pod) -> str:
    """Outbound: anything to its original destination. Inbound: to the app at its
    original destination, from 127.0.0.6 (what the translator's inbound cluster does)."""
    return (f"admin: {{address: {{socket_address: {{address: {pod.address}, "
            f"port_value: 15000}}}}}}\n"
            f"node: {{id: {pod.name}.default, cluster: {pod.name}}}\n"
            "static_resources:\n  listeners:"
            + listener("outbound", 15001, "passthrough")
            + listener("inbound", 15006, "inbound_passthrough")
            + "\n  clusters:" + cluster("passthrough")
            + cluster("inbound_passthrough", bind="127.0.0.6") + "\n")


def stat(pod: pods.Pod, name: str) -> int:
    text = http_get(f"http://{pod.address}:15000/stats?filter=^{name}$")[1]
    return int(text.split(":")[1]) if ":" in text else 0


@dataclass
class Pods:
    app: pods.Pod  # captured, with Envoy
    other: pods.Pod
    envoy: subprocess.Popen[bytes]


@pytest.fixture
def captured() -> Iterator[Pods]:
    with pods.PodNetwork() as network:
        app, other = network.pod("app"), network.pod("other")
        app.serve_tcp(8080, "app8080")
        other.serve_tcp(9000, "other9000", other.address)
        app.capture()
        proc = app.envoy(bootstrap(app))
        wait_for(lambda: http_get(f"http://{app.address}:15000/ready")[1].strip() == "LIVE",
                 timeout=30, what=f"Envoy in pod app (log: {app.envoy_log})")
        yield Pods(app, other, proc)
        end(proc)


def test_the_apps_outbound_goes_through_envoy_to_its_destination(captured: Pods) -> None:
    app, other = captured.app, captured.other
    before = stat(app, "tcp.outbound.downstream_cx_total")
    reply = app.tcp_connect(other.address, 9000, uid=1000)
    assert reply.startswith("other9000 "), reply  # arrived: Envoy's upstream not re-captured
    assert reply.split()[3].startswith(f"{app.address}:")  # from the pod, via Envoy
    assert stat(app, "tcp.outbound.downstream_cx_total") == before + 1
    assert stat(app, "cluster.passthrough.upstream_cx_total") >= 1


def test_inbound_goes_through_envoy_to_the_app_from_127_0_0_6(captured: Pods) -> None:
    app, other = captured.app, captured.other
    before = stat(app, "tcp.inbound.downstream_cx_total")
    reply = other.tcp_connect(app.address, 8080)
    assert reply.startswith("app8080 "), reply
    assert reply.split()[3].startswith("127.0.0.6:")  # Envoy's passthrough, not the caller
    assert stat(app, "tcp.inbound.downstream_cx_total") == before + 1


def test_with_the_sidecar_stopped_the_apps_calls_fail(captured: Pods) -> None:
    """Capture is real: nothing reaches the network past the rules without Envoy."""
    app, other = captured.app, captured.other
    assert app.tcp_connect(other.address, 9000).startswith("other9000 ")
    end(captured.envoy)
    reply = app.tcp_connect(other.address, 9000)
    assert reply.startswith("error:") and "refused" in reply, reply
