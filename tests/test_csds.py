"""CSDS on the xDS port, read by real clients, about real Envoy sidecars: every type
SYNCED once the sidecars ACK, ERROR with Envoy's own error when a sidecar rejects its
listeners (its inbound port is taken), and a generic client that discovers the service
over gRPC reflection and calls it by name, without compiled stubs (as grpcurl does)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from controlplane import resource
from tests.support.procs import Backend, ControlPlane, Envoy, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

STATUS = csds_pb2.ConfigStatus
CLIENT = config_dump_shared_pb2.ClientResourceStatus
TYPES = {resource.CLUSTER, resource.ENDPOINT, resource.LISTENER, resource.ROUTE}


def write_mesh(path: Path, backends: dict[str, list[int]]) -> None:
    mesh = {"services": [
        {"name": name, "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": port} for port in ports]}
        for name, ports in backends.items()]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(mesh))
    tmp.replace(path)


class Fleet:
    """A file-mode server, backends and sidecars; ``close`` ends what it started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.backends = [Backend("reviews-1"), Backend("ratings-1")]
        write_mesh(self.mesh, {"reviews": [self.backends[0].port],
                               "ratings": [self.backends[1].port]})
        self.server = ControlPlane(self.mesh, tmp).start()
        self.envoys: list[Envoy] = []
        self.held: list[socket.socket] = []

    def envoy(self, node_id: str, delta: bool = False, service: str = "frontend",
              extra: list[str] | None = None, app_port: int | None = None) -> Envoy:
        envoy = Envoy(self.tmp, node_id, service, self.server.xds_port, delta, extra,
                      app_port=app_port)
        self.envoys.append(envoy)
        return envoy.start()

    def close(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.server.stop()
        for backend in self.backends:
            backend.stop()
        for held in self.held:
            held.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.close()


def fetch(port: int, request: csds_pb2.ClientStatusRequest | None = None,
          metadata: list[tuple[str, str]] | None = None) -> csds_pb2.ClientStatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        answer: csds_pb2.ClientStatusResponse = stub.FetchClientStatus(
            request or csds_pb2.ClientStatusRequest(), timeout=10, metadata=metadata)
        return answer


def by_node(answer: csds_pb2.ClientStatusResponse) -> dict[str, csds_pb2.ClientConfig]:
    return {config.node.id: config for config in answer.config}


def statuses(config: csds_pb2.ClientConfig) -> dict[str, set[int]]:
    """Per type URL, the config statuses of its resources."""
    found: dict[str, set[int]] = {}
    for entry in config.generic_xds_configs:
        found.setdefault(entry.type_url, set()).add(entry.config_status)
    return found


def all_synced(port: int, nodes: set[str]) -> dict[str, csds_pb2.ClientConfig] | None:
    configs = by_node(fetch(port))
    if set(configs) != nodes:
        return None
    for config in configs.values():
        seen = statuses(config)
        if not seen.keys() >= TYPES or any(s != {STATUS.SYNCED} for s in seen.values()):
            return None
    return configs


def inbound_ports() -> tuple[int, int]:
    return free_port(), free_port()


def test_fetch_and_stream_report_every_type_synced(fleet: Fleet) -> None:
    fleet.envoy("frontend-1")
    fleet.envoy("frontend-2", delta=True)
    port = fleet.server.xds_port
    configs = wait_for(lambda: all_synced(port, {"frontend-1", "frontend-2"}),
                       what="both sidecars SYNCED in CSDS")

    sotw, delta = configs["frontend-1"], configs["frontend-2"]
    meta = sotw.node.metadata.fields
    assert meta["controlplane_replica"].string_value == socket.gethostname()  # --identifier
    assert meta["controlplane_protocol"].string_value == "sotw"
    assert delta.node.metadata.fields["controlplane_protocol"].string_value == "delta"
    assert sotw.node.cluster == "frontend"
    summary = meta["controlplane_xds"].struct_value.fields
    assert summary["lds"].struct_value.fields["status"].string_value == "SYNCED"
    # What the server sends is what /debug/proxies says was sent and ACKed.
    [proxy] = [p for p in fleet.server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    clusters = [e for e in sotw.generic_xds_configs if e.type_url == resource.CLUSTER]
    assert {e.version_info for e in clusters} == {proxy["types"]["cds"]["acked_version"]}
    assert all(e.client_status == CLIENT.ACKED for e in clusters)
    names = {e.name for e in clusters}
    assert "outbound|9080||reviews.default.svc.cluster.local" in names
    reviews = next(e for e in clusters if e.name.endswith("reviews.default.svc.cluster.local"))
    assert reviews.xds_config.type_url == resource.CLUSTER
    assert b"reviews" in reviews.xds_config.value

    # Without contents, and for one node by prefix.
    lean = fetch(port, csds_pb2.ClientStatusRequest(
        exclude_resource_contents=True,
        node_matchers=[node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(
            prefix="frontend-2"))]))
    assert [c.node.id for c in lean.config] == ["frontend-2"]
    assert not any(e.HasField("xds_config") for e in lean.config[0].generic_xds_configs)

    # The stream answers each request; a burst is coalesced, never more answers than asks.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        asks = [csds_pb2.ClientStatusRequest(exclude_resource_contents=True)] * 5
        answers = list(stub.StreamClientStatus(iter(asks), timeout=10))
    assert 1 <= len(answers) <= 5
    assert {c.node.id for c in answers[-1].config} == {"frontend-1", "frontend-2"}

    # A matcher the server does not evaluate is refused with what to use instead.
    with pytest.raises(grpc.RpcError) as refused:
        fetch(port, csds_pb2.ClientStatusRequest(node_matchers=[node_pb2.NodeMatcher(
            node_id=string_pb2.StringMatcher(safe_regex={"regex": "front.*"}))]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use exact, prefix, suffix or contains" in str(refused.value.details())


def test_a_rejected_listener_shows_as_error_with_envoys_message(fleet: Fleet) -> None:
    fleet.envoy("frontend-1")
    inbound, app = inbound_ports()
    taken = socket.socket()  # the sidecar's inbound port, bound and listening first
    taken.bind(("127.0.0.1", inbound))
    taken.listen()
    fleet.held.append(taken)
    fleet.envoy("reviews-1", service="reviews", extra=[
        "--inbound-port", str(inbound), "--app-port", str(app),
        "--inbound-address", "127.0.0.1"])
    port = fleet.server.xds_port

    def rejected() -> csds_pb2.ClientConfig | None:
        config = by_node(fetch(port)).get("reviews-1")
        if config is None or STATUS.ERROR not in statuses(config).get(resource.LISTENER, ()):
            return None
        return config

    config = wait_for(rejected, what="reviews-1's listeners in ERROR")
    errors = [e for e in config.generic_xds_configs
              if e.type_url == resource.LISTENER and e.config_status == STATUS.ERROR]
    failed = [e for e in errors if e.HasField("error_state")]
    assert failed and all(e.client_status == CLIENT.NACKED for e in failed)
    details = failed[0].error_state.details
    assert str(inbound) in details and "bind" in details, details  # Envoy's own words
    assert failed[0].error_state.failed_configuration.type_url == resource.LISTENER
    assert failed[0].error_state.version_info == failed[0].version_info
    summary = config.node.metadata.fields["controlplane_xds"].struct_value.fields
    assert summary["lds"].struct_value.fields["status"].string_value == "ERROR"
    assert summary["cds"].struct_value.fields["status"].string_value == "SYNCED"
    # The healthy sidecar is not affected.
    healthy = by_node(fetch(port))["frontend-1"]
    assert statuses(healthy)[resource.LISTENER] == {STATUS.SYNCED}


def _reflected_call(port: int, node: str) -> dict[str, Any]:
    """A client with no compiled stubs: the service, its methods and its messages come
    from the server's reflection; the request is built and the answer read by name."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("envoy.service.status.v3.ClientStatusDiscoveryService")
        method = service.methods_by_name["FetchClientStatus"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class()
        matcher = request.node_matchers.add()
        matcher.node_id.exact = node
        request.exclude_resource_contents = True
        call = channel.unary_unary(f"/{service.full_name}/{method.name}",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        answer = call(request, timeout=10)
        return {"services": services, "answer": answer,
                "status_enum": pool.FindEnumTypeByName("envoy.service.status.v3.ConfigStatus")}


def test_a_generic_client_reads_csds_through_reflection(fleet: Fleet) -> None:
    fleet.envoy("frontend-1")
    port = fleet.server.xds_port
    wait_for(lambda: all_synced(port, {"frontend-1"}), what="frontend-1 SYNCED")
    found = _reflected_call(port, "frontend-1")
    assert {"envoy.service.status.v3.ClientStatusDiscoveryService",
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "envoy.service.cluster.v3.ClusterDiscoveryService",
            "envoy.service.endpoint.v3.EndpointDiscoveryService",
            "envoy.service.listener.v3.ListenerDiscoveryService",
            "envoy.service.route.v3.RouteDiscoveryService",
            "envoy.service.secret.v3.SecretDiscoveryService"} <= set(found["services"])
    answer = found["answer"]
    assert type(answer).__module__ != csds_pb2.__name__  # built from reflection, not stubs
    [config] = answer.config
    assert config.node.id == "frontend-1"
    synced = found["status_enum"].values_by_name["SYNCED"].number
    kinds = {e.type_url for e in config.generic_xds_configs}
    assert kinds >= TYPES
    assert {e.config_status for e in config.generic_xds_configs} == {synced}
