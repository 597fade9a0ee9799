"""A captured sidecar's listeners and clusters (translator/capture.py) and their cost in
the assembly: what the chains match, what a real Envoy accepts, and that a change the
listener does not show (an endpoint behind a cluster IP) costs a captured group nothing.
The goldens (tests/testdata/translator/in/capture*.yaml) show the whole output; the
end-to-end tests (tests/test_capture_e2e.py) send real traffic through it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly import capture as capture_layers
from controlplane.cache import SnapshotCache
from controlplane.mesh import Mesh, load_mesh_text
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.translator import captured_egress, translate
from controlplane.translator.capture import MAX_HEADLESS_ADDRESSES
from tests.support.envoy_validate import rejected

CAPTURED = ProxyIdentity(node_id="a-1.default", service="a", capture=True)


def _listeners(mesh: Mesh, proxy: ProxyIdentity = CAPTURED) -> dict[str, listener_pb2.Listener]:
    return {str(m.name): m for m in translate(mesh, proxy)[resource.LISTENER]}


def _chains(listener: listener_pb2.Listener) -> dict[str, tuple[int, list[str]]]:
    return {c.name: (c.filter_chain_match.destination_port.value,
                     [r.address_prefix for r in c.filter_chain_match.prefix_ranges])
            for c in listener.filter_chains}


def _tcp_cluster(chain: object) -> str:
    proxy = tcp_proxy_pb2.TcpProxy()
    chain.filters[0].typed_config.Unpack(proxy)  # type: ignore[attr-defined]
    return str(proxy.cluster)


def test_an_address_two_services_claim_goes_to_the_first_and_envoy_accepts_it() -> None:
    """A pod behind two headless services (same port), and a headless endpoint on a
    cluster IP's address: each (address, port) is matched by one chain only, cluster
    IPs first, then services by key (Envoy refuses two chains with the same match)."""
    mesh = load_mesh_text("""services:
  - {name: a, port: 80, cluster_ips: [10.96.0.1]}
  - {name: db-primary, port: 5432, protocol: tcp, endpoints: [{address: 10.1.0.1, port: 5432}]}
  - {name: db-all, port: 5432, protocol: tcp, endpoints: [{address: 10.1.0.1, port: 5432},
                                                          {address: 10.1.0.2, port: 5432}]}
  - {name: odd, port: 80, protocol: tcp, endpoints: [{address: 10.96.0.1, port: 80}]}
""")
    egress = _listeners(mesh)["egress"]
    assert _chains(egress) == {
        "egress": (15001, ["127.0.0.1"]),
        "http~80": (80, ["10.96.0.1"]),
        "outbound|5432||db-all.default.svc.cluster.local": (5432, ["10.1.0.1", "10.1.0.2"]),
    }  # db-primary's one address is db-all's already; odd's is a's cluster IP
    assert not rejected([translate(mesh, CAPTURED)])


def test_headless_addresses_are_capped_and_a_headless_tcp_call_keeps_its_pod() -> None:
    endpoints = ", ".join(f"{{address: 10.1.{i // 250}.{i % 250 + 1}, port: 9042}}"
                          for i in range(MAX_HEADLESS_ADDRESSES + 50))
    mesh = load_mesh_text(f"services:\n  - {{name: cassandra, port: 9042, protocol: tcp, "
                          f"endpoints: [{endpoints}]}}\n")
    [chain] = [c for c in _listeners(mesh)["egress"].filter_chains if c.name != "egress"]
    assert len(chain.filter_chain_match.prefix_ranges) == MAX_HEADLESS_ADDRESSES
    assert _tcp_cluster(chain) == "passthrough"  # the caller's choice of pod stands


def test_tcp_services_with_a_cluster_ip_get_their_cluster_and_an_idle_timeout() -> None:
    mesh = load_mesh_text("""services:
  - {name: echo, port: 7000, protocol: tcp, cluster_ips: [10.96.0.7],
     endpoints: [{address: 10.1.0.7, port: 7007}],
     policy: {circuit_breaker: {max_connections: 3}, load_balancer: {policy: least_request}}}
""")
    resources = translate(mesh, CAPTURED)
    [chain] = [c for c in _listeners(mesh)["egress"].filter_chains if c.name != "egress"]
    proxy = tcp_proxy_pb2.TcpProxy()
    chain.filters[0].typed_config.Unpack(proxy)
    assert proxy.cluster == "outbound|7000||echo.default.svc.cluster.local"
    assert proxy.idle_timeout.seconds == 3600
    [cluster] = [c for c in resources[resource.CLUSTER] if c.name == proxy.cluster]
    assert cluster.circuit_breakers.thresholds[0].max_connections.value == 3
    assert cluster.lb_policy == cluster.LbPolicy.LEAST_REQUEST


def test_the_default_chain_follows_the_outbound_traffic_policy() -> None:
    text = """outbound_traffic_policy: %s
