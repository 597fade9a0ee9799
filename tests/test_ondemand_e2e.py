"""On-demand sidecars end to end: the real `controlplane serve`, a real Envoy from
`controlplane bootstrap --on-demand`, real HTTP through its egress listener.

The sidecar starts with nothing of the mesh; the first call to a service fetches its
virtual host and cluster (VHDS, on-demand CDS) and succeeds; what the app never calls
is never sent; what it fetched stays up to date."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support.files import write_atomic
from tests.support.procs import Backend, ControlPlane, Envoy, http_get, stop_all, wait_for
from tests.support.promise_servers import ECHO_UNARY, GrpcEcho

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
RATINGS = "outbound|9080||ratings.default.svc.cluster.local"
DETAILS = "outbound|9080||details.default.svc.cluster.local"


class _At:
    """A service endpoint that is not a Backend (any object with a ``port``)."""

    def __init__(self, port: int) -> None:
        self.port = port


def write_mesh(path: Path, services: dict[str, Any], extra: dict[str, Any] | None = None
               ) -> None:
    """Write atomically (as editors do), so the server never reads half a file."""
    mesh: dict[str, Any] = {"services": [
        {"name": name, "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": backend.port}]}
        for name, backend in services.items()], **(extra or {})}
    write_atomic(path, yaml.safe_dump(mesh))


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.backends = {name: Backend(name) for name in ("reviews", "ratings", "details")}
        self.server: ControlPlane | None = None
        self.envoys: list[Envoy] = []

    def start(self, extra: dict[str, Any] | None = None,
              ports: dict[str, int] | None = None) -> tuple[ControlPlane, Envoy]:
        """``ports``: services whose endpoint is some other server of the test's."""
        backends: dict[str, Any] = {**self.backends, "frontend": self.backends["details"]}
        for name, port in (ports or {}).items():
            backends[name] = _At(port)
        write_mesh(self.mesh, backends, extra)
        self.server = ControlPlane(self.mesh, self.tmp).start()
        envoy = Envoy(self.tmp, "frontend-1", "frontend", self.server.xds_port,
                      extra=["--on-demand"]).start()
        self.envoys.append(envoy)
        return self.server, envoy

    def close(self) -> None:
        stop_all(self.envoys, self.server, self.backends.values())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.close()


def clusters(envoy: Envoy) -> set[str]:
    """The clusters the sidecar holds (its admin API), the xDS server's own left out."""
    _, body, _ = envoy.admin("/clusters?format=json")
    return {c["name"] for c in json.loads(body)["cluster_statuses"]} - {"xds_cluster"}


def virtual_hosts(envoy: Envoy) -> set[str]:
    """The virtual hosts of the sidecar's egress route table (its config dump)."""
    _, body, _ = envoy.admin("/config_dump?resource=dynamic_route_configs")
    found = set()
    for config in json.loads(body)["configs"]:
        for host in config["route_config"].get("virtual_hosts", []):
            found.add(host["name"])
    return found


