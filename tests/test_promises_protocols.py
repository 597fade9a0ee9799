"""Every kind of service the README describes, with real traffic through real Envoy:
gRPC (a grpcio server and client, HTTP/2 both sides, gRPC retry conditions), TCP (a raw
echo behind a sidecar's inbound listener), an ``external_name`` service (STRICT_DNS to
a name that resolves here), and services in a non-default namespace, by every Host form."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.procs import Envoy, wait_for
from tests.support.promise_rig import Rig, cluster_stat, service, wait_endpoints
from tests.support.promise_servers import (
    ECHO_STREAM,
    ECHO_UNARY,
    GrpcEcho,
    ScriptedHttp,
    TcpEcho,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

GRPC_PORT, TCP_PORT = 9090, 9500


@dataclass
class Protocols:
    lab: Rig
    frontend: Envoy
    shop: Envoy
    store: Envoy
    meshed: Envoy
    store_inbound: int
    grpc: dict[str, GrpcEcho]
    tcp: TcpEcho
    http: dict[str, ScriptedHttp]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Protocols]:
    lab = Rig(Path(tmp_path_factory.mktemp("protocols")))
    try:
        grpcs = {name: lab.own(GrpcEcho(name, unavailable=unavailable))
                 for name, unavailable in (("echo", 0), ("echo-flaky", 1), ("echo-bare", 1),
                                           ("echo-meshed", 0))}
        tcp = lab.own(TcpEcho("store-app"))
        http = {name: lab.own(ScriptedHttp(name))
                for name in ("external", "reviews-default", "reviews-shop", "ratings-shop")}
        retry_unavailable = {"retries": {"attempts": 2, "on": ["unavailable"]}}

        def mesh(store: int | None, meshed: int | None) -> list[dict[str, Any]]:
            """``store`` and ``echo-meshed`` are reached through their own sidecars'
            inbound listeners (known once those sidecars run), as in a real mesh."""
            return [
                service("echo", [grpcs["echo"]], GRPC_PORT, protocol="grpc"),
                service("echo-flaky", [grpcs["echo-flaky"]], GRPC_PORT, protocol="grpc",
                        policy=retry_unavailable),
                service("echo-bare", [grpcs["echo-bare"]], GRPC_PORT, protocol="grpc"),
                {"name": "echo-meshed", "port": GRPC_PORT, "protocol": "grpc", "endpoints":
                 [{"address": "127.0.0.1", "port": meshed}] if meshed else []},
                {"name": "store", "port": TCP_PORT, "protocol": "tcp", "endpoints":
                 [{"address": "127.0.0.1", "port": store}] if store else []},
                # Outside the mesh: the port is the external host's too.
                {"name": "external", "port": http["external"].port,
                 "external_name": "localhost"},
                service("reviews", [http["reviews-default"]]),
                service("reviews", [http["reviews-shop"]], namespace="shop"),
                service("ratings", [http["ratings-shop"]], namespace="shop"),
            ]

        lab.serve(mesh(None, None))
        frontend = lab.envoy("frontend-1")
        shop = lab.envoy("frontend-shop", extra=["--namespace", "shop"])
        store = lab.envoy("store-1", service="store", app_port=tcp.port)
        meshed = lab.envoy("echo-meshed-1", service="echo-meshed",
                           app_port=grpcs["echo-meshed"].port)
        assert store.inbound_port is not None and meshed.inbound_port is not None
        lab.write(mesh(store.inbound_port, meshed.inbound_port))
        wait_endpoints(frontend, {"echo": 1, "echo-flaky": 1, "echo-bare": 1,
                                  "echo-meshed": 1}, GRPC_PORT)
        wait_endpoints(frontend, {"store": 1}, TCP_PORT)
        yield Protocols(lab, frontend, shop, store, meshed, store.inbound_port, grpcs, tcp,
                        http)
    finally:
        lab.close()


def _channel(envoy: Envoy, authority: str) -> grpc.Channel:
    """A gRPC channel to the sidecar's egress listener, naming the service as :authority."""
    return grpc.insecure_channel(f"127.0.0.1:{envoy.egress_port}",
                                 options=[("grpc.default_authority", authority)])


