""""What a sidecar gets" and the server's settings, shown with real traffic: named
ports routed as ``svc.ns:PORT``, endpoint conditions (ready, draining, left out), a
service without endpoints keeping its cluster, an explicit ``max_retries`` limit, and
settings read from the environment, a flag winning over it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import pytest

from tests.support.procs import Envoy, wait_for
from tests.support.promise_rig import Rig, cluster_stat, service
from tests.support.promise_servers import ECHO_UNARY, GrpcEcho, ScriptedHttp, always

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def test_named_ports_route_by_port(lab: Rig) -> None:
    """``api`` has three named ports; one endpoint serves all, one only ``http``. The
    bare name takes the first port; ``api:PORT`` and ``api.ns:PORT`` each port."""
    web, web2, admin = (lab.own(ScriptedHttp(n)) for n in ("web", "web-2", "admin"))
    rpc = lab.own(GrpcEcho("rpc"))
    lab.serve([{"name": "api", "ports": [
        {"name": "http", "port": 80, "protocol": "http"},
        {"name": "admin", "port": 8081, "protocol": "http"},
        {"name": "rpc", "port": 9090, "protocol": "grpc"}],
        "endpoints": [
            {"address": "127.0.0.1", "ports": {"http": web.port, "admin": admin.port,
                                               "rpc": rpc.port}},
            {"address": "127.0.0.1", "ports": {"http": web2.port}}]}])
    envoy = lab.envoy("frontend-1")
    wait_for(lambda: {envoy.request("api")[1] for _ in range(4)} == {"web", "web-2"},
             what="the first port, on both endpoints")
    for host in ("api:80", "api.default", "api.default.svc.cluster.local:80"):
        assert {envoy.request(host)[1] for _ in range(4)} == {"web", "web-2"}, host
    for host in ("api:8081", "api.default:8081", "api.default.svc.cluster.local:8081"):
        assert {envoy.request(host)[1] for _ in range(4)} == {"admin"}, host
    assert cluster_stat(envoy, "api", "membership_total", port=8081) == 1
    with grpc.insecure_channel(f"127.0.0.1:{envoy.egress_port}",
                               options=[("grpc.default_authority", "api:9090")]) as channel:
        assert channel.unary_unary(ECHO_UNARY)(b"hi", timeout=10) == b"rpc:hi"


def test_endpoint_conditions_and_an_empty_service(lab: Rig) -> None:
    """Ready takes traffic; serving + terminating is DRAINING (known, no new requests);
    not serving is left out. A service whose endpoints all go keeps its cluster and
    answers 503, and gets them back without a new cluster."""
    ready, draining, gone = (lab.own(ScriptedHttp(n)) for n in ("ready", "draining", "gone"))
    lab.serve([{"name": "reviews", "port": 9080, "endpoints": [
        {"address": "127.0.0.1", "port": ready.port},
        {"address": "127.0.0.1", "port": draining.port, "ready": False, "serving": True,
         "terminating": True},
        {"address": "127.0.0.1", "port": gone.port, "ready": False, "serving": False}]}])
    envoy = lab.envoy("frontend-1")
    wait_for(lambda: envoy.request("reviews")[1] == "ready", what="reviews routed")
    assert {envoy.request("reviews")[1] for _ in range(20)} == {"ready"}
    assert draining.calls == gone.calls == 0
    _, clusters, _ = envoy.admin("/clusters?format=json")
    hosts = {h["address"]["socket_address"]["port_value"]: h["health_status"]
             for c in json.loads(clusters)["cluster_statuses"]
             if c["name"] == "outbound|9080||reviews.default.svc.cluster.local"
             for h in c.get("host_statuses", [])}
    assert set(hosts) == {ready.port, draining.port}, hosts
    assert hosts[draining.port].get("eds_health_status") == "DRAINING", hosts
    assert hosts[ready.port].get("eds_health_status") == "HEALTHY", hosts

    created = envoy.stat("cluster_manager.cluster_added")
    lab.write([service("reviews", [])])
    wait_for(lambda: envoy.request("reviews")[0] == 503, what="no endpoint left")
    assert cluster_stat(envoy, "reviews", "membership_total") == 0
    lab.write([service("reviews", [ready])])
    wait_for(lambda: envoy.request("reviews")[1] == "ready", what="the endpoint back")
    assert envoy.stat("cluster_manager.cluster_added") == created  # the same cluster


def test_max_retries_caps_concurrent_retries(lab: Rig) -> None:
    """Ten callers at once against an always-503 host with 3 retries each: unset,
    max_retries is 1024 and all 30 retries happen; at 1, most overflow."""
    capped, free = lab.own(ScriptedHttp("capped", always(503, 0.3))), lab.own(
        ScriptedHttp("free", always(503, 0.3)))
    retries = {"attempts": 3, "on": ["5xx"], "backoff": {"base_interval": "10ms"}}
    lab.serve([
        service("capped", [capped], policy={"retries": retries,
                                            "circuit_breaker": {"max_retries": 1}}),
        service("free", [free], policy={"retries": retries})])
    envoy = lab.envoy("frontend-1")
    wait_for(lambda: cluster_stat(envoy, "capped", "membership_total") == 1
             and cluster_stat(envoy, "free", "membership_total") == 1, what="endpoints")
    for name in ("capped", "free"):
        with ThreadPoolExecutor(max_workers=10) as pool:
            statuses = list(pool.map(lambda _, n=name: envoy.request(n)[0], range(10)))
        assert statuses == [503] * 10, statuses
    print(f"max_retries: {capped.calls} calls at 1, {free.calls} unset")
    # The backend counts a call as it answers; the last answers may still be counting.
    wait_for(lambda: free.calls == 40, timeout=5, what=f"40 calls (got {free.calls})")
    assert cluster_stat(envoy, "free", "upstream_rq_retry_overflow") == 0
    assert capped.calls < 30, capped.calls
    assert cluster_stat(envoy, "capped", "upstream_rq_retry_overflow") >= 5


def routed(envoy: Envoy, host: str) -> bool:
    return envoy.request(host)[0] == 200


def test_settings_from_the_environment(lab: Rig) -> None:
    """CONTROLPLANE_<FLAG> sets what the flag would: here the snapshot store keeps 2
    versions and logs are for people; a flag given too wins (``--snapshot-dir``)."""
    backend = lab.own(ScriptedHttp("reviews"))
    elsewhere = lab.tmp / "from-env"
    lab.serve([service("reviews", [backend])], env={
        "CONTROLPLANE_SNAPSHOT_KEEP": "2", "CONTROLPLANE_LOG_FORMAT": "console",
        "CONTROLPLANE_SNAPSHOT_DIR": str(elsewhere)})
    envoy = lab.envoy("frontend-1")
    for n in range(4):  # four published versions, each seen by the sidecar
        host = f"extra-{n}"
        lab.write([service("reviews", [backend]), service(host, [backend])])
        wait_for(partial(routed, envoy, host), what=f"version {n}")
    [group] = [p for p in (lab.tmp / "snapshots").iterdir() if p.is_dir()]
    wait_for(lambda: len(list(group.glob("*.json"))) == 2, what="2 snapshots kept")
    newest = json.loads(sorted(group.glob("*.json"))[-1].read_text())
    assert "extra-3" in json.dumps(newest)
    assert not elsewhere.exists()
    assert lab.server is not None
    text = lab.server.log_path.read_text()
    assert "mesh." in text and not text.lstrip().startswith("{"), text[:300]


def test_rate_limit_is_per_calling_sidecar(lab: Rig) -> None:
    """Each sidecar has its own bucket: one caller running dry leaves another's full."""
    backend = lab.own(ScriptedHttp("limited"))
    lab.serve([service("limited", [backend],
                       policy={"rate_limit": {"requests_per_second": 0.1, "burst": 2}})])
    first, second = lab.envoy("frontend-1"), lab.envoy("frontend-2")
    wait_for(lambda: first.request("limited")[0] == 429, what="the first bucket dry")
    assert [second.request("limited")[0] for _ in range(3)] == [200, 200, 429]
    assert first.request("limited")[0] == 429


