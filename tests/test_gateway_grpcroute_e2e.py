"""GRPCRoutes on a Gateway with real Envoy: a gateway proxy (``controlplane bootstrap
--gateway``) in file mode, a real grpcio client calling real grpcio servers through the
gateway's HTTP listener (HTTP/2 with prior knowledge, h2c) and its HTTPS listener
(HTTP/2 by ALPN, the certificate verified), the GRPCRoute's method and header matches
choosing between two backends.

Cases follow the Gateway API conformance tests named in each docstring; the gateway's
attachment and resources for the same shapes are golden files
(``golden/gateway/in/grpcroute_*.yaml``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.gateway_certs import TestCA
from tests.support.procs import ControlPlane, Envoy, free_port, wait_for
from tests.support.promise_servers import ECHO_STREAM, ECHO_UNARY, GrpcEcho
from tests.support.secure import write_mesh
from tests.test_gateway_e2e import gateway_envoy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

HOST = "grpc.example.com"
CALL_TIMEOUT = 5.0  # seconds, every call


class GrpcIngress:
    """Two grpcio servers as the services ``echo-v1`` and ``echo-v2``, a file-mode server
    whose Gateway has an HTTP and an HTTPS listener, and a gateway Envoy; ``close`` ends
    what it started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.v1, self.v2 = GrpcEcho("echo-v1"), GrpcEcho("echo-v2")
        self.ca = TestCA(tmp)
        self.cert = self.ca.server("grpc", HOST)
        self.http_port, self.https_port = free_port(), free_port()
        self.mesh_path = tmp / "mesh.yaml"
        write_mesh(self.mesh_path, self.mesh())
        self.server: ControlPlane | None = None
        self.gateway: Envoy | None = None
        self.server = ControlPlane(self.mesh_path, tmp).start()
        self.gateway = gateway_envoy(tmp, "ingress-1", self.server.xds_port).start()

    def mesh(self) -> dict[str, Any]:
        def service(name: str, port: int) -> dict[str, Any]:
            return {"name": name, "port": 9090, "protocol": "grpc",
                    "endpoints": [{"address": "127.0.0.1", "port": port}]}

        return {
            "services": [service("echo-v1", self.v1.port), service("echo-v2", self.v2.port)],
            "gateways": [{"name": "ingress", "listeners": [
                {"name": "grpc", "port": self.http_port, "protocol": "HTTP",
                 "hostname": HOST},
                {"name": "grpcs", "port": self.https_port, "protocol": "HTTPS",
                 "hostname": HOST,
                 "tls": {"certificateRefs": [{"kind": "Secret", "name": "grpc-cert"}]}},
            ]}],
            "grpc_routes": [
                {"name": "echo", "parentRefs": [{"name": "ingress"}], "hostnames": [HOST],
                 "rules": [
                     {"matches": [{"method": {"service": "promises.Echo", "method": "Count"}}],
                      "backendRefs": [{"name": "echo-v2", "port": 9090}]},
                     {"matches": [{"method": {"service": "promises.Echo", "method": "Say"},
                                   "headers": [{"name": "version", "value": "two"}]}],
                      "backendRefs": [{"name": "echo-v2", "port": 9090}]},
                     {"matches": [{"method": {"service": "promises.Echo", "method": "Say"}}],
                      "backendRefs": [{"name": "echo-v1", "port": 9090}]},
                 ]},
                {"name": "stray", "parentRefs": [{"name": "ingress", "sectionName": "nope"}],
                 "rules": [{"backendRefs": [{"name": "echo-v1", "port": 9090}]}]},
            ],
            "certificates": [{"name": "grpc-cert", "cert_file": str(self.cert.cert),
                              "key_file": str(self.cert.key)}],
        }

    def plain(self, authority: str = HOST) -> grpc.Channel:
        """A cleartext channel to the HTTP listener: HTTP/2 with prior knowledge."""
        return grpc.insecure_channel(f"127.0.0.1:{self.http_port}",
                                     options=[("grpc.default_authority", authority)])

    def tls(self) -> grpc.Channel:
        """A TLS channel to the HTTPS listener, verifying the gateway's certificate."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca.path.read_bytes())
        return grpc.secure_channel(f"127.0.0.1:{self.https_port}", credentials, options=[
            ("grpc.ssl_target_name_override", HOST), ("grpc.default_authority", HOST)])

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.server is not None:
            self.server.stop()
        self.v1.stop()
        self.v2.stop()


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[GrpcIngress]:
    made = GrpcIngress(tmp_path)
    try:
        yield made
    finally:
        made.close()


def say(channel: grpc.Channel, body: bytes, metadata: tuple[tuple[str, str], ...] = ()
        ) -> bytes:
    answer: bytes = channel.unary_unary(ECHO_UNARY)(body, timeout=CALL_TIMEOUT,
                                                   metadata=metadata)
    return answer


def count(channel: grpc.Channel, number: int) -> list[bytes]:
    return list(channel.unary_stream(ECHO_STREAM)(str(number).encode(),
                                                  timeout=CALL_TIMEOUT))


def first_answer(channel: grpc.Channel) -> bytes | None:
    """``Say`` once; None while the gateway is not serving the route yet."""
    try:
        return say(channel, b"hi")
    except grpc.RpcError:
        return None


def test_a_method_match_chooses_the_backend_through_the_http_listener(
        ingress: GrpcIngress) -> None:
    """GRPCExactMethodMatching and GRPCRouteHeaderMatching through a gateway: ``Say``
    reaches echo-v1, ``Say`` with the header ``version: two`` and ``Count`` (a server
    stream) reach echo-v2; a host the route does not name is not served
    (GRPCRouteListenerHostnameMatching: UNIMPLEMENTED, the gRPC status of Envoy's 404);
    a GRPCRoute whose parentRef names no listener is reported, the rest served."""
    assert ingress.gateway is not None and ingress.server is not None
    with ingress.plain() as channel:
        answer = wait_for(lambda: first_answer(channel), timeout=40,
                          what="a gRPC call through the gateway")
        assert answer == b"echo-v1:hi"
        assert say(channel, b"hi", (("version", "two"),)) == b"echo-v2:hi"
        assert say(channel, b"hi", (("version", "one"),)) == b"echo-v1:hi"
        assert count(channel, 3) == [b"echo-v2:0", b"echo-v2:1", b"echo-v2:2"]
    with ingress.plain("other.example.com") as channel, \
            pytest.raises(grpc.RpcError) as refused:
        say(channel, b"hi")
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value

    # Each backend was reached by the gateway's own cluster for its service, over HTTP/2.
    v1 = "cluster.outbound|9090||echo-v1.default.svc.cluster.local"
    v2 = "cluster.outbound|9090||echo-v2.default.svc.cluster.local"
    assert ingress.gateway.stat(f"{v1}.upstream_rq_total") >= 2
    assert ingress.gateway.stat(f"{v2}.upstream_rq_total") >= 2
    assert ingress.gateway.stat(f"{v1}.upstream_cx_http2_total") >= 1
    assert (ingress.v1.calls, ingress.v2.calls) == (2, 2)
    stray = [line for line in ingress.server.logs() if line.get("event") ==
             "routes.not_accepted" and line.get("route") == "GRPCRoute/default/stray"]
    assert stray and stray[0]["reason"] == "NoMatchingParent", stray


def test_grpc_over_the_https_listener(ingress: GrpcIngress) -> None:
    """HTTP/2 by ALPN on an HTTPS listener (the GRPCRoute spec's requirement for HTTPS),
    the certificate from ``certificates`` verified by the client; the same route's
    method match applies there."""
    with ingress.tls() as channel:
        answer = wait_for(lambda: first_answer(channel), timeout=40,
                          what="a gRPC call over TLS through the gateway")
        assert answer == b"echo-v1:hi"
        assert count(channel, 1) == [b"echo-v2:0"]
