"""What CSDS says of a stream, at the protocol level: real state-of-the-world and delta
streams fed real snapshots and requests, through every status (NOT_SENT, STALE, SYNCED,
ERROR) and, after a NACK, the content the proxy holds beside the one it rejected."""

from __future__ import annotations

import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2, string_pb2
from google.rpc import status_pb2

from controlplane import resource
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.snapshot import Snapshot
from controlplane.server.csds import AckedConfigs, BadRequest, ClientStatus, node_filter
from controlplane.server.csds_config import client_config, proxies, type_status
from controlplane.server.delta import DeltaStream
from controlplane.server.registry import StreamRegistry
from controlplane.server.sotw import SotwStream
from controlplane.status.diff import diff
from controlplane.status.model import merge, proxy_status
from tests.support.snapshots import snapshot
from tests.support.xds_client import node

STATUS = csds_pb2.ConfigStatus
CLIENT = config_dump_shared_pb2.ClientResourceStatus


def ask(stream: SotwStream, type_url: str, names: list[str], version: str = "",
        nonce: str = "", error: str = "") -> None:
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names,
                                             version_info=version, response_nonce=nonce)
    if stream.node is None:
        request.node.CopyFrom(node("frontend-1"))
    if error:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    stream.on_request(request)


def version(snap: Snapshot) -> str:
    typed = snap.get(resource.ENDPOINT)
    assert typed is not None
    return typed.version


def eds(stream: SotwStream) -> str:
    assert stream.snapshot is not None
    return type_status(resource.ENDPOINT, stream.types[resource.ENDPOINT],
                       version(stream.snapshot)).config_status


def test_sotw_statuses_and_what_a_nacking_proxy_holds() -> None:
    stream = SotwStream(1, "ads")
    acked = AckedConfigs()
    ask(stream, resource.ENDPOINT, ["a", "b"])
    state = stream.types[resource.ENDPOINT]
    assert type_status(resource.ENDPOINT, state, None).config_status == "NOT_SENT"

    first = snapshot({"a": (1,), "b": (2,)})
    [push] = stream.on_snapshot(first)
    assert eds(stream) == "STALE"  # sent, not ACKed yet
    ask(stream, resource.ENDPOINT, ["a", "b"], push.version, push.nonce)
    acked.acked(stream, resource.ENDPOINT)
    assert eds(stream) == "SYNCED"

    second = snapshot({"a": (1,), "b": (3,)})
    [push] = stream.on_snapshot(second)
    old = version(first)
    ask(stream, resource.ENDPOINT, ["a", "b"], old, push.nonce,
        error="endpoint b: port 3 refused")
    acked.nacked(stream, resource.ENDPOINT, "")
    assert eds(stream) == "ERROR"

    [found] = proxies([stream]).values()
    config = client_config(found, second, "r1", acked.held(found), contents=True)
    entries = [(e.name, e.version_info, e.config_status, e.client_status)
               for e in config.generic_xds_configs]
    new = version(second)
    # a is the same in both: held and served; b is served (rejected) and held (older).
    assert entries == [("a", new, STATUS.ERROR, CLIENT.ACKED),
                       ("b", new, STATUS.ERROR, CLIENT.NACKED),
                       ("b", old, STATUS.ERROR, CLIENT.ACKED)]
    rejected = config.generic_xds_configs[1]
    assert rejected.error_state.details == "endpoint b: port 3 refused"
    assert rejected.error_state.version_info == new
    assert rejected.error_state.failed_configuration.type_url == resource.ENDPOINT

    # The status command's diff: b changed, from port 2 (held) to port 3 (served).
    proxy, diffs = diff(config, "127.0.0.1:1")
    assert proxy.replica == "r1" and proxy.types["eds"].shown == "NACKED"
    [change] = diffs
    assert not change.added and not change.removed and list(change.changed) == ["b"]
    lines = [" ".join(line.split()) for line in change.changed["b"]]
    assert '- "port_value": 2' in lines and '+ "port_value": 3' in lines
    held = endpoint_pb2.ClusterLoadAssignment()
    config.generic_xds_configs[2].xds_config.Unpack(held)
    assert held.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 2

    acked.closed(stream)
    assert len(acked) == 0