def test_first_call_succeeds_and_only_then_is_its_config_in_the_sidecar(rig: Rig) -> None:
    server, envoy = rig.start()
    assert clusters(envoy) == set() and virtual_hosts(envoy) == set()

    started = time.monotonic()
    status, body, _ = envoy.request("reviews")
    first_call = time.monotonic() - started
    assert (status, body) == (200, "reviews")  # no 404 on first use
    print(f"first call through the on-demand sidecar: {first_call * 1000:.0f} ms")
    assert clusters(envoy) == {REVIEWS}
    assert virtual_hosts(envoy) == {"egress/reviews.default"}

    # Another name of another service: fetched in turn; details is never called.
    assert envoy.request("ratings.default.svc.cluster.local:9080")[:2] == (200, "ratings")
    assert envoy.request("reviews:9080")[:2] == (200, "reviews")  # known host, other alias
    assert clusters(envoy) == {REVIEWS, RATINGS}
    assert virtual_hosts(envoy) == {"egress/reviews.default", "egress/ratings.default"}

    # The server sent nothing else: what the stream subscribed to, and only that.
    [proxy] = [p for p in server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    assert proxy["group"].endswith("~on-demand")
    assert sorted(proxy["types"]["cds"]["subscribed"]) == sorted([REVIEWS, RATINGS])
    assert sorted(proxy["types"]["eds"]["subscribed"]) == sorted([REVIEWS, RATINGS])
    for kind in ("cds", "eds", "lds", "rds", "vhds"):
        assert proxy["types"][kind]["last_nack"] is None, kind
    assert DETAILS not in clusters(envoy)


def test_a_host_nobody_serves_gets_404_at_once_every_time(rig: Rig) -> None:
    _, envoy = rig.start()
    for _ in range(3):  # asked again each time: never a hang (http_get gives up at 3 s)
        started = time.monotonic()
        assert envoy.request("nosuch.default")[0] == 404
        print(f"404 for an unknown host in {(time.monotonic() - started) * 1000:.0f} ms")
    assert envoy.request("reviews")[:2] == (200, "reviews")  # and the rest still works
    assert clusters(envoy) == {REVIEWS}


def test_a_fetched_service_follows_mesh_changes(rig: Rig) -> None:
    _, envoy = rig.start()
    assert envoy.request("reviews")[:2] == (200, "reviews")

    moved = Backend("reviews-moved")
    rig.backends["reviews-moved"] = moved
    services = {"reviews": moved, "ratings": rig.backends["ratings"],
                "details": rig.backends["details"], "frontend": rig.backends["details"]}
    write_mesh(rig.mesh, services)
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-moved", timeout=20,
             what="the fetched service's new endpoint in the sidecar")

    # A service removed from the mesh goes from the sidecar too (its virtual host).
    del services["reviews"]
    write_mesh(rig.mesh, services)
    wait_for(lambda: envoy.request("reviews")[0] == 404, timeout=20,
             what="the removed service's virtual host gone")
    assert "egress/reviews.default" not in virtual_hosts(envoy)


def test_it_fetches_only_what_it_may_see_and_splits_work_on_demand(rig: Rig) -> None:
    """Scoping still applies (a ``sidecars`` entry lets frontend reach reviews only), and
    a split service's subset clusters are fetched as the split picks them."""
    v1, v2 = Backend("reviews-v1"), Backend("reviews-v2")
    rig.backends.update({"reviews-v1": v1, "reviews-v2": v2})
    rig.start()
    assert rig.server is not None
    mesh = yaml.safe_load(rig.mesh.read_text())
    [reviews] = [s for s in mesh["services"] if s["name"] == "reviews"]
    reviews["endpoints"] = [
        {"address": "127.0.0.1", "port": v1.port, "labels": {"version": "v1"}},
        {"address": "127.0.0.1", "port": v2.port, "labels": {"version": "v2"}}]
    reviews["policy"] = {"split": [{"labels": {"version": "v1"}, "weight": 50},
                                   {"labels": {"version": "v2"}, "weight": 50}]}
    mesh["sidecars"] = [{"name": "frontend", "namespace": "default",
                         "workloadSelector": {"service": "frontend"},
                         "egress": [{"hosts": ["./reviews"]}]}]
    write_atomic(rig.mesh, yaml.safe_dump(mesh))
    [envoy] = rig.envoys

    def both() -> bool:
        seen = {envoy.request("reviews")[1] for _ in range(20)}
        return seen == {"reviews-v1", "reviews-v2"}

    wait_for(both, timeout=20, what="reviews split over v1 and v2, fetched on demand")
    held = clusters(envoy)
    assert held >= {"outbound|9080|version=v1|reviews.default.svc.cluster.local",
                    "outbound|9080|version=v2|reviews.default.svc.cluster.local"}
    assert all("reviews.default" in name for name in held), held
    assert envoy.request("ratings")[0] == 404  # not visible to frontend: never fetched
    assert RATINGS not in clusters(envoy)


