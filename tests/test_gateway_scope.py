"""A gateway proxy is served only the clusters and endpoints its routes need: the
backends of the routes attached to its Gateway (and what those route to), not every
service of the mesh; a change to a service it does not route to pushes nothing to it.

In process against the real assembly, then over a real ADS stream to the real
``controlplane serve``, counting the responses on the gateway's stream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.mesh import load_mesh_data
from controlplane.proxy import GATEWAY, ProxyIdentity
from tests.support.procs import ControlPlane
from tests.support.secure import write_mesh
from tests.support.xds_client import AdsClient, node

PROXY = ProxyIdentity(node_id="ingress-1", service="ingress", kind=GATEWAY, gateway="ingress")
UNRELATED = 20
BENCH = Path(__file__).resolve().parent.parent / "bench" / "gateway_scope.py"


def cluster(name: str) -> str:
    return f"outbound|9080||{name}.default.svc.cluster.local"


def mesh_data(web_port: int = 8080, other_port: int = 8080,
              routed: tuple[str, ...] = ("web",)) -> dict[str, Any]:
    """``web`` and ``api`` routable; UNRELATED services ``other-N`` nobody routes to."""
    services = [{"name": name, "port": 9080,
                 "endpoints": [{"address": "10.0.0.1", "port": web_port}]}
                for name in ("web", "api")]
    services += [{"name": f"other-{n}", "port": 9080,
                  "endpoints": [{"address": "10.0.1.1", "port": other_port}]}
                 for n in range(UNRELATED)]
    return {
        "services": services,
        "gateways": [{"name": "ingress", "listeners": [
            {"name": "http", "port": 8080, "protocol": "HTTP"}]}],
        "http_routes": [{"name": name, "parentRefs": [{"name": "ingress"}],
                         "hostnames": [f"{name}.example.com"],
                         "rules": [{"backendRefs": [{"name": name, "port": 9080}]}]}
                        for name in routed],
    }


def names(build: MeshBuild, type_url: str, previous: Any = None) -> set[str]:
    return set(build.snapshot(PROXY, previous).types[type_url].resources)


def test_the_gateway_holds_only_its_routes_backends() -> None:
    build = MeshBuild(load_mesh_data(mesh_data()))
    made = build.snapshot(PROXY)
    assert not made.problems()
    assert set(made.types[resource.CLUSTER].resources) == {cluster("web")}
    assert set(made.types[resource.ENDPOINT].resources) == {cluster("web")}
    # A sidecar that sees everything still gets every service (the gateway's scope is
    # its own).
    sidecar = ProxyIdentity(node_id="front-1", service="front")
    assert len(build.snapshot(sidecar).types[resource.CLUSTER].resources) == UNRELATED + 2


def test_an_unrelated_change_leaves_the_gateway_snapshot_as_it_is() -> None:
    first = MeshBuild(load_mesh_data(mesh_data()))
    before = first.snapshot(PROXY)
    # Another service's endpoints move: the gateway's snapshot is the same object, so
    # the server pushes nothing to its streams.
    second = MeshBuild(load_mesh_data(mesh_data(other_port=9999)), previous=first)
    assert second.snapshot(PROXY, before) is before
    # Its own backend's endpoints move: a new EDS version, the rest kept.
    third = MeshBuild(load_mesh_data(mesh_data(web_port=9999, other_port=9999)),
                      previous=second)
    after = third.snapshot(PROXY, before)
    assert after.types[resource.ENDPOINT].version != before.types[resource.ENDPOINT].version
    for type_url in (resource.CLUSTER, resource.LISTENER, resource.ROUTE):
        assert after.types[type_url] is before.types[type_url]
    # A route attached to the Gateway brings its backend in.
    fourth = MeshBuild(load_mesh_data(mesh_data(web_port=9999, other_port=9999,
                                                routed=("web", "api"))), previous=third)
    assert names(fourth, resource.CLUSTER, after) == {cluster("web"), cluster("api")}


class Stream:
    """One SotW ADS stream that subscribes to CDS and then to the EDS of every cluster
    it is sent, ACKing each response, and counts what it receives."""

    def __init__(self, channel: grpc.aio.Channel, identity: Any) -> None:
        self.client = AdsClient(channel)
        self.node = identity
        self.received: list[Any] = []
        self.subscribed: list[str] = []  # the EDS names, kept in every ACK

    async def start(self) -> set[str]:
        await self.client.send(node=self.node, type_url=resource.CLUSTER)
        clusters = await self.next(resource.CLUSTER)
        self.subscribed = sorted(self.decoded_names(clusters))
        await self.client.ack(clusters)
        await self.client.send(type_url=resource.ENDPOINT, resource_names=self.subscribed)
        await self.client.ack(await self.next(resource.ENDPOINT),
                              resource_names=self.subscribed)
        return set(self.subscribed)

    async def next(self, type_url: str | None = None, timeout: float = 20.0) -> Any:
        async with asyncio.timeout(timeout):  # not wait_for: a cancel must not be lost
            response = await self.client.responses.get()
        self.received.append(response)
        assert type_url is None or response.type_url == type_url, response.type_url
        return response

    @staticmethod
    def decoded_names(response: Any) -> set[str]:
        found = set()
        for packed in response.resources:
            if packed.type_url == resource.CLUSTER:
                made = cluster_pb2.Cluster()
                packed.Unpack(made)
                found.add(made.name)
        return found

    async def endpoints_with_port(self, port: int, timeout: float = 30.0) -> Any:
        """The first EDS response holding an endpoint on ``port`` (each ACKed)."""
        async with asyncio.timeout(timeout):
            while True:
                response = await self.next()
                if response.type_url == resource.ENDPOINT:
                    await self.client.ack(response, resource_names=self.subscribed)
                else:
                    await self.client.ack(response)
                if any(e.endpoint.address.socket_address.port_value == port
                       for a in self.assignments(response) for group in a.endpoints
                       for e in group.lb_endpoints):
                    return response

    @staticmethod
    def assignments(response: Any) -> list[endpoint_pb2.ClusterLoadAssignment]:
        found = []
        for packed in response.resources:
            if packed.type_url == resource.ENDPOINT:
                made = endpoint_pb2.ClusterLoadAssignment()
                packed.Unpack(made)
                found.append(made)
        return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlPlane, Path]]:
    path = tmp_path / "mesh.yaml"
    write_mesh(path, mesh_data())
    made = ControlPlane(path, tmp_path).start()
    try:
        yield made, path
    finally:
        made.stop()


@pytest.mark.timeout(120)
async def test_no_push_to_the_gateway_when_an_unrelated_service_changes(
        server: tuple[ControlPlane, Path]) -> None:
    """The gateway's stream holds web only; an unrelated service's change reaches a
    sidecar that sees it and not the gateway: the gateway's next response is the one
    that carries its own backend's change, made after the sidecar had the other."""
    control, path = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.xds_port}") as channel:
        gateway = Stream(channel, node("ingress-1", "ingress", kind="gateway",
                                       gateway="ingress"))
        witness = Stream(channel, node("front-1", "front"))
        try:
            assert await gateway.start() == {cluster("web")}
            assert len(await witness.start()) == UNRELATED + 2
            sent = len(gateway.received)

            write_mesh(path, mesh_data(other_port=9001))
            await witness.endpoints_with_port(9001)  # the change is built and served
            write_mesh(path, mesh_data(web_port=9002, other_port=9001))
            response = await gateway.endpoints_with_port(9002)
            # Nothing came to the gateway between: its first response since is web's.
            assert gateway.received[sent:] == [response]
            assert [a.cluster_name for a in Stream.assignments(response)] == [cluster("web")]
        finally:
            await gateway.client.close()
            await witness.client.close()


def test_the_bench_reports_the_gateways_scope(tmp_path: Path) -> None:
    """``bench/gateway_scope.py`` at a small scale: the routed services' clusters only,
    fewer bytes than the whole mesh, and no change for an unrelated edit."""
    out = tmp_path / "gateway_scope.json"
    done = subprocess.run([sys.executable, str(BENCH), "--services", "12", "--routed", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["types"]["cds"]["resources"] == 2
    assert result["types"]["cds"]["resources_unscoped"] == 12
    assert result["bytes"] < result["bytes_unscoped"]
    assert result["unrelated_change"]["gateway_snapshot_unchanged"] is True
    assert result["unrelated_change"]["unscoped_types_that_would_change"] == ["eds"]