def test_a_change_to_names_not_subscribed_keeps_a_stream_synced() -> None:
    stream = SotwStream(1, "ads")
    ask(stream, resource.ENDPOINT, ["a"])
    [push] = stream.on_snapshot(snapshot({"a": (1,), "b": (2,)}))
    ask(stream, resource.ENDPOINT, ["a"], push.version, push.nonce)
    later = snapshot({"a": (1,), "b": (3,)})
    # Only b changed: nothing to send to a stream that asks for a alone.
    assert stream.on_snapshot(later) == []
    assert stream.types[resource.ENDPOINT].sent_version != version(later)
    assert eds(stream) == "SYNCED"
    [found] = proxies([stream]).values()
    config = client_config(found, later, "r1", {}, contents=False)
    assert [(e.name, e.config_status) for e in config.generic_xds_configs] == [
        ("a", STATUS.SYNCED)]


def test_delta_stream_synced_then_stale_when_the_group_moves_on() -> None:
    stream = DeltaStream(1, "ads")
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=resource.CLUSTER,
                                                  node=node("frontend-2"))
    stream.on_request(request)
    first = snapshot({"a": (1,)})
    [push] = stream.on_snapshot(first)
    stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=resource.CLUSTER,
                                                          response_nonce=push.nonce))
    [found] = proxies([stream]).values()
    config = client_config(found, first, "r1", {}, contents=False)
    assert {e.config_status for e in config.generic_xds_configs} == {STATUS.SYNCED}
    assert not config.generic_xds_configs[0].HasField("xds_config")
    # The group has a newer snapshot this stream has not been sent yet: STALE.
    later = snapshot({"a": (1,), "b": (2,)})
    config = client_config(found, later, "r1", {}, contents=False)
    view = proxy_status(config, "x").types["cds"]
    assert view.status == "STALE" and view.current_version != view.sent_version
    assert config.node.metadata.fields["controlplane_protocol"].string_value == "delta"


def test_node_matchers_and_merging_replicas() -> None:
    def pick(**kind: str) -> list[str]:
        request = csds_pb2.ClientStatusRequest(node_matchers=[node_pb2.NodeMatcher(
            node_id=string_pb2.StringMatcher(**kind))])  # type: ignore[arg-type]
        wanted = node_filter(request)
        return [n for n in ("web-1", "web-2", "db-1") if wanted(n)]

    assert pick(exact="web-1") == ["web-1"]
    assert pick(prefix="web") == ["web-1", "web-2"]
    assert pick(suffix="-1") == ["web-1", "db-1"]
    assert pick(contains="b-") == ["web-1", "web-2", "db-1"]
    assert node_filter(csds_pb2.ClientStatusRequest())("anything")
    with pytest.raises(BadRequest, match="use exact, prefix, suffix or contains"):
        pick(safe_regex={"regex": "x"})  # type: ignore[arg-type]

    def status(replica: str, at: float) -> csds_pb2.ClientConfig:
        config = csds_pb2.ClientConfig()
        config.node.id = "web-1"
        config.node.metadata.fields["controlplane_replica"].string_value = replica
        config.node.metadata.fields["controlplane_connected_at"].number_value = at
        return config

    [one] = merge([proxy_status(status("r1", 10.0), "a"), proxy_status(status("r2", 20.0), "b")])
    assert one.replica == "r2"  # where it connected last


async def test_an_answer_too_large_drops_contents_then_is_refused() -> None:
    stream = SotwStream(1, "ads")
    ask(stream, resource.CLUSTER, [])
    snap = snapshot({f"service-{i}": (i + 1,) for i in range(50)})
    stream.on_snapshot(snap)
    cache = SnapshotCache()
    assert stream.proxy is not None
    cache.set_snapshot(stream.proxy.group, snap)
    registry = StreamRegistry()
    registry.add(stream)
    full = csds_pb2.ClientStatusResponse.FromString(
        await ClientStatus(registry, cache, "r1").answer(csds_pb2.ClientStatusRequest()))
    assert all(e.HasField("xds_config") for e in full.config[0].generic_xds_configs)
    size = full.ByteSize()

    lean = ClientStatus(registry, cache, "r1", max_bytes=size - 1)
    answer = csds_pb2.ClientStatusResponse.FromString(
        await lean.answer(csds_pb2.ClientStatusRequest()))
    assert len(answer.config[0].generic_xds_configs) == 50
    assert not any(e.HasField("xds_config") for e in answer.config[0].generic_xds_configs)

    tiny = ClientStatus(registry, cache, "r1", max_bytes=100)
    with pytest.raises(Exception, match="ask for fewer nodes"):
        await tiny.answer(csds_pb2.ClientStatusRequest())
