"""Egress to services outside the mesh over TCP and TLS (issue 13 item 3): the model's
``tls`` protocol and what a TCP/TLS port accepts, the Kubernetes ExternalName conversion,
how external ports are told apart, and the assembled snapshot matching the translator.
Real traffic through real Envoy: tests/test_egress_e2e.py; the listeners themselves:
the goldens ``tests/testdata/translator/in/egress_*.yaml``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_data
from controlplane.proxy import ProxyIdentity
from controlplane.sources.kubernetes.convert import convert
from controlplane.translator import translate
from controlplane.translator.egress import external_ports
from tests.test_kube_convert import policy, svc


def _mesh(*services: dict[str, Any], policy_: str = "ALLOW_ANY") -> Any:
    return load_mesh_data({"outbound_traffic_policy": policy_, "services": list(services)})


def _problems(*services: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshError) as caught:
        _mesh(*services)
    return caught.value.problems


API = {"name": "api", "port": 443, "protocol": "tls", "external_name": "api.example.test"}
PAY = {"name": "pay", "port": 443, "protocol": "tls", "external_name": "pay.example.test"}
DB = {"name": "db", "port": 5432, "protocol": "tcp", "external_name": "db.example.test"}


# -- the model -----------------------------------------------------------------------


def test_tls_is_for_external_services_and_says_what_a_mesh_service_uses() -> None:
    [problem] = _problems({"name": "web", "port": 443, "protocol": "tls",
                           "endpoints": [{"address": "10.0.0.1", "port": 443}]})
    assert problem.startswith("services[0] (web.default).protocol: ")
    assert "tls is for an external_name service" in problem and "is tcp" in problem
    [problem] = _problems({"name": "web", "ports": [
        {"name": "http", "port": 80}, {"name": "https", "port": 443, "protocol": "tls"}]})
    assert problem.startswith("services[0] (web.default).ports[1].protocol: ")


def test_request_policy_on_an_external_tcp_service_is_refused_naming_what_applies() -> None:
    problems = _problems({**DB, "policy": {
        "timeout": "1s", "retries": {"attempts": 2}, "fault": {"abort": {"percent": 5,
                                                                         "status": 503}},
        "circuit_breaker": {"max_connections": 5, "max_requests": 2},
        "load_balancer": {"policy": "ring_hash", "hash": {"header": "x-user"}}}})
    fields = sorted(p.split(": ", 1)[0] for p in problems)
    assert fields == [f"services[0] (db.default).policy.{f}" for f in (
        "circuit_breaker.max_requests", "fault", "load_balancer.hash.header", "retries",
        "timeout")]
    assert all("does not apply: every port of this service is tcp or tls" in p
               and "connect_timeout, idle_timeout, circuit_breaker.max_connections" in p
               for p in problems)


def test_what_applies_to_tcp_is_accepted_and_lands_on_the_cluster() -> None:
    mesh = _mesh({**API, "policy": {
        "connect_timeout": "250ms", "idle_timeout": "5m",
        "circuit_breaker": {"max_connections": 7, "max_pending_requests": 3},
        "outlier_detection": {"consecutive_5xx": 2}, "load_balancer": {"policy": "random"}}})
    [cluster] = translate(mesh, ProxyIdentity(node_id="a", service="a"))[resource.CLUSTER]
    assert cluster.connect_timeout.ToMilliseconds() == 250
    assert cluster.circuit_breakers.thresholds[0].max_connections.value == 7
    assert cluster.outlier_detection.consecutive_5xx.value == 2
    assert cluster.type == cluster.DiscoveryType.STRICT_DNS


def test_a_service_with_an_http_port_keeps_its_request_policy() -> None:
    mesh = _mesh({"name": "api", "external_name": "api.example.test", "ports": [
        {"name": "http", "port": 80}, {"name": "tls", "port": 443, "protocol": "tls"}],
        "policy": {"timeout": "2s"}})
    assert mesh.services[0].policy.timeout is not None


# -- which port goes where -------------------------------------------------------------


def test_external_ports_tls_by_host_tcp_by_port_and_shared_ports_routed_by_none() -> None:
    twin = {**DB, "name": "db-twin"}  # the same host again: one destination, first by key
    other = {**DB, "name": "other-db", "external_name": "other.example.test"}
    cache = {"name": "cache", "port": 6379, "protocol": "tcp", "external_name": "c.example.test"}
    mesh = _mesh(API, PAY, DB, twin, cache, {**cache, "name": "cache-2",
                                              "external_name": "d.example.test"})
    found = external_ports(mesh.services)
    assert {p: [e.host for e in es] for p, es in found.tls.items()} == {
        443: ["api.example.test", "pay.example.test"]}
    assert {p: e.service.key for p, e in found.tcp.items()} == {5432: "db-twin.default"}
    assert found.shared == {6379: ["cache-2.default", "cache.default"]}
    assert found.opaque == {5432, 6379}
    # A tcp service on a TLS port makes it ambiguous: the port cannot be read by SNI.
    assert external_ports(_mesh(API, {**other, "port": 443}).services).shared == {
        443: ["api.default", "other-db.default"]}


# -- Kubernetes ------------------------------------------------------------------------


def test_an_external_name_service_with_a_tls_port_converts_to_a_tls_mesh_entry() -> None:
    external = svc("stripe", {"name": "https", "port": 443},
                   {"name": "db", "port": 5432, "appProtocol": "tcp"},
                   {"name": "api", "port": 8443, "appProtocol": "tls"},
                   type="ExternalName", externalName="API.Stripe.example.")
    inside = svc("web", {"name": "https", "port": 443}, clusterIP="10.96.0.9")
    result = convert([external, inside], [], [])
    stripe, web = result.mesh.service("stripe"), result.mesh.service("web")
    assert stripe is not None and web is not None
    assert stripe.external_name == "api.stripe.example"
    assert [(p.name, p.port, p.protocol) for p in stripe.service_ports] == [
        ("https", 443, "tls"), ("db", 5432, "tcp"), ("api", 8443, "tls")]
    assert web.service_ports[0].protocol == "tcp"  # a mesh service's TLS stays tcp
    assert not result.skipped


def test_a_traffic_policy_with_request_fields_on_an_external_tls_service_is_refused() -> None:
    """The Service is served without it; the TrafficPolicy's status says which field."""
    external = svc("stripe", {"name": "https", "port": 443}, type="ExternalName",
                   externalName="api.stripe.example")
    result = convert([external], [], [policy("p", "stripe", timeout="2s",
                                             connect_timeout="1s")])
    verdict = result.verdicts[("default", "p")]
    assert not verdict.accepted and verdict.reason == "Invalid"
    assert "policy.timeout" in verdict.message and "does not apply" in verdict.message
    served = result.mesh.service("stripe")
    assert served is not None and served.policy.timeout is None
    ok = convert([external], [], [policy("q", "stripe", connect_timeout="1s")])
    assert ok.verdicts[("default", "q")].accepted


