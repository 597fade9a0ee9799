"""xDS promises shown with real Envoy: the per-type services (not only ADS) in both
protocols, config bigger than gRPC's common 4 MB message limit reaching a sidecar, and
a one-endpoint change reaching it as one ClusterLoadAssignment."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from envoy.service.route.v3 import rds_pb2_grpc

from tests.support.procs import Envoy, wait_for
from tests.support.promise_rig import Rig, scrape, service
from tests.support.promise_servers import ScriptedHttp
from tests.support.xds_client import node

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def per_type(envoy: Envoy, api_type: str) -> None:
    """Rewrite the sidecar's bootstrap so that clusters and listeners come from their
    own services (ClusterDiscoveryService, ListenerDiscoveryService), not from ADS.
    Endpoints and routes stay on ADS: the clusters and listeners the server sends
    name ADS as their source."""
    config = yaml.safe_load(envoy.config.read_text())
    ads = config["dynamic_resources"]["ads_config"]
    source = {"api_config_source": {
        "api_type": api_type, "transport_api_version": "V3",
        "grpc_services": ads["grpc_services"]}, "resource_api_version": "V3"}
    config["dynamic_resources"]["cds_config"] = source
    config["dynamic_resources"]["lds_config"] = source
    envoy.config.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_per_type_services_serve_a_real_sidecar(lab: Rig, delta: bool) -> None:
    first, second = lab.own(ScriptedHttp("reviews-1")), lab.own(ScriptedHttp("reviews-2"))
    server = lab.serve([service("reviews", [first])])
    assert lab.server is not None
    envoy = Envoy(lab.tmp, "frontend-1", "frontend", lab.server.xds_port, delta=delta)
    per_type(envoy, "DELTA_GRPC" if delta else "GRPC")
    lab.envoys.append(envoy.start())
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-1", what="reviews routed")

    streams = [p for p in server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    assert len(streams) == 3, streams  # CDS, LDS, and ADS for EDS and RDS
    assert {p["protocol"] for p in streams} == {"delta" if delta else "sotw"}
    acked = {kind for p in streams for kind, state in p["types"].items()
             if state.get("acked_version")}
    assert acked == {"cds", "eds", "lds", "rds"}, streams
    # The per-type streams carry only their type.
    assert sorted(len([k for k, s in p["types"].items() if s.get("acked_version")])
                  for p in streams) == [1, 1, 2], streams

    # Changes flow on every stream: a new service (CDS + RDS) and a moved endpoint (EDS).
    lab.write([service("reviews", [second]), service("ratings", [first])])
    wait_for(lambda: envoy.request("ratings")[1] == "reviews-1", what="the new service")
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-2", what="the moved endpoint")
    assert envoy.stat("cluster_manager.cds.update_rejected") == 0
    assert envoy.stat("listener_manager.lds.update_rejected") == 0


PREFIX_CHARS = 400


def big_mesh(backend: ScriptedHttp, services: int, matches: int) -> list[dict[str, Any]]:
    """Services whose path routes make the route table big: ``matches`` prefixes of
    ``PREFIX_CHARS`` characters each."""
    return [{
        "name": f"big-{i:03d}", "port": 9080,
        "endpoints": [{"address": "127.0.0.1", "port": backend.port,
                       "labels": {"version": "v1"}}],
        "policy": {"match": [{"path": {"prefix": f"/{j:03d}" + "p" * PREFIX_CHARS},
                              "labels": {"version": "v1"}} for j in range(matches)]},
    } for i in range(services)]


def test_a_route_table_over_4_mb_reaches_sidecars(lab: Rig) -> None:
    """A route table of about 5.6 MiB, past the 4 MB that many gRPC stacks take by
    default, is sent whole, ACKed with no NACK, and routes requests, in both protocols.
    (Envoy's own gRPC client and grpcio's sending side have no limit by default, so
    this holds even without the 256 MiB settings; they matter to other clients.)"""
    backend = lab.own(ScriptedHttp("big"))
    server = lab.serve(big_mesh(backend, services=120, matches=100))
    sotw, delta = lab.envoy("frontend-1"), lab.envoy("frontend-2", delta=True)
    path = "/099" + "p" * PREFIX_CHARS + "/end"

    def routed(envoy: Envoy) -> bool:
        return envoy.request("big-119", path)[:2] == (200, "big")

    for envoy in (sotw, delta):
        wait_for(partial(routed, envoy), what="a route from the big table", timeout=60)
    tables = [v for (name, labels), v in scrape(server).items()
              if name == "controlplane_config_bytes" and ("type", "rds") in labels]
    print(f"route tables: {[f'{v / 2**20:.1f} MiB' for v in tables]}")
    assert tables and min(tables) > 4 * 2**20, tables
    for proxy in server.json("/debug/proxies"):
        rds = proxy["types"]["rds"]
        assert rds["last_nack"] is None and rds["acked_version"] == rds["sent_version"], proxy


def update_counts(envoy: Envoy, clusters: list[str]) -> dict[str, int]:
    """How many updates of each kind the sidecar has taken, as Envoy counts them."""
    _, text, _ = envoy.admin("/stats?filter=update_success$")
    stats = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    counts = {"cds": int(stats["cluster_manager.cds.update_success"]),
              "lds": int(stats["listener_manager.lds.update_success"]),
              "rds": sum(int(v) for k, v in stats.items() if ".rds." in k)}
    for name in clusters:
        counts[name] = int(stats[f"cluster.outbound|9080||{name}.default.svc.cluster.local"
                                 ".update_success"])
    return counts


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_one_endpoint_change_updates_one_assignment(lab: Rig, delta: bool) -> None:
    """Moving one endpoint reaches a real sidecar as one ClusterLoadAssignment: that
    cluster's endpoints update; no other cluster's, and no clusters, listeners or
    routes are sent again."""
    backends = {n: lab.own(ScriptedHttp(n)) for n in ("reviews", "ratings", "details",
                                                      "reviews-2")}
    names = ["reviews", "ratings", "details"]
    lab.serve([service(n, [backends[n]]) for n in names])
    envoy = lab.envoy("frontend-1", delta=delta)
    wait_for(lambda: all(envoy.request(n)[1] == n for n in names), what="all routed")
    before = update_counts(envoy, names)
    lab.write([service("reviews", [backends["reviews-2"]]),
               *(service(n, [backends[n]]) for n in names[1:])])
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-2", what="the moved endpoint")
    after = update_counts(envoy, names)
    print(f"updates before {before}, after {after}")
    assert after["reviews"] == before["reviews"] + 1, (before, after)
    assert {k: v for k, v in after.items() if k != "reviews"} == {
        k: v for k, v in before.items() if k != "reviews"}, (before, after)


class DeltaStream:
    """One per-type delta stream (DeltaEndpoints, DeltaRoutes, ...) to the real server,
    driven by a plain gRPC client: Envoy itself only asks for endpoints and routes per
    type when the clusters and listeners say so, and the server's name ADS."""

    def __init__(self, call: Any, type_url: str, names: list[str]) -> None:
        self.type_url = type_url
        self.requests: queue.Queue[Any] = queue.Queue()
        self.requests.put(discovery_pb2.DeltaDiscoveryRequest(
            node=node("probe-1", "frontend", namespace="default", egress_port=15001),
            type_url=type_url, resource_names_subscribe=names))
        self.responses = call(iter(self.requests.get, None), timeout=60)

    def next(self) -> Any:
        response = next(self.responses)
        assert response.type_url == self.type_url, response.type_url
        self.requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=self.type_url,
                                        response_nonce=response.nonce))
        return response

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()