services:
  - {name: a, port: 9080, cluster_ips: [10.96.0.1]}
  - {name: redis, port: 6379, protocol: tcp, cluster_ips: [10.96.0.2]}
"""
    allow = _listeners(load_mesh_text(text % "ALLOW_ANY"))["egress"]
    assert _tcp_cluster(allow.default_filter_chain) == "passthrough"
    assert [f.name for f in allow.listener_filters] == ["envoy.filters.listener.original_dst"]
    only = _listeners(load_mesh_text(text % "REGISTRY_ONLY"))["egress"]
    assert _tcp_cluster(only.default_filter_chain) == "blackhole"
    _, inspector = only.listener_filters
    assert inspector.name == "envoy.filters.listener.http_inspector"
    # no HTTP sniffing on the TCP service's port: a server-first protocol would wait
    assert inspector.filter_disabled.destination_port_range.start == 6379
    refusals = {c.name: c.filter_chain_match for c in only.filter_chains
                if c.name.startswith("registry-only")}
    assert set(refusals) == {"registry-only", "registry-only~9080", "registry-only~15001"}
    assert list(refusals["registry-only~9080"].application_protocols) == [
        "http/1.0", "http/1.1", "h2c"]


def test_an_external_host_that_is_one_of_its_own_names_is_listed_once() -> None:
    """REGISTRY_ONLY lists external services' names in its refusal route table: an
    external host that is the service's own ``name.namespace`` (or its short name) was
    listed twice, which Envoy refuses ("Duplicate entry of domain"; found by
    test_mesh_properties)."""
    mesh = load_mesh_text("""outbound_traffic_policy: REGISTRY_ONLY
services:
  - {name: a, port: 9080, cluster_ips: [10.96.0.1]}
  - {name: zzz, namespace: ns, port: 267, external_name: zzz.ns}
  - {name: api, port: 80, external_name: api}
""")
    egress = _listeners(mesh)["egress"]
    assert egress.filter_chains
    assert not rejected([translate(mesh, CAPTURED)])


def test_the_inbound_listener_serves_its_own_ports_and_refuses_a_loop() -> None:
    mesh = load_mesh_text("""services:
  - name: a
    ports: [{name: http, port: 80, protocol: http}, {name: grpc, port: 9090, protocol: grpc}]
    endpoints: [{address: 10.1.0.1, ports: {http: 8080, grpc: 9090}}]