# -- assembly ----------------------------------------------------------------------------


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("policy_", ["ALLOW_ANY", "REGISTRY_ONLY"])
def test_the_assembled_listeners_are_the_translators(capture: bool, policy_: str) -> None:
    mesh = _mesh(API, PAY, DB, {"name": "web", "port": 80, "cluster_ips": ["10.96.0.3"]},
                 policy_=policy_)
    proxy = ProxyIdentity(node_id="web-1", service="web", capture=capture,
                          inbound_port=15006 if capture else None)
    expected = {m.name: m.SerializeToString(deterministic=True)
                for m in translate(mesh, proxy)[resource.LISTENER]}
    build = MeshBuild(mesh)
    got = build.snapshot(proxy).get(resource.LISTENER).resources
    assert {n: r.message.SerializeToString(deterministic=True) for n, r in got.items()} \
        == expected
    if not capture:
        assert {"egress~443", "egress~5432"} <= set(expected)
    # The next build with one more external port: the loopback layer follows it.
    more = _mesh(API, PAY, DB, {**DB, "name": "ldap", "port": 636, "protocol": "tls",
                                "external_name": "ldap.example.test"},
                 {"name": "web", "port": 80, "cluster_ips": ["10.96.0.3"]}, policy_=policy_)
    after = MeshBuild(more, build).snapshot(proxy).get(resource.LISTENER).resources
    assert {n for n in after} == {m.name for m in translate(more, proxy)[resource.LISTENER]}


def test_a_mesh_without_external_tcp_ports_keeps_its_listeners() -> None:
    mesh = _mesh({"name": "web", "port": 80}, {"name": "weather", "port": 80,
                                               "external_name": "weather.example.test"})
    listeners = translate(mesh, ProxyIdentity(node_id="a", service="web"))[resource.LISTENER]
    assert [m.name for m in listeners] == ["egress"]


def test_shared_tcp_ports_are_a_warning_naming_the_services() -> None:
    from controlplane.mesh.egress import shared_port_warnings

    other = {**DB, "name": "other-db", "external_name": "other.example.test"}
    assert shared_port_warnings(_mesh(API, PAY, DB).services) == []
    [warning] = shared_port_warnings(_mesh(API, PAY, DB, other).services)
    assert warning.startswith("port 5432 is a tcp port of several external hosts "
                              "(db.default (tcp), other-db.default (tcp))")
    assert "give each its own port" in warning
    [warning] = shared_port_warnings(_mesh(API, {**other, "port": 443}).services)
    assert "(api.default (tls), other-db.default (tcp))" in warning


def test_validate_warns_of_a_shared_tcp_port(tmp_path: Path) -> None:
    """``controlplane validate`` accepts the mesh (it is valid) and says which external
    services no sidecar routes, as the file source logs ``mesh.egress_port_shared``."""
    other = {**DB, "name": "other-db", "external_name": "other.example.test"}
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump({"services": [DB, other]}))
    result = subprocess.run([sys.executable, "-m", "controlplane", "validate", "mesh.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "mesh.yaml: warning: port 5432 is a tcp port of several external hosts" \
        in result.stderr