def test_ejection_is_capped_by_max_ejection_percent(lab: Rig) -> None:
    """Two hosts that both fail: at 50% one is ejected and the other still answers;
    at 100% both go."""
    hosts = {name: [lab.own(ScriptedHttp(f"{name}-{i}", always(503))) for i in range(2)]
             for name in ("capped", "uncapped")}
    lab.serve([service(name, members, policy={"outlier_detection": {
        "consecutive_5xx": 2, "interval": "1s", "base_ejection_time": "30s",
        "max_ejection_percent": 50 if name == "capped" else 100}})
        for name, members in hosts.items()])
    envoy = lab.envoy("frontend-1")
    wait_for(lambda: all(cluster_stat(envoy, n, "membership_total") == 2 for n in hosts),
             what="endpoints")

    def ejected(name: str, count: int) -> bool:
        envoy.request(name)
        return cluster_stat(envoy, name, "outlier_detection.ejections_active") == count

    wait_for(partial(ejected, "uncapped", 2), what="both hosts ejected", interval=0.05)
    wait_for(partial(ejected, "capped", 1), what="one host ejected", interval=0.05)
    for _ in range(10):
        envoy.request("capped")
    assert cluster_stat(envoy, "capped", "outlier_detection.ejections_active") == 1
    assert cluster_stat(envoy, "capped", "outlier_detection.ejections_overflow") >= 1