""")
    inbound = _listeners(mesh)["inbound"]
    assert inbound.address.socket_address.port_value == 15006
    assert _chains(inbound) == {"inbound-loop": (15006, []),
                                "inbound|8080||a.default.svc.cluster.local": (8080, []),
                                "inbound|9090||a.default.svc.cluster.local": (9090, [])}
    assert _tcp_cluster(inbound.filter_chains[0]) == "blackhole"
    assert _tcp_cluster(inbound.default_filter_chain) == "inbound-passthrough"
    clusters = {c.name: c for c in translate(mesh, CAPTURED)[resource.CLUSTER]}
    grpc = clusters["inbound|9090||a.default.svc.cluster.local"]
    assert grpc.type == grpc.DiscoveryType.ORIGINAL_DST
    assert grpc.upstream_bind_config.source_address.address == "127.0.0.6"
    assert grpc.typed_extension_protocol_options  # HTTP/2 to a gRPC app


def test_cluster_ips_are_route_domains_for_every_sidecar() -> None:
    mesh = load_mesh_text("services:\n  - {name: a, port: 9080, cluster_ips: [10.96.0.1, "
                          "'fd00::1']}\n")
    plain = ProxyIdentity(node_id="p", service="x")
    [table] = translate(mesh, plain)[resource.ROUTE]
    domains = list(table.virtual_hosts[0].domains)
    assert {"10.96.0.1", "10.96.0.1:9080", "[fd00::1]", "[fd00::1]:9080"} <= set(domains)
    assert [m.name for m in translate(mesh, plain)[resource.LISTENER]] == ["egress"]


RING = """outbound_traffic_policy: %s
services:
""" + "".join(f"  - {{name: svc-{i}, port: 9080, cluster_ips: [10.96.0.{i + 1}], endpoints: "
              f"[{{address: %s, port: 8080}}]}}\n" for i in range(6))


def _mesh(address: str = "10.1.0.4", policy: str = "ALLOW_ANY") -> Mesh:
    """svc-3's endpoint at ``address``; the others' at 10.1.0.<i + 1>."""
    return load_mesh_text(RING % (policy, *(address if i == 3 else f"10.1.0.{i + 1}"
                                            for i in range(6))))


async def test_an_endpoint_change_costs_a_captured_group_nothing_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9's O(1) per group holds for captured sidecars: behind a cluster IP, an
    endpoint change leaves every captured group's listeners and clusters the very
    objects they were; only the shared endpoints layer changes. A change the listener
    shows (a cluster IP, the outbound policy) gives one new listener, shared."""
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(_mesh())
    proxies = [ProxyIdentity(node_id=f"svc-{i}-x.default", service=f"svc-{i}", capture=True)
               for i in range(6)]
    for proxy in proxies:
        cache.connect(proxy)
    await asyncio.wait_for(asyncio.gather(*(cache.next_snapshot(p, None) for p in proxies)), 10)
    before = {p.group: cache.get(p.group) for p in proxies}
    made: list[object] = []

    def counted(*args: Any) -> Message:
        made.append(args)
        return captured_egress(*args)

    monkeypatch.setattr(capture_layers, "captured_egress", counted)
    assert pipeline.set_mesh(_mesh(address="10.1.0.40"))  # svc-3's pod replaced
    assert made == []  # the listener was not even translated again
    after = {p.group: cache.get(p.group) for p in proxies}
    for group, snapshot in after.items():
        old = before[group]
        assert snapshot is not None and old is not None
        if group != proxies[3].group:  # svc-3's own service changed: its own are redone
            assert snapshot.encoded_bytes == 0  # nothing of the group's own was serialized
        for type_url in (resource.LISTENER, resource.CLUSTER, resource.ROUTE):
            assert snapshot.get(type_url) is old.get(type_url), type_url
        assert snapshot.get(resource.ENDPOINT).changed_since(  # type: ignore[union-attr]
            old.get(resource.ENDPOINT)) == {"outbound|9080||svc-3.default.svc.cluster.local"}
    egress = {id(s.get(resource.LISTENER).layers[0])  # type: ignore[union-attr]
              for s in after.values() if s is not None}
    assert len(egress) == 1  # one listener layer for every group that sees the same

    assert pipeline.set_mesh(_mesh(address="10.1.0.40", policy="REGISTRY_ONLY"))
    assert len(made) == 1  # once, for every group (they all see every service)
    changed = {p.group: cache.get(p.group) for p in proxies}
    for group, snapshot in changed.items():
        old = after[group]
        assert snapshot is not None and old is not None
        assert snapshot.get(resource.LISTENER).changed_since(  # type: ignore[union-attr]
            old.get(resource.LISTENER)) == {"egress"}


async def test_captured_listener_layers_go_with_their_groups() -> None:
    """Scoped captured groups each have their egress listener layer; one whose groups
    are all gone is dropped (the listeners of a big mesh are not kept for nobody)."""
    text = "services:\n" + "".join(
        f"  - {{name: s{i}, port: 80, cluster_ips: [10.96.0.{i + 1}]}}\n" for i in range(3)
    ) + "sidecars:\n" + "".join(
        f"  - {{name: s{i}, namespace: default, workloadSelector: {{service: s{i}}}, "
        f"egress: [{{hosts: ['./s{(i + 1) % 3}']}}]}}\n" for i in range(3))
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    assert pipeline.set_mesh(load_mesh_text(text))
    keep, *gone = [ProxyIdentity(node_id=f"s{i}-0.default", service=f"s{i}", capture=True)
                   for i in range(3)]
    for proxy in (keep, *gone):
        cache.connect(proxy)
    await asyncio.wait_for(asyncio.gather(*(cache.next_snapshot(p, None)
                                            for p in (keep, *gone))), 10)
    build = pipeline.current
    assert build is not None
    assert len(build._capture._made) == 3  # one listener per visible set
    snapshot = cache.get(keep.group)
    listener = snapshot.get(resource.LISTENER) if snapshot is not None else None
    assert listener is not None
    [egress] = [r.message for n, r in listener.resources.items() if n == "egress"]
    assert [c.name for c in egress.filter_chains] == ["egress", "http~80"]
    for proxy in gone:
        cache.disconnect(proxy)
    pipeline.expire_groups(0.0, now=float("inf"))
    assert list(build._capture._made) == [(build.visible(keep), 15001, build.observed(keep))]
