"""A real Envoy's NACK reaches the object it comes from: in file mode /debug/rejections
and the ``xds.nack_origin`` line name the service; with the Kubernetes source (the API
server double) the TrafficPolicy that shaped the rejected route gets ``Programmed:
False`` with Envoy's error and the proxy count, and ``True`` once the proxy accepts.

Our validation lets no policy through that a stock Envoy refuses (the translator's
golden and property tests run Envoy's own validation over it), so the NACKs here have
real causes outside the policy's fields, as in production:

- file mode: the sidecar's inbound listener cannot bind its port (another process
  holds it): Envoy names the ``inbound`` listener, whose service is the sidecar's own;
- Kubernetes, TrafficPolicy: an Envoy built without an extension a policy needs (a trimmed custom
  build; here the stock binary with ``--disable-extensions``): a TrafficPolicy with
  retries brings the previous-hosts retry predicate into the route table, Envoy
  refuses the table and names no virtual host, so the origin is the virtual host that
  changed since the table it last ACKed;
- Kubernetes, SecurityPolicy: its rules are in the sidecar's inbound listener, whose
  port is taken, as in file mode.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.lab.envoy import envoy_command
from controlplane.sources.kubernetes.kinds import SECURITY_POLICIES, TRAFFIC_POLICIES
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import security_policy, service, traffic_policy
from tests.support import procs
from tests.support.procs import Backend, ControlPlane, Envoy, http_get, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port held by a listening socket: Envoy cannot bind it."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    yield holder
    holder.close()


def sidecar(tmp: Path, server: ControlPlane, port: int, app: Backend) -> Envoy:
    return Envoy(tmp, "reviews-1", "reviews", server.xds_port,
                 extra=["--inbound-port", str(port), "--app-port", str(app.port),
                        "--inbound-address", "127.0.0.1"]).start()


def write_mesh(path: Path, app: Backend, rate: float) -> None:
    mesh = {"services": [{"name": "reviews", "port": 9080,
                          "policy": {"rate_limit": {"requests_per_second": rate}},
                          "endpoints": [{"address": "127.0.0.1", "port": app.port}]}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(mesh))
    tmp.replace(path)


def objects(server: ControlPlane) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = server.json("/debug/rejections")["objects"]
    return found


def nacks_gauge(server: ControlPlane) -> float:
    for line in server.get("/metrics")[1].splitlines():
        if line.startswith("controlplane_proxy_nacks "):
            return float(line.split()[1])
    raise AssertionError("controlplane_proxy_nacks is not exported")


def test_file_mode_names_the_service_of_a_real_nack(tmp_path: Path,
                                                     taken: socket.socket) -> None:
    app = Backend("reviews-app")
    mesh = tmp_path / "mesh.yaml"
    write_mesh(mesh, app, 50)
    server = ControlPlane(mesh, tmp_path).start()
    envoy = None
    try:
        port = taken.getsockname()[1]
        envoy = sidecar(tmp_path, server, port, app)
        [found] = wait_for(lambda: objects(server), what="the rejection traced")
        assert (found["kind"], found["namespace"], found["name"]) == ("Service", "default",
                                                                      "reviews")
        assert found["proxies"] == 1 and found["types"] == ["lds"]
        assert f"cannot bind '127.0.0.1:{port}'" in found["error"]
        [standing] = server.json("/debug/rejections")["rejections"]
        assert standing["node_id"] == "reviews-1" and standing["services"] == [
            "default/reviews"]
        assert nacks_gauge(server) == 1
        lines = [e for e in server.logs() if e.get("event") == "xds.nack_origin"]
        assert lines and lines[0]["origin"] == "service default/reviews"
        assert lines[0]["node_id"] == "reviews-1" and lines[0].get("level") == "warning"

        envoy.stop()  # a proxy that leaves rejects nothing any more
        wait_for(lambda: not objects(server), what="the rejection cleared by the close")
        assert nacks_gauge(server) == 0
        assert server.get("/debug/rejections")[2].get("Content-Type", "").startswith(
            "application/json")
    finally:
        if envoy is not None:
            envoy.stop()
        server.stop()
        app.stop()


def programmed(api: ApiServerDouble) -> dict[str, Any]:
    status = api.get(TRAFFIC_POLICIES, "default", "reviews-policy").get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Programmed"), {})


RETRY_PREDICATE = "envoy.retry_host_predicates.previous_hosts"


def test_kubernetes_trafficpolicy_gets_programmed_false_then_true(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "envoy_command", lambda config, **kw: [
        *envoy_command(config, **kw), "--disable-extensions",
        f"envoy.retry_host_predicates/{RETRY_PREDICATE}"])
    api = ApiServerDouble(bookmark_interval=0.5).start()
    server = None
    envoy = None

    def policy(spec: dict[str, Any]) -> None:
        api.apply(traffic_policy("reviews-policy", "reviews", spec).build())

    try:
        api.create(service("reviews").port(9080, name="http", target="http").build())
        policy({"timeout": "2s"})
        server = ControlPlane("kubernetes", tmp_path, env={"CONTROLPLANE_DEBOUNCE_QUIET": "0.1"},
                              extra=["--kubeconfig", str(api.kubeconfig(tmp_path / "kc")),
                                     "--authentication", "none"]).start()
        wait_for(lambda: programmed(api).get("status") == "True",
                 what="Programmed True before any proxy")
        envoy = Envoy(tmp_path, "frontend-1", "frontend", server.xds_port).start()
        wait_for(lambda: "reviews.default" in envoy.admin("/config_dump")[1],
                 what="the route table with reviews taken")

        policy({"timeout": "2s", "retries": {"attempts": 2}})
        condition = wait_for(lambda: (c := programmed(api)).get("status") == "False" and c,
                             timeout=20, what="Programmed False after the NACK")
        assert condition["reason"] == "Rejected"
        message = condition["message"]
        assert message.startswith("rejected by 1 proxy (rds): "), message
        assert f"Didn't find a registered implementation for '{RETRY_PREDICATE}'" in message
        assert "seen by replica" in message
        tp = api.get(TRAFFIC_POLICIES, "default", "reviews-policy")
        assert condition["observedGeneration"] == tp["metadata"]["generation"]
        accepted = [c for c in tp["status"]["conditions"] if c["type"] == "Accepted"]
        assert accepted and accepted[0]["status"] == "True"  # the other conditions stay
        rejected = server.json("/debug/rejections")["objects"]
        assert {(o["kind"], o["name"]) for o in rejected} == {
            ("Service", "reviews"), ("TrafficPolicy", "reviews-policy")}

        policy({"timeout": "3s"})  # the fix: no retries, which this Envoy cannot do
        condition = wait_for(lambda: (c := programmed(api)).get("status") == "True" and c,
                             timeout=20, what="Programmed True once the proxy accepts")
        assert condition["reason"] == "Programmed"
        assert condition["message"] == "every proxy that uses it accepted it"
        assert not server.json("/debug/rejections")["objects"]
    finally:
        if envoy is not None:
            envoy.stop()
        if server is not None:
            server.stop()
        api.stop()


def test_kubernetes_securitypolicy_of_a_rejected_inbound_listener(
        tmp_path: Path, taken: socket.socket) -> None:
    """The SecurityPolicy's rules are in the sidecar's inbound listener; that listener's
    port is taken, Envoy rejects it: the SecurityPolicy says so until the port is free
    and an edit of the rules sends the listener again."""
    api = ApiServerDouble(bookmark_interval=0.5).start()
    app = Backend("reviews-app")
    server = None
    envoy = None

    def rules(path: str) -> None:
        api.apply(security_policy("reviews-authz", "reviews").rule(
            "no-admin", action="deny", to=[{"paths": [{"prefix": path}]}]).build())

    def condition() -> dict[str, Any]:
        status = api.get(SECURITY_POLICIES, "default", "reviews-authz").get("status") or {}
        return next((c for c in status.get("conditions") or []
                     if c["type"] == "Programmed"), {})

    try:
        api.create(service("reviews").port(9080, name="http", target="http").build())
        rules("/admin")
        server = ControlPlane("kubernetes", tmp_path, env={"CONTROLPLANE_DEBOUNCE_QUIET": "0.1"},
                              extra=["--kubeconfig", str(api.kubeconfig(tmp_path / "kc")),
                                     "--authentication", "none"]).start()
        port = taken.getsockname()[1]
        envoy = sidecar(tmp_path, server, port, app)
        found = wait_for(lambda: (c := condition()).get("status") == "False" and c,
                         timeout=20, what="Programmed False after the NACK")
        assert found["reason"] == "Rejected"
        assert found["message"].startswith("rejected by 1 proxy (lds): Error adding/updating "
                                           f"listener(s) inbound: cannot bind '127.0.0.1:{port}'")

        taken.close()
        rules("/internal")  # the rules change, the listener is sent again and binds
        found = wait_for(lambda: (c := condition()).get("status") == "True" and c,
                         timeout=20, what="Programmed True once the listener binds")
        assert found["message"] == "every proxy that uses it accepted it"
        inbound = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{inbound}/internal")[0] == 403,
                 what="the new rule enforced by the listener now bound")
        assert http_get(f"{inbound}/")[1] == "reviews-app"
    finally:
        if envoy is not None:
            envoy.stop()
        if server is not None:
            server.stop()
        api.stop()
        app.stop()