def test_per_type_delta_endpoints_and_routes(lab: Rig) -> None:
    first, second = lab.own(ScriptedHttp("reviews-1")), lab.own(ScriptedHttp("reviews-2"))
    server = lab.serve([service("reviews", [first])])
    cluster = "outbound|9080||reviews.default.svc.cluster.local"
    with grpc.insecure_channel(f"127.0.0.1:{server.xds_port}") as channel:
        eds = DeltaStream(eds_pb2_grpc.EndpointDiscoveryServiceStub(channel).DeltaEndpoints,
                          "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                          [cluster])
        rds = DeltaStream(rds_pb2_grpc.RouteDiscoveryServiceStub(channel).DeltaRoutes,
                          "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                          ["egress"])
        try:
            def port_of(response: Any) -> int:
                [item] = response.resources
                cla = endpoint_pb2.ClusterLoadAssignment.FromString(item.resource.value)
                return int(cla.endpoints[0].lb_endpoints[0].endpoint.address
                           .socket_address.port_value)

            def hosts(response: Any) -> set[str]:
                [item] = response.resources
                table = route_pb2.RouteConfiguration.FromString(item.resource.value)
                return {h.name for h in table.virtual_hosts}

            assert port_of(eds.next()) == first.port
            assert "reviews.default" in hosts(rds.next())
            lab.write([service("reviews", [second]), service("ratings", [first])])
            assert port_of(eds.next()) == second.port  # only the subscribed name
            assert "ratings.default" in hosts(rds.next())
        finally:
            eds.close()
            rds.close()