class _EchoPost(http.server.ThreadingHTTPServer):
    """Answers a POST with the length of the body it received."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                size = len(self.rfile.read(int(self.headers.get("content-length", "0"))))
                body = f"got {size}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_first_call_with_a_body_is_held_and_delivered_whole(rig: Rig) -> None:
    """The request's headers and body in one packet: Envoy holds both while it fetches
    the virtual host and the cluster, then delivers them."""
    echo = _EchoPost()
    try:
        _, envoy = rig.start(ports={"reviews": int(echo.server_address[1])})
        body = b"x" * 3000
        with socket.create_connection(("127.0.0.1", envoy.egress_port), timeout=5) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n"
                         b"Content-Length: 3000\r\n\r\n" + body)
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert answer.endswith(b"got 3000")
        assert clusters(envoy) == {REVIEWS}
    finally:
        echo.shutdown()
        echo.server_close()


def test_after_a_server_restart_what_was_fetched_stays_current_and_fetching_works(
        rig: Rig) -> None:
    """The sidecar reconnects saying what it holds (virtual hosts, clusters, the aliases
    it asked for): nothing of it is lost, and updates and new fetches work as before."""
    server, envoy = rig.start()
    assert envoy.request("reviews")[:2] == (200, "reviews")
    assert envoy.request("nowhere")[0] == 404
    server.stop()
    server.start()
    wait_for(lambda: any(p["node_id"] == "frontend-1" for p in server.json("/debug/proxies")),
             timeout=20, what="the sidecar back on the restarted server")
    assert envoy.request("reviews")[:2] == (200, "reviews")
    assert envoy.request("ratings")[:2] == (200, "ratings")  # a first fetch after it
    assert envoy.request("nowhere")[0] == 404

    moved = Backend("reviews-moved")
    rig.backends["reviews-moved"] = moved
    write_mesh(rig.mesh, {"reviews": moved, "ratings": rig.backends["ratings"],
                          "details": rig.backends["details"],
                          "frontend": rig.backends["details"]})
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-moved", timeout=20,
             what="an update of what was fetched before the restart")
    assert clusters(envoy) == {REVIEWS, RATINGS}
    [proxy] = [p for p in server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    for kind in ("cds", "eds", "lds", "rds", "vhds"):
        assert proxy["types"][kind]["last_nack"] is None, kind


def test_a_first_call_during_a_server_outage_waits_for_the_server_and_then_succeeds(
        rig: Rig) -> None:
    """What was fetched keeps working while the server is down; a first call to a new
    service is held (Envoy's VHDS has no fetch timeout) until the server is back, then
    answered. Why on demand is not the default: see the README."""
    server, envoy = rig.start()
    assert envoy.request("reviews")[:2] == (200, "reviews")
    server.stop()
    assert envoy.request("reviews")[:2] == (200, "reviews")  # held config still serves

    result: list[Any] = []

    def call() -> None:
        try:
            result.append(http_get(f"http://127.0.0.1:{envoy.egress_port}/", host="ratings",
                                   timeout=60)[:2])
        except Exception as exc:  # reported below
            result.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    time.sleep(2)
    assert not result, result  # still held: nothing to fetch it from
    server.start()
    caller.join(60)
    assert result == [(200, "ratings")]


def test_grpc_and_named_ports_are_fetched_on_demand_too(rig: Rig) -> None:
    """HTTP/2 (gRPC, by ``:authority``) and a service with named ports: each port's
    virtual host and cluster is fetched on its first call, and succeeds."""
    rpc = GrpcEcho("rpc")
    try:
        mesh = {"services": [
            {"name": "api", "ports": [{"name": "http", "port": 80, "protocol": "http"},
                                      {"name": "rpc", "port": 9090, "protocol": "grpc"}],
             "endpoints": [{"address": "127.0.0.1",
                            "ports": {"http": rig.backends["reviews"].port,
                                      "rpc": rpc.port}}]},
            {"name": "frontend", "port": 9080, "endpoints": []}]}
        rig.mesh.write_text(yaml.safe_dump(mesh))
        rig.server = ControlPlane(rig.mesh, rig.tmp).start()
        envoy = Envoy(rig.tmp, "frontend-1", "frontend", rig.server.xds_port,
                      extra=["--on-demand"]).start()
        rig.envoys.append(envoy)
        with grpc.insecure_channel(f"127.0.0.1:{envoy.egress_port}",
                                   options=[("grpc.default_authority", "api:9090")]) as channel:
            assert channel.unary_unary(ECHO_UNARY)(b"hi", timeout=10) == b"rpc:hi"
        assert clusters(envoy) == {"outbound|9090||api.default.svc.cluster.local"}
        assert envoy.request("api")[:2] == (200, "reviews")  # the first port, bare name
        assert virtual_hosts(envoy) == {"egress/api.default:9090", "egress/api.default:80"}
    finally:
        rpc.stop()