def test_grpc_unary_streaming_and_status_through_the_sidecar(rig: Protocols) -> None:
    with _channel(rig.frontend, "echo") as channel:
        say = channel.unary_unary(ECHO_UNARY)
        assert say(b"hello", timeout=10) == b"echo:hello"
        count = channel.unary_stream(ECHO_STREAM)
        assert list(count(b"3", timeout=10)) == [b"echo:0", b"echo:1", b"echo:2"]
        with pytest.raises(grpc.RpcError) as failed:
            say(b"missing", timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND  # the app's status, intact
        assert "has no 'missing'" in (failed.value.details() or "")
    with _channel(rig.frontend, "echo.default.svc.cluster.local:9090") as channel:
        assert channel.unary_unary(ECHO_UNARY)(b"x", timeout=10) == b"echo:x"
    assert cluster_stat(rig.frontend, "echo", "upstream_cx_http2_total", GRPC_PORT) >= 1


def test_grpc_through_both_sidecars(rig: Protocols) -> None:
    """Caller's sidecar -> the service's sidecar (inbound listener, HTTP/2 to the app)
    -> a gRPC app: the whole mesh path, with streaming."""
    with _channel(rig.frontend, "echo-meshed") as channel:
        assert channel.unary_unary(ECHO_UNARY)(b"hop", timeout=10) == b"echo-meshed:hop"
        assert len(list(channel.unary_stream(ECHO_STREAM)(b"5", timeout=10))) == 5
    assert rig.meshed.stat("http.inbound.downstream_rq_completed") >= 2
    assert rig.meshed.stat("http.inbound.downstream_cx_http2_total") >= 1


def test_grpc_retry_on_unavailable(rig: Protocols) -> None:
    """The first call of each backend fails UNAVAILABLE (a gRPC status in an HTTP 200):
    ``on: [unavailable]`` retries it; the twin without retries passes the failure on."""
    with _channel(rig.frontend, "echo-flaky") as channel:
        assert channel.unary_unary(ECHO_UNARY)(b"a", timeout=10) == b"echo-flaky:a"
    assert rig.grpc["echo-flaky"].calls == 2
    with _channel(rig.frontend, "echo-bare") as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(ECHO_UNARY)(b"a", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rig.grpc["echo-bare"].calls == 1


def test_tcp_service_through_the_inbound_listener(rig: Protocols) -> None:
    """A tcp service's sidecar proxies raw bytes both ways; callers get its cluster and
    endpoints, and (as documented) no egress route: an HTTP listener cannot route TCP."""
    with socket.create_connection(("127.0.0.1", rig.store_inbound), timeout=10) as conn:
        for message in (b"ping", b"\x00\x01binary\xff"):
            conn.sendall(message)
            expected = b"store-app:" + message
            received = b""
            while len(received) < len(expected):
                chunk = conn.recv(4096)
                assert chunk, received
                received += chunk
            assert received == expected
    assert rig.tcp.connections >= 1
    wait_for(lambda: rig.store.stat("tcp.inbound.downstream_cx_total") >= 1,
             what="the inbound TCP proxy's stats")
    assert cluster_stat(rig.frontend, "store", "membership_healthy", TCP_PORT) == 1
    assert rig.frontend.request("store")[0] == 404


def test_external_name_reaches_the_dns_name(rig: Protocols) -> None:
    backend = rig.http["external"]
    assert rig.frontend.request("external")[:2] == (200, "external")
    assert rig.frontend.request(f"external.default:{backend.port}")[1] == "external"
    _, clusters, _ = rig.frontend.admin("/clusters")
    name = f"outbound|{backend.port}||external.default.svc.cluster.local"
    assert f"{name}::127.0.0.1:{backend.port}::" in clusters  # resolved by DNS, to IPv4
    _, dump, _ = rig.frontend.admin("/config_dump")
    assert '"type": "STRICT_DNS"' in dump


def test_a_namespace_of_its_own(rig: Protocols) -> None:
    """``reviews`` exists in default and in shop: each sidecar's bare name is its own
    namespace's; the qualified forms reach the other one."""
    front, shop = rig.frontend, rig.shop
    assert front.request("reviews")[1] == "reviews-default"
    for host in ("reviews.shop", "reviews.shop.svc", "reviews.shop.svc.cluster.local",
                 "reviews.shop.svc.cluster.local:9080", "reviews.shop:9080"):
        assert front.request(host)[1] == "reviews-shop", host
    assert front.request("ratings.shop")[1] == "ratings-shop"
    assert front.request("ratings")[0] == 404  # not in the caller's namespace
    assert shop.request("reviews")[1] == "reviews-shop"
    assert shop.request("ratings")[1] == "ratings-shop"
    assert shop.request("reviews.default")[1] == "reviews-default"
    assert cluster_stat(front, "reviews", "upstream_rq_200", namespace="shop") >= 1
