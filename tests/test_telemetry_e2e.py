"""Sidecar telemetry end to end: real Envoys from `controlplane bootstrap`, the real
`controlplane serve`, real HTTP, a real OTLP/gRPC collector.

One JSON access-log line per request on the sidecar's stdout (outbound on the caller's,
inbound on the callee's), Prometheus stats on the stats port labelled by service, trace
context passed through (or started, with tracing on) and spans at the collector; the
mesh's ``telemetry`` block turns the access log off without restarting anything."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from controlplane.lab.sidecars import Sidecar
from controlplane.lab.topology import Instance
from tests.support.procs import ControlPlane, Envoy, free_port, http_get, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


class HeaderBackend:
    """An HTTP app on 127.0.0.1 that remembers the headers of every request it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                backend.seen.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _scopes(resource_spans: Any) -> Any:
    """A ResourceSpans' scopes: field 2, ``scope_spans`` in opentelemetry-proto and
    ``instrumentation_library_spans`` in the older copy xds-protos ships; both install
    the same module, and the package pip installs last owns it."""
    return getattr(resource_spans, resource_spans.DESCRIPTOR.fields_by_number[2].name)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector: keeps every span it is sent, with its service."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, trace id hex)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for spans in request.resource_spans:
            service = next((a.value.string_value for a in spans.resource.attributes
                            if a.key == "service.name"), "")
            self.spans += [(service, span.trace_id.hex()) for scope in _scopes(spans)
                           for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self.server.stop(0)


class Rig:
    """reviews' app behind its sidecar (inbound), called through productpage's sidecar
    (egress), both in namespace shop; productpage's sidecar serves its stats."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.app = HeaderBackend()
        self.telemetry: dict[str, Any] = {}
        self.server = ControlPlane(self.mesh, tmp)
        self.stats_port = free_port()
        self.caller = Envoy(tmp, "productpage-1.shop", "productpage", self.server.xds_port,
                            extra=["--namespace", "shop", "--admin-port", str(free_port()),
                                   "--stats-port", str(self.stats_port)])
        self.callee = Envoy(tmp, "reviews-1.shop", "reviews", self.server.xds_port,
                            extra=["--namespace", "shop"], app_port=self.app.port)

    def write_mesh(self) -> None:
        assert self.callee.inbound_port is not None
        mesh = {"telemetry": self.telemetry, "services": [
            {"name": "reviews", "namespace": "shop", "port": 9080,
             "endpoints": [{"address": "127.0.0.1", "port": self.callee.inbound_port}]},
            {"name": "productpage", "namespace": "shop", "port": 9080}]}
        tmp = self.mesh.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(mesh))
        tmp.replace(self.mesh)

    def start(self) -> Rig:
        self.write_mesh()
        self.server.start()
        self.caller.start()
        self.callee.start()
        wait_for(lambda: self.call()[0] == 200, what="reviews through both sidecars")
        return self

    def call(self, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        return self.caller.request("reviews.shop", "/reviews/1?x=1", headers=headers)

    def stop(self) -> None:
        for thing in (self.caller, self.callee, self.server, self.app):
            thing.stop()


def access_lines(envoy: Envoy) -> list[dict[str, Any]]:
    """The access-log lines of ``envoy``'s stdout (its log file holds Envoy's own log
    lines too, which are not JSON)."""
    found = []
    for line in envoy.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "direction" in entry:
                found.append(entry)
    return found


def requests_to(lines: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("request_id") == request_id]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def test_a_request_is_logged_counted_and_keeps_its_trace_context(rig: Rig) -> None:
    rig.start()
    before = len(rig.app.seen)
    status, _, _ = rig.call({"traceparent": CLIENT_TRACEPARENT})
    assert status == 200
    [got] = rig.app.seen[before:]
    # No tracer: the client's trace context reaches the app untouched, with a request id.
    assert got["traceparent"] == CLIENT_TRACEPARENT
    request_id = got["x-request-id"]
    assert got["x-controlplane-source"] == "productpage.shop"

    # Exactly one line on each side for that request, with the fields a reader needs.
    outbound = wait_for(lambda: requests_to(access_lines(rig.caller), request_id),
                        what="the caller's access-log line")
    [out] = outbound
    assert out["direction"] == "outbound"
    assert (out["method"], out["path"], out["status"]) == ("GET", "/reviews/1?x=1", 200)
    assert out["authority"] == "reviews.shop"
    assert out["source_service"] == "productpage.shop"
    assert out["destination_service"] == "reviews.shop"
    assert out["upstream_host"] == f"127.0.0.1:{rig.callee.inbound_port}"
    assert out["upstream_cluster"] == "outbound|9080||reviews.shop.svc.cluster.local"
    assert out["traceparent"] == CLIENT_TRACEPARENT
    assert out["protocol"] == "HTTP/1.1" and out["flags"] == "-"
    assert isinstance(out["duration_ms"], int) and out["bytes_sent"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", out["start_time"])
    [inbound] = wait_for(lambda: requests_to(access_lines(rig.callee), request_id),
                         what="the callee's access-log line")
    assert inbound["direction"] == "inbound"
    assert inbound["source_service"] == "productpage.shop"
    assert inbound["destination_service"] == "reviews.shop"
    assert inbound["upstream_host"] == f"127.0.0.1:{rig.app.port}"

    # The caller's stats port: the request counted, labelled by both services.
    status, body, _ = http_get(f"http://127.0.0.1:{rig.stats_port}/stats/prometheus")
    assert status == 200
    [total] = [line for line in body.splitlines()
               if line.startswith("envoy_cluster_upstream_rq_total{")
               and 'destination_service="reviews"' in line]
    assert 'source_service="productpage"' in total and 'source_namespace="shop"' in total
    assert 'destination_namespace="shop"' in total
    assert 'envoy_cluster_name="outbound|9080||reviews.shop.svc.cluster.local"' in total
    assert int(total.rsplit(" ", 1)[1]) >= 2  # the readiness call, and this one
    assert any(line.startswith("envoy_cluster_upstream_rq_xx{") and
               'envoy_response_code_class="2"' in line and 'destination_service="reviews"'
               in line for line in body.splitlines())

    # The mesh turns access logs off: the sidecars follow, no line for the next request.
    rig.telemetry = {"access_log": {"enabled": False}}
    rig.write_mesh()

    def unlogged() -> bool:
        mark = len(rig.app.seen)
        rig.call()
        ids = [seen["x-request-id"] for seen in rig.app.seen[mark:]]
        lines = access_lines(rig.caller) + access_lines(rig.callee)
        return bool(ids) and not any(requests_to(lines, i) for i in ids)

    wait_for(unlogged, timeout=20, interval=1.0, what="a request no sidecar logged")


def test_tracing_sends_spans_to_the_collector_and_starts_traces(rig: Rig) -> None:
    collector = Collector()
    try:
        rig.telemetry = {"tracing": {"address": f"127.0.0.1:{collector.port}",
                                     "sampling": 100}}
        rig.start()
        before = len(rig.app.seen)
        assert rig.call()[0] == 200
        assert rig.call({"traceparent": CLIENT_TRACEPARENT})[0] == 200
        started, continued = rig.app.seen[before:]
        # Envoy started a trace for the first; the second keeps the client's trace id.
        trace = started["traceparent"].split("-")[1]
        assert re.fullmatch(r"[0-9a-f]{32}", trace) and trace != "0" * 32
        assert continued["traceparent"].split("-")[1] == CLIENT_TRACE
        assert continued["traceparent"] != CLIENT_TRACEPARENT  # a new span id: Envoy's

        # Both sidecars export their spans, each naming its service.
        def exported() -> set[tuple[str, str]]:
            want = {(s, t) for s in ("productpage.shop", "reviews.shop")
                    for t in (trace, CLIENT_TRACE)}
            return want if want <= set(collector.spans) else set()

        wait_for(exported, timeout=30, interval=0.5, what=f"spans at the collector; "
                 f"got {collector.spans}")
    finally:
        collector.stop()


def test_a_tcp_connection_is_logged_when_it_closes(tmp_path: Path) -> None:
    """A TCP service's sidecar logs each connection through its inbound TCP proxy: the
    keys that apply to TCP, the byte counts both ways, its own service as destination."""
    echo = socket.create_server(("127.0.0.1", 0))
    port = echo.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = echo.accept()
                with conn:
                    while data := conn.recv(4096):
                        conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    mesh = tmp_path / "mesh.yaml"
    server = ControlPlane(mesh, tmp_path)
    sidecar = Envoy(tmp_path, "db-1.shop", "db", server.xds_port,
                    extra=["--namespace", "shop"], app_port=port)
    assert sidecar.inbound_port is not None
    mesh.write_text(yaml.safe_dump({"services": [
        {"name": "db", "namespace": "shop", "port": 5432, "protocol": "tcp",
         "endpoints": [{"address": "127.0.0.1", "port": sidecar.inbound_port}]}]}))
    try:
        server.start()
        sidecar.start()

        def echoed() -> bool:
            with socket.create_connection(("127.0.0.1", sidecar.inbound_port), 3) as conn:
                conn.sendall(b"hello\n")
                return conn.recv(16) == b"hello\n"

        wait_for(echoed, what="the echo through the sidecar's TCP proxy")
        [line, *_] = wait_for(lambda: [e for e in access_lines(sidecar)
                                       if e["bytes_received"] == 6], what="a TCP line")
        assert set(line) == {"start_time", "flags", "duration_ms", "upstream_host",
                             "upstream_cluster", "bytes_received", "bytes_sent",
                             "source_service", "destination_service", "direction"}
        assert (line["direction"], line["source_service"], line["destination_service"]) == (
            "inbound", "-", "db.shop")
        assert line["bytes_sent"] == 6 and line["upstream_host"] == f"127.0.0.1:{port}"
        assert line["upstream_cluster"] == (
            f"inbound|{sidecar.inbound_port}||db.shop.svc.cluster.local")
    finally:
        sidecar.stop()
        server.stop()
        echo.close()


async def test_a_lab_sidecar_serves_labelled_stats(tmp_path: Path) -> None:
    """The lab's sidecars (controlplane lab) have a stats port like injected ones."""
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [{"name": "reviews", "port": 9080}]}))
    server = ControlPlane(mesh, tmp_path).start()
    instance = Instance(service="reviews", version="v1", node_id="reviews-v1",
                        app_port=free_port(), inbound_port=free_port(),
                        egress_port=free_port(), admin_port=free_port())
    sidecar = Sidecar(instance, tmp_path, server.xds_port)
    try:
        async with aiohttp.ClientSession() as session:
            await sidecar.start()
            await sidecar.wait_ready(session)
            async with session.get(sidecar.stats_url) as response:
                assert response.status == 200
                body = await response.text()
        assert any(line.startswith("envoy_server_live{") and
                   'source_service="reviews"' in line and
                   'source_namespace="default"' in line for line in body.splitlines())
    finally:
        await sidecar.stop()
        server.stop()