def test_a_host_name_as_xds_address(lab: Rig) -> None:
    """``bootstrap --xds-address localhost:PORT``: the sidecar resolves it and connects."""
    backend = lab.own(ScriptedHttp("reviews"))
    server = lab.serve([service("reviews", [backend])])
    envoy = lab.envoy("frontend-1", extra=["--xds-address", f"localhost:{server.xds_port}"])
    wait_for(lambda: envoy.request("reviews")[1] == "reviews", what="config over localhost")


def test_every_stream_log_line_names_its_node_and_stream(lab: Rig) -> None:
    backend = lab.own(ScriptedHttp("reviews"))
    server = lab.serve([service("reviews", [backend])])
    envoy = lab.envoy("frontend-1", delta=True)
    wait_for(lambda: envoy.request("reviews")[1] == "reviews", what="reviews routed")
    lab.write([service("reviews", [backend]), service("ratings", [backend])])
    wait_for(lambda: envoy.request("ratings")[1] == "reviews", what="ratings routed")
    envoy.stop()
    wait_for(lambda: any(line.get("event") == "xds.stream_closed" for line in server.logs()),
             what="the stream to close")
    stream = [line for line in server.logs() if str(line.get("event", "")).startswith("xds.")
              and line.get("event") != "xds.listening"]
    assert len(stream) >= 3, stream
    assert all(line.get("node_id") == "frontend-1" and isinstance(line.get("stream_id"), int)
               for line in stream), stream


def test_snapshot_keep_0_turns_the_store_off(lab: Rig) -> None:
    backend = lab.own(ScriptedHttp("reviews"))
    lab.serve([service("reviews", [backend])], extra=["--snapshot-keep", "0"])
    envoy = lab.envoy("frontend-1")
    lab.write([service("reviews", [backend]), service("ratings", [backend])])
    wait_for(lambda: envoy.request("ratings")[0] == 200, what="ratings routed")
    store = lab.tmp / "snapshots"
    assert not store.exists() or not list(store.rglob("*.json")), list(store.rglob("*"))


def test_sidecars_alike_but_for_their_id_share_one_snapshot(lab: Rig) -> None:
    """Two replicas of a service (same service, namespace and ports; Envoy listens with
    SO_REUSEPORT, so both bind the egress port) are one proxy group; another zone is
    another group."""
    backend = lab.own(ScriptedHttp("reviews"))
    server = lab.serve([service("reviews", [backend])])
    first = lab.envoy("frontend-1")
    same = ["--egress-port", str(first.egress_port)]
    lab.envoy("frontend-2", extra=same)
    lab.envoy("frontend-3", extra=[*same, "--zone", "zone-b"])

    def groups() -> dict[str, str]:
        proxies = server.json("/debug/proxies")
        acked = all(p["types"]["cds"]["acked_version"] for p in proxies)
        return {p["node_id"]: p["group"] for p in proxies} if acked else {}

    by_node = wait_for(lambda: len(groups()) == 3 and groups(), what="three sidecars")
    assert by_node["frontend-1"] == by_node["frontend-2"] != by_node["frontend-3"], by_node
    assert set(server.json("/debug/snapshots")) == set(by_node.values())  # two snapshots
