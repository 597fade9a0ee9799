"""End to end: real Envoy sidecars from `controlplane bootstrap`, the real
`controlplane serve` process, real HTTP through the egress listener to real backends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.procs import Backend, ControlPlane, Envoy, http_get, stop_all, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def write_mesh(path: Path, services: dict[str, list[Backend]]) -> None:
    """Write atomically (as editors do), so the server never reads half a file."""
    mesh = {"services": [
        {"name": name, "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": b.port, "labels": {"app": b.name}}
                       for b in backends]}
        for name, backends in services.items()]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(mesh))
    tmp.replace(path)


def answers(envoy: Envoy, host: str, count: int = 20) -> set[str]:
    seen = set()
    for _ in range(count):
        status, body, _ = envoy.request(host)
        if status == 200:
            seen.add(body)
    return seen


def sent_versions(server: ControlPlane, node_id: str) -> dict[str, str]:
    [proxy] = [p for p in server.json("/debug/proxies") if p["node_id"] == node_id]
    return {kind: state["sent_version"] for kind, state in proxy["types"].items()}


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.backends: list[Backend] = []
        self.envoys: list[Envoy] = []
        self.server: ControlPlane | None = None

    def backend(self, name: str) -> Backend:
        backend = Backend(name)
        self.backends.append(backend)
        return backend

    def serve(self) -> ControlPlane:
        self.server = ControlPlane(self.mesh, self.tmp).start()
        return self.server

    def envoy(self, node_id: str, delta: bool, service: str = "frontend",
              extra: list[str] | None = None, app_port: int | None = None) -> Envoy:
        assert self.server is not None
        envoy = Envoy(self.tmp, node_id, service, self.server.xds_port, delta, extra,
                      app_port=app_port).start()
        self.envoys.append(envoy)
        return envoy

    def close(self) -> None:
        stop_all(self.envoys, self.server, self.backends)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_routes_by_host_and_follows_mesh_changes(lab: Lab, delta: bool) -> None:
    r1, r2, rt = lab.backend("reviews-1"), lab.backend("reviews-2"), lab.backend("ratings-1")
    write_mesh(lab.mesh, {"reviews": [r1, r2], "ratings": [rt]})
    server = lab.serve()
    envoy = lab.envoy("frontend-1", delta)

    wait_for(lambda: answers(envoy, "reviews") == {"reviews-1", "reviews-2"},
             what="reviews answered by both backends")
    for host in ("ratings", "ratings.default", "ratings.default.svc",
                 "ratings.default.svc.cluster.local", "ratings.default.svc.cluster.local:9080",
                 "ratings:9080"):
        assert envoy.request(host)[1] == "ratings-1", host
    assert envoy.request("nosuch.default")[0] == 404

    # The server sees the proxy, its protocol, and ACKs for every type.
    proxies = server.json("/debug/proxies")
    [proxy] = [p for p in proxies if p["node_id"] == "frontend-1"]
    assert proxy["protocol"] == ("delta" if delta else "sotw")
    for kind in ("cds", "eds", "lds", "rds"):
        assert proxy["types"][kind]["acked_version"], kind
        assert proxy["types"][kind]["last_nack"] is None, kind
    opened = [line for line in server.logs() if line.get("event") == "xds.stream_opened"]
    assert opened and opened[0]["node_id"] == "frontend-1" and opened[0]["stream_id"] >= 1
    assert opened[0]["protocol"] == proxy["protocol"]
    dump = server.json("/debug/config_dump?node=frontend-1")
    assert {c["name"] for c in dump["resources"]["clusters"]} >= {
        "outbound|9080||reviews.default.svc.cluster.local"}

    # A changed mesh reaches the sidecar within seconds.
    rt2 = lab.backend("ratings-2")
    changed = time.monotonic()
    write_mesh(lab.mesh, {"reviews": [r1, r2], "ratings": [rt2]})
    wait_for(lambda: answers(envoy, "ratings", 5) == {"ratings-2"}, timeout=10,
             what="ratings moved to the new backend")
    print(f"converged in {time.monotonic() - changed:.2f}s")

    # A new service appears; a removed one goes away.
    write_mesh(lab.mesh, {"reviews": [r1], "details": [rt2]})
    wait_for(lambda: answers(envoy, "details", 3) == {"ratings-2"}, what="details routed")
    wait_for(lambda: envoy.request("ratings")[0] == 404, what="ratings removed")
    assert answers(envoy, "reviews") == {"reviews-1"}


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_bad_mesh_keeps_the_last_good_config(lab: Lab, delta: bool) -> None:
    backend = lab.backend("reviews-1")
    write_mesh(lab.mesh, {"reviews": [backend]})
    server = lab.serve()
    envoy = lab.envoy("frontend-1", delta)
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-1", what="first route")
    sent = sent_versions(server, "frontend-1")

    lab.mesh.write_text("services:\n  - name: reviews\n    port: 99999\n")
    wait_for(lambda: any(line.get("event") == "mesh.invalid" for line in server.logs()),
             what="the server to log the bad mesh")
    [error] = [line for line in server.logs() if line.get("event") == "mesh.invalid"]
    assert any("services[0] (reviews.default).port" in p for p in error["problems"])
    # A rejected mesh is never translated: nothing was or will be sent for it.
    assert sent_versions(server, "frontend-1") == sent
    assert answers(envoy, "reviews", 10) == {"reviews-1"}
    assert sent_versions(server, "frontend-1") == sent
    assert server.get("/readyz")[0] == 200

    fixed = lab.backend("reviews-2")
    write_mesh(lab.mesh, {"reviews": [fixed]})
    wait_for(lambda: answers(envoy, "reviews", 3) == {"reviews-2"}, what="recovery")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_and_server_restarts_converge(lab: Lab, delta: bool) -> None:
    b1 = lab.backend("reviews-1")
    write_mesh(lab.mesh, {"reviews": [b1]})
    server = lab.serve()
    envoy = lab.envoy("frontend-1", delta)
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-1", what="first route")

    # Envoy restarts: it gets its config again.
    envoy.stop()
    envoy.start()
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-1", what="route after envoy restart")

    # The server restarts on the same port, with a changed mesh meanwhile.
    server.stop()
    assert envoy.request("reviews")[1] == "reviews-1"  # Envoy keeps serving its last config
    b2 = lab.backend("reviews-2")
    write_mesh(lab.mesh, {"reviews": [b2]})
    server.start()
    wait_for(lambda: answers(envoy, "reviews", 3) == {"reviews-2"}, timeout=30,
             what="route after server restart")
    wait_for(lambda: any(p["node_id"] == "frontend-1" for p in server.json("/debug/proxies")),
             what="proxy reconnected")


def test_many_sidecars_and_an_inbound_listener(lab: Lab) -> None:
    app = lab.backend("reviews-app")
    write_mesh(lab.mesh, {"reviews": [app]})
    lab.serve()
    sotw = lab.envoy("frontend-1", delta=False)
    delta = lab.envoy("frontend-2", delta=True)
    sidecar = lab.envoy("reviews-1", delta=False, service="reviews", app_port=app.port)
    inbound = sidecar.inbound_port
    for envoy in (sotw, delta):
        wait_for(lambda e=envoy: e.request("reviews")[1] == "reviews-app", what="egress route")
    wait_for(lambda: http_get(f"http://127.0.0.1:{inbound}/")[1] == "reviews-app",
             what="inbound listener to the app")
    assert sidecar.stat("http.inbound.downstream_rq_completed") >= 1


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_real_nack_is_recorded_and_not_resent(lab: Lab, delta: bool) -> None:
    """Envoy cannot bind an inbound port that is taken, rejects that listener and says
    so; the server records the NACK, does not send the rejected version again, and the
    rest of the config keeps working and following the mesh."""
    app = lab.backend("reviews-app")
    write_mesh(lab.mesh, {"reviews": [app]})
    server = lab.serve()
    taken = app.port  # the app itself listens here, so Envoy cannot bind it
    envoy = lab.envoy("reviews-1", delta, service="reviews",
                      extra=["--inbound-port", str(taken), "--app-port", str(app.port),
                             "--inbound-address", "127.0.0.1"])

    def lds_nack() -> dict[str, object] | None:
        [proxy] = [p for p in server.json("/debug/proxies") if p["node_id"] == "reviews-1"]
        nack = proxy["types"]["lds"]["last_nack"]
        return proxy if nack else None

    proxy = wait_for(lds_nack, what="the LDS NACK to be recorded")
    lds = proxy["types"]["lds"]
    assert "inbound" in lds["last_nack"]["error"] or "bind" in lds["last_nack"]["error"].lower()
    assert lds["last_nack"]["version"] == lds["sent_version"]
    pushes = lds["pushes"]

    # The egress side works, and follows a mesh change; LDS is not re-sent meanwhile.
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-app", what="egress route")
    other = lab.backend("ratings-1")
    write_mesh(lab.mesh, {"reviews": [app], "ratings": [other]})
    wait_for(lambda: envoy.request("ratings")[1] == "ratings-1", what="new service routed")
    [after] = [p for p in server.json("/debug/proxies") if p["node_id"] == "reviews-1"]
    assert after["types"]["lds"]["pushes"] == pushes
    assert 'controlplane_xds_nacks_total{type="lds"}' in server.get("/metrics")[1]
