"""Gateway telemetry end to end: a real gateway Envoy (``controlplane bootstrap
--gateway``, with a stats port as the Kubernetes deployer gives it), the real ``controlplane
serve``, real HTTP into the mesh, a real OTLP/gRPC collector.

A request through the gateway is one JSON access-log line on the gateway's stdout (the
gateway as source, the backend service as destination, ``direction: gateway``), a
counter increment in a real GET of its ``/stats/prometheus`` labelled by source and
destination service (so the mesh dashboard's outbound panels show gateway traffic), and
its trace context reaches the backend; with tracing on, the gateway starts traces and
exports spans naming itself. The mesh's ``telemetry`` block turns the log off live."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import dashboards
from tests.support.procs import ControlPlane, Envoy, free_port, http_get, wait_for
from tests.support.secure import call, write_mesh
from tests.test_dashboards_scrape import board, exposed, labels_of
from tests.test_gateway_e2e import gateway_envoy
from tests.test_telemetry_e2e import (
    CLIENT_TRACE,
    CLIENT_TRACEPARENT,
    Collector,
    HeaderBackend,
    access_lines,
    requests_to,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HOST = "shop.example.com"


class GatewayRig:
    """The web app (remembering headers) as the mesh service ``web``; a Gateway
    ``ingress`` with one HTTP listener routing ``shop.example.com`` to it; the gateway
    proxy with its stats port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh_path = tmp / "mesh.yaml"
        self.app = HeaderBackend()
        self.port = free_port()
        self.stats_port = free_port()
        self.telemetry: dict[str, Any] = {}
        self.server = ControlPlane(self.mesh_path, tmp)
        self.gateway: Envoy | None = None

    def write(self) -> None:
        write_mesh(self.mesh_path, {
            "telemetry": self.telemetry,
            "services": [{"name": "web", "port": 9080,
                          "endpoints": [{"address": "127.0.0.1", "port": self.app.port}]}],
            "gateways": [{"name": "ingress", "listeners": [
                {"name": "http", "port": self.port, "protocol": "HTTP"}]}],
            "http_routes": [{"name": "shop", "parentRefs": [{"name": "ingress"}],
                             "hostnames": [HOST],
                             "rules": [{"backendRefs": [{"name": "web", "port": 9080}]}]}],
        })

    def start(self) -> GatewayRig:
        self.write()
        self.server.start()
        self.gateway = gateway_envoy(self.tmp, "ingress-1", self.server.xds_port, extra=[
            "--admin-port", str(free_port()), "--stats-port", str(self.stats_port)]).start()
        wait_for(lambda: self.call() == 200, timeout=30, what="web through the gateway")
        return self

    def call(self, headers: dict[str, str] | None = None) -> int:
        return call(self.port, HOST, "/shop/1?x=1", headers=headers).status

    def scrape(self) -> str:
        status, body, _ = http_get(f"http://127.0.0.1:{self.stats_port}/stats/prometheus")
        assert status == 200, body
        return body

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.server.stop()
        self.app.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[GatewayRig]:
    made = GatewayRig(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def upstream_total(body: str) -> int:
    """The gateway's request count to web, by its labels; 0 before the first."""
    found = [line for line in body.splitlines()
             if line.startswith("envoy_cluster_upstream_rq_total{")
             and 'destination_service="web"' in line]
    if not found:
        return 0
    [line] = found
    assert 'source_service="ingress"' in line and 'source_namespace="default"' in line
    assert 'destination_namespace="default"' in line
    return int(line.rsplit(" ", 1)[1])


def test_a_request_through_the_gateway_is_logged_counted_and_keeps_its_trace(
        rig: GatewayRig) -> None:
    rig.start()
    assert rig.gateway is not None
    counted = upstream_total(rig.scrape())
    before = len(rig.app.seen)
    assert rig.call({"traceparent": CLIENT_TRACEPARENT}) == 200
    [got] = rig.app.seen[before:]
    # No tracer: the client's trace context reaches the backend untouched; the gateway
    # names itself as the caller, as a sidecar does.
    assert got["traceparent"] == CLIENT_TRACEPARENT
    assert got["x-controlplane-source"] == "ingress.default"
    request_id = got["x-request-id"]

    # One line for that request, the gateway as source and web as destination.
    [line] = wait_for(lambda: requests_to(access_lines(rig.gateway), request_id),
                      what="the gateway's access-log line")
    assert line["direction"] == "gateway"
    assert (line["source_service"], line["destination_service"]) == (
        "ingress.default", "web.default")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/shop/1?x=1", 200)
    assert line["authority"] == HOST
    assert line["upstream_cluster"] == "outbound|9080||web.default.svc.cluster.local"
    assert line["upstream_host"] == f"127.0.0.1:{rig.app.port}"
    assert line["traceparent"] == CLIENT_TRACEPARENT
    assert line["bytes_sent"] == 2 and line["flags"] == "-"

    # Counted on the stats port, labelled by both services.
    body = rig.scrape()
    assert upstream_total(body) == counted + 1
    assert any(line.startswith("envoy_cluster_upstream_rq_xx{")
               and 'envoy_response_code_class="2"' in line
               and 'source_service="ingress"' in line for line in body.splitlines())

    # The mesh dashboard's outbound panels (per destination, and who calls whom) and its
    # Gateways row find their metrics and labels in the gateway's scrape, histograms
    # once flushed; the Gateways row's listener prefix is the gateway's own.
    mesh = board("mesh.json")
    queries = [target["expr"] for panel in mesh["panels"]
               for target in panel.get("targets", [])
               if ("destination_service" in target["expr"]
                   and "envoy_cluster_upstream_rq" in target["expr"])
               or 'envoy_http_conn_manager_prefix=~"gateway_.*"' in target["expr"]]
    assert len(queries) > 5
    assert any(line.startswith("envoy_http_downstream_rq_total{")
               and re.search(r'envoy_http_conn_manager_prefix="gateway_\d+"', line)
               and 'source_service="ingress"' in line for line in body.splitlines())

    def dashboard_series() -> bool:
        found = exposed(rig.scrape())
        for expr in queries:
            for metric in dashboards.metric_names(expr):
                assert metric in found, f"{metric} not in the gateway's scrape"
                missing = labels_of(expr) - found[metric]
                assert not missing, f"{metric} lacks {sorted(missing)}: {expr}"
        return True

    wait_for(dashboard_series, timeout=30, interval=0.5,
             what="the mesh dashboard's outbound series in the gateway's scrape")

    # The mesh turns the access log off: the gateway follows, no line for new requests.
    rig.telemetry = {"access_log": {"enabled": False}}
    rig.write()

    def unlogged() -> bool:
        mark = len(rig.app.seen)
        rig.call()
        ids = [seen["x-request-id"] for seen in rig.app.seen[mark:]]
        assert rig.gateway is not None
        return bool(ids) and not any(requests_to(access_lines(rig.gateway), i) for i in ids)

    wait_for(unlogged, timeout=20, interval=1.0, what="a request the gateway did not log")


def test_gateway_tracing_starts_traces_and_exports_its_spans(rig: GatewayRig) -> None:
    """Tracing on for the gateway's namespace: a request without trace context gets one
    started at the gateway, one with it keeps its trace id, and the gateway's spans
    reach the collector under its own name."""
    collector = Collector()
    try:
        rig.telemetry = {"namespaces": {"default": {"tracing": {
            "address": f"127.0.0.1:{collector.port}", "sampling": 100}}}}
        rig.start()
        before = len(rig.app.seen)
        assert rig.call() == 200
        assert rig.call({"traceparent": CLIENT_TRACEPARENT}) == 200
        started, continued = rig.app.seen[before:]
        trace = started["traceparent"].split("-")[1]
        assert re.fullmatch(r"[0-9a-f]{32}", trace) and trace != "0" * 32
        assert continued["traceparent"].split("-")[1] == CLIENT_TRACE

        def exported() -> bool:
            return {("ingress.default", trace), ("ingress.default", CLIENT_TRACE)} <= set(
                collector.spans)

        wait_for(exported, timeout=30, interval=0.5,
                 what=f"the gateway's spans at the collector; got {collector.spans}")
    finally:
        collector.stop()
