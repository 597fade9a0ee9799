"""What kind of proxy a node is: the metadata says, else a gRPC library's user agent."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from controlplane.proxy import GATEWAY, GRPC, SIDECAR, ProxyIdentity


def node(user_agent: str = "envoy", **metadata: str) -> base_pb2.Node:
    fields = struct_pb2.Struct()
    fields.update(metadata)
    return base_pb2.Node(id="n1", cluster="web", metadata=fields, user_agent_name=user_agent)


def test_a_node_that_says_nothing_is_a_sidecar() -> None:
    proxy = ProxyIdentity.from_node(node())
    assert (proxy.kind, proxy.gateway) == (SIDECAR, "")
    assert "kind" not in proxy.group


def test_a_gateway_names_its_gateway_and_has_its_own_group() -> None:
    proxy = ProxyIdentity.from_node(node(kind="gateway", gateway="ingress", namespace="edge"))
    assert (proxy.kind, proxy.gateway, proxy.namespace) == (GATEWAY, "ingress", "edge")
    assert proxy.group != ProxyIdentity.from_node(node(namespace="edge")).group
    assert "~gateway=ingress" in proxy.group


def test_a_gateway_name_means_nothing_on_another_kind() -> None:
    assert ProxyIdentity.from_node(node(gateway="ingress")).gateway == ""


def test_grpc_by_metadata_or_by_its_user_agent() -> None:
    assert ProxyIdentity.from_node(node(kind="grpc")).kind == GRPC
    assert ProxyIdentity.from_node(node(user_agent="gRPC Go")).kind == GRPC
    assert ProxyIdentity.from_node(node(user_agent="gRPC C-core")).kind == GRPC


def test_an_unknown_kind_is_a_sidecar() -> None:
    assert ProxyIdentity.from_node(node(kind="router")).kind == SIDECAR
