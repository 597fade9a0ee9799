"""A proxyless gRPC server's Listeners (gRFC A36, A29, A41): golden files a reviewer reads,
and the rules the translation keeps.

Each ``tests/golden/proxyless/server/in/<case>.yaml`` (a mesh file plus a ``proxy:``
block with ``serves: true``) is built as the server builds it (MeshBuild, ``kind:
grpc``) and must give ``server/out/<case>.yaml``: the Listener names, the ``0.0.0.0``
Listener of each target port in full (the others differ only by name and address, which
a test checks), and what was left out. Regenerate with ``pytest --update-golden``.
The e2e test (tests/test_proxyless_server_e2e.py) shows grpcio ACKs and enforces them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import struct_pb2
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.bootstrap_grpc import (
    SERVER_FLAG,
    SERVER_TEMPLATE,
    GrpcBootstrapOptions,
    build_grpc_bootstrap,
)
from controlplane.cache.snapshot import Snapshot
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.proxy import GRPC, SIDECAR, ProxyIdentity
from controlplane.translator.proxyless import LeftOut
from controlplane.translator.proxyless.server_listeners import (
    MAX_ADDRESSES,
    TEMPLATE,
    server_listener_name,
    server_listeners,
)
from controlplane.translator.proxyless.server_rbac import _safe
from tests.support.golden import Goldens, to_dict
from tests.test_proxyless_mtls_e2e import run_cli

GOLDENS = Goldens(Path(__file__).parent / "golden" / "proxyless",
                  input_dir="server/in", output_dir="server/out")
CASES = GOLDENS.cases
PREFIX = "grpc/server?xds.resource.listening_address="


def load_case(name: str) -> tuple[Mesh, ProxyIdentity]:
    return GOLDENS.load(name, kind=GRPC)


def served(mesh: Mesh, proxy: ProxyIdentity) -> list[listener_pb2.Listener]:
    snapshot: Snapshot = MeshBuild(mesh).snapshot(proxy)
    assert snapshot.problems() == []
    typed = snapshot.get(resource.LISTENER)
    assert typed is not None
    found = [typed.resources[n].message for n in sorted(typed.resources)
             if n.startswith(PREFIX)]
    assert all(isinstance(m, listener_pb2.Listener) for m in found)
    return found  # type: ignore[return-value]


def notes(mesh: Mesh, proxy: ProxyIdentity) -> list[str]:
    service = mesh.service(proxy.service, proxy.namespace)
    assert service is not None
    left = LeftOut()
    server_listeners(mesh, service, proxy.certificates, left)
    return left.summary()


def render(name: str) -> str:
    mesh, proxy = load_case(name)
    listeners = served(mesh, proxy)
    document = {
        "listener_names": [str(m.name) for m in listeners],
        "listeners": [to_dict(m) for m in listeners
                      if m.address.socket_address.address == "0.0.0.0"],
        "left_out": notes(mesh, proxy),
    }
    return yaml.safe_dump(document, sort_keys=False, width=100)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    GOLDENS.check(case, render(case), request, "the gRPC server's Listeners differ")


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request)


@pytest.mark.parametrize("case", CASES)
def test_each_listener_is_named_by_its_address_and_alike_on_a_port(case: str) -> None:
    """gRPC checks a Listener's address against where it listens: the name's address
    is the Listener's. Every Listener of a port is its wildcard's but for those two."""
    listeners = served(*load_case(case))
    by_port: dict[int, bytes] = {}
    for listener in listeners:
        socket = listener.address.socket_address
        assert listener.name == server_listener_name(socket.address, socket.port_value)
        bare = listener_pb2.Listener()
        bare.CopyFrom(listener)
        bare.ClearField("name")
        bare.ClearField("address")
        body = bare.SerializeToString(deterministic=True)
        assert by_port.setdefault(socket.port_value, body) == body, listener.name


@pytest.mark.parametrize("case", CASES)
def test_only_what_grpc_reads(case: str) -> None:
    """What gRPC NACKs a server Listener for: more than one filter per chain, a
    filter chain match, a SAN matcher, a terminal filter not last, a refused header."""
    for listener in served(*load_case(case)):
        assert not listener.HasField("default_filter_chain")
        assert not listener.listener_filters
        for chain in listener.filter_chains:
            assert not chain.HasField("filter_chain_match")
            [only] = chain.filters
            manager = hcm_pb2.HttpConnectionManager()
            assert only.typed_config.Unpack(manager)
            assert manager.http_filters[-1].name == "envoy.filters.http.router"
            assert len({f.name for f in manager.http_filters}) == len(manager.http_filters)
            [host] = manager.route_config.virtual_hosts
            assert list(host.domains) == ["*"]
            assert all(r.HasField("non_forwarding_action") for r in host.routes)
            text = json.dumps(to_dict(listener))
            assert "match_subject_alt_names" not in text and "sds" not in text
            assert "grpc-timeout" not in text and ":scheme" not in text


def test_a_client_group_gets_no_server_listener() -> None:
    mesh, proxy = load_case("strict")
    client = dataclasses.replace(proxy, serves=False)
    assert served(mesh, client) == []
    assert served(mesh, proxy)
    assert proxy.group != client.group and proxy.group.endswith("~server")


def test_the_group_follows_the_node_metadata() -> None:
    node = base_pb2.Node(id="echo-1", cluster="echo", metadata=struct_pb2.Struct(fields={
        "kind": struct_pb2.Value(string_value="grpc"),
        SERVER_FLAG: struct_pb2.Value(string_value="true")}))
    assert ProxyIdentity.from_node(node).serves
    node.metadata.fields["kind"].string_value = SIDECAR
    assert not ProxyIdentity.from_node(node).serves  # a sidecar's inbound serves its app


def test_the_bootstrap_names_the_template_the_translator_answers() -> None:
    assert SERVER_TEMPLATE == TEMPLATE
    options = GrpcBootstrapOptions(node_id="echo-1", service="echo")
    plain = build_grpc_bootstrap(options)
    assert "server_listener_resource_name_template" not in plain
    assert SERVER_FLAG not in plain["node"]["metadata"]
    made = build_grpc_bootstrap(dataclasses.replace(options, server=True))
    assert made["server_listener_resource_name_template"] == TEMPLATE
    assert made["node"]["metadata"][SERVER_FLAG] == "true"


def test_the_flag_is_for_grpc_bootstraps_only() -> None:
    done = run_cli("bootstrap", "--node-id", "s-1", "--service", "s", "--grpc-server")
    assert done.returncode != 0
    assert "--grpc-server is for --grpc" in done.stderr
    done = run_cli("bootstrap", "--grpc", "--grpc-server", "--node-id", "s-1",
                   "--service", "s")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["server_listener_resource_name_template"] == TEMPLATE


def test_a_rule_change_changes_the_listener_and_nothing_else_does() -> None:
    """The same mesh built twice gives byte-identical Listeners (no push); a rule change
    gives new ones, which reach the running server (the e2e test shows it)."""
    mesh, proxy = load_case("strict")
    first = [m.SerializeToString(deterministic=True) for m in served(mesh, proxy)]
    again = [m.SerializeToString(deterministic=True) for m in served(mesh, proxy)]
    assert first == again
    data = yaml.safe_load(GOLDENS.input("strict").read_text())
    data.pop("proxy"), data.pop("server_identity")
    data["services"][0]["security"]["authorization"][0]["from"] = [
        {"principals": ["spiffe://cluster.local/ns/default/sa/other"]}]
    changed = load_mesh_data(data).model_copy(update={"identity": mesh.identity})
    after = [m.SerializeToString(deterministic=True) for m in served(changed, proxy)]
    assert len(after) == len(first) and after != first


def test_the_notes_are_logged_once_per_change() -> None:
    mesh, proxy = load_case("permissive")
    with capture_logs() as logs:
        served(mesh, proxy)
        served(mesh, proxy)  # another build of the same mesh: nothing new to say
    found = [e for e in logs if e["event"] == "proxyless.left_out"
             and e.get("service") == "echo.default"]
    assert len(found) <= 1  # another test may have logged these notes already
    with capture_logs() as logs:
        served(mesh, proxy)
    assert not [e for e in logs if e.get("service") == "echo.default"]


def test_endpoint_addresses_are_bounded() -> None:
    endpoints = [{"address": f"10.1.{i // 250}.{i % 250 + 1}", "port": 50051}
                 for i in range(MAX_ADDRESSES + 5)]
    mesh = load_mesh_data({"services": [{"name": "big", "port": 50051, "protocol": "grpc",
                                         "endpoints": endpoints}]})
    proxy = ProxyIdentity(node_id="big-1", service="big", kind=GRPC, serves=True)
    listeners = served(mesh, proxy)
    assert len(listeners) == MAX_ADDRESSES + 2  # and the two wildcards
    assert any(f"past {MAX_ADDRESSES} endpoint addresses" in n for n in notes(mesh, proxy))


def _header(name: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(
        name=name, present_match=True))


_ANY = rbac_pb2.Permission(any=True)
_NEVER = rbac_pb2.Permission(not_rule=_ANY)


@pytest.mark.parametrize(("deny", "expected"), [(False, _NEVER), (True, _ANY)])
def test_a_refused_header_is_replaced_on_the_safe_side(
        deny: bool, expected: rbac_pb2.Permission) -> None:
    """Allow: never matches (grants less). Deny: always matches (denies more). Inside a
    ``not`` the sides swap, so the whole still errs the same way."""
    left = LeftOut()
    kept = _header("x-user")
    assert _safe(kept, deny, "rule r", left) == kept and not left
    assert _safe(_header("grpc-timeout"), deny, "rule r", left) == expected
    assert _safe(_header(":scheme"), deny, "rule r", left) == expected
    nested = rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(
        rules=[kept, rbac_pb2.Permission(not_rule=_header("grpc-x"))]))
    swapped = _NEVER if expected == _ANY else _ANY
    made = _safe(nested, deny, "rule r", left)
    assert list(made.and_rules.rules) == [kept, rbac_pb2.Permission(not_rule=swapped)]
    assert left and all("rule r" in n for n in left.notes)


def test_rbac_filters_are_deny_then_allow_then_the_router() -> None:
    mesh, proxy = load_case("strict")
    [listener, *_] = served(mesh, proxy)
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    names = [f.name for f in manager.http_filters]
    assert names == ["envoy.filters.http.rbac.deny", "envoy.filters.http.rbac.allow",
                     "envoy.filters.http.router"]
    actions = []
    for http_filter in manager.http_filters[:2]:
        rbac = http_rbac_pb2.RBAC()
        assert http_filter.typed_config.Unpack(rbac)
        actions.append(rbac.rules.action)
    assert actions == [rbac_pb2.RBAC.Action.DENY, rbac_pb2.RBAC.Action.ALLOW]
