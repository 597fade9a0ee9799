"""Golden files for the translator: each ``in/<case>.yaml`` (a mesh file plus a
``proxy:`` block) must translate to exactly ``out/<case>.yaml``.

Regenerate with ``pytest --update-golden`` and review the diff like code.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources, resource_name, translate
from tests.support.golden import Goldens, assert_envoy_accepts, to_dict
from tests.test_security_translate import envoy_rejects, static_bootstrap

GOLDENS = Goldens(Path(__file__).parent / "testdata" / "translator")
IN = GOLDENS.inputs
CASES = GOLDENS.cases
SECTIONS = {
    "listeners": resource.LISTENER,
    "routes": resource.ROUTE,
    "clusters": resource.CLUSTER,
    "endpoints": resource.ENDPOINT,
    "secrets": resource.SECRET,
}


def load_case(name: str) -> tuple[Mesh, ProxyIdentity]:
    return GOLDENS.load(name)


def render(resources: Resources) -> str:
    document: dict[str, list[Any]] = {}
    for section, type_url in SECTIONS.items():
        messages = resources[type_url]
        if section == "secrets" and not messages:
            continue
        document[section] = [to_dict(message) for message in messages]
    return yaml.safe_dump(document, sort_keys=False, width=100)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    GOLDENS.check(case, render(translate(*load_case(case))), request)


def test_every_golden_output_is_accepted_by_a_real_envoy() -> None:
    """No golden output is one Envoy would reject: every case's resources, as static
    resources in one bootstrap, pass ``envoy --mode validate`` (EDS clusters carry their
    ClusterLoadAssignment inline, so endpoints and addresses are checked too)."""
    loaded = {case: load_case(case) for case in CASES}
    assert_envoy_accepts({case: translate(*made) for case, made in loaded.items()
                          if made[0].identity is None})


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("security_")])
def test_security_golden_output_is_accepted_by_a_real_envoy(case: str, tmp_path: Path) -> None:
    """The cases with mesh mTLS, with the two SDS secrets as static secrets of the same
    names (a validating Envoy has no ADS stream to fetch them on)."""
    error = envoy_rejects(static_bootstrap(translate(*load_case(case))), tmp_path)
    assert error is None, error


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request)


def test_the_required_cases_exist() -> None:
    required = {
        "basic",
        "inbound",
        "grpc_and_tcp",
        "namespaces",
        "policies",
        "empty",
        "multiport",
        "external_name",
        "resilience",
        "traffic_split", "traffic_multiport",
        "edge",
        "dns_endpoints",
        "scoped", "exported",
        "capture", "capture_registry_only",
        "security_permissive", "security_strict_authz", "security_tcp", "security_capture",
        "security_capture_strict", "security_no_identity",
    }
    assert required <= set(CASES)


def _fingerprint(resources: Resources) -> str:
    digest = hashlib.sha256()
    for type_url in sorted(resources):
        for message in resources[type_url]:
            digest.update(type_url.encode())
            digest.update(message.SerializeToString(deterministic=True))
    return digest.hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_translation_is_deterministic(case: str) -> None:
    mesh, proxy = load_case(case)
    first, second = translate(mesh, proxy), translate(mesh, proxy)
    assert set(first) == set(second) == set(SECTIONS.values())
    for type_url in first:
        assert [m.SerializeToString(deterministic=True) for m in first[type_url]] == [
            m.SerializeToString(deterministic=True) for m in second[type_url]
        ]


def test_deterministic_across_processes() -> None:
    """Two control plane replicas must compute the same versions from the same mesh."""
    script = (
        "import sys; sys.path[:0] = sys.argv[1:];"
        "import test_translator_golden as t;"
        "print(t._fingerprint(t.translate(*t.load_case('basic'))))"
    )
    tests = Path(__file__).parent
    paths = [str(tests), str(tests.parent)]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, *paths], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert outputs == {_fingerprint(translate(*load_case("basic")))}


@pytest.mark.parametrize("case", CASES)
def test_resources_are_consistent(case: str) -> None:
    """What a snapshot must satisfy to be published: every route target and every EDS
    cluster resolves, and every list is sorted by name."""
    mesh, proxy = load_case(case)
    resources = translate(mesh, proxy)
    for messages in resources.values():
        names = [resource_name(m) for m in messages]
        assert names == sorted(names)
        assert len(names) == len(set(names))

    clusters = {c.name: c for c in resources[resource.CLUSTER]}
    assignments = {resource_name(a) for a in resources[resource.ENDPOINT]}
    for route_config in resources[resource.ROUTE]:
        for host in route_config.virtual_hosts:
            for route in host.routes:
                action = route.route
                targets = {action.cluster, *(w.name for w in action.weighted_clusters.clusters)}
                assert targets - {""} <= clusters.keys() and targets != {""}, route
    for name, cluster in clusters.items():
        if cluster.HasField("eds_cluster_config"):
            assert cluster.eds_cluster_config.service_name in assignments, name
    assert {resource_name(r) for r in resources[resource.ROUTE]} == {"egress"}


def test_tcp_services_have_clusters_but_no_routes() -> None:
    mesh, proxy = load_case("grpc_and_tcp")
    resources = translate(mesh, proxy)
    hosts = [h.name for r in resources[resource.ROUTE] for h in r.virtual_hosts]
    assert "redis.default" not in hosts
    assert any("redis" in resource_name(c) for c in resources[resource.CLUSTER])


def test_resource_name() -> None:
    mesh, proxy = load_case("basic")
    resources = translate(mesh, proxy)
    assert resource_name(resources[resource.LISTENER][0]) == "egress"
    cla = resources[resource.ENDPOINT][0]
    assert resource_name(cla) == cla.cluster_name


@pytest.mark.parametrize("case", CASES)
def test_assembly_serves_what_translate_gives(case: str) -> None:
    """MeshBuild encodes each service's clusters and load assignments as one unit; the
    snapshot it builds must hold exactly the translator's resources, and be consistent."""
    mesh, proxy = load_case(case)
    snapshot = MeshBuild(mesh).snapshot(proxy)
    assert snapshot.problems() == []
    for type_url, messages in translate(mesh, proxy).items():
        typed = snapshot.get(type_url)
        assert typed is not None
        assert {n: r.message for n, r in typed.resources.items()} == {
            resource_name(m): m for m in messages
        }


def test_multiport_routes_each_http_port_and_gives_bare_names_once() -> None:
    mesh, proxy = load_case("multiport")
    [route] = translate(mesh, proxy)[resource.ROUTE]
    hosts = {h.name: list(h.domains) for h in route.virtual_hosts}
    assert set(hosts) == {"api.default:80", "api.default:9090", "reviews.default", "stats.ops:8080"}
    every = [d for ds in hosts.values() for d in ds]
    assert len(every) == len(set(every))  # Envoy rejects a domain in two virtual hosts
    assert "api" in hosts["api.default:80"] and "api.default:9090" in hosts["api.default:9090"]
    assert "stats.ops" in hosts["stats.ops:8080"]  # the first HTTP port, after a TCP one


def test_multiport_endpoints_serve_only_the_ports_they_name() -> None:
    mesh, proxy = load_case("multiport")
    assignments = {resource_name(a): a for a in translate(mesh, proxy)[resource.ENDPOINT]}

    def addresses(port: int) -> list[str]:
        cla = assignments[f"outbound|{port}||api.default.svc.cluster.local"]
        return [
            e.endpoint.address.socket_address.address
            for locality in cla.endpoints
            for e in locality.lb_endpoints
        ]

    assert addresses(80) == ["10.0.0.7", "10.0.0.8"]  # 10.0.0.10 is not ready
    assert addresses(9090) == ["10.0.0.7", "10.0.0.9"]
    assert addresses(6379) == ["10.0.0.7", "10.0.0.9"]


def test_external_names_resolve_by_dns_and_have_no_assignments() -> None:
    mesh, proxy = load_case("external_name")
    resources = translate(mesh, proxy)
    external = [c for c in resources[resource.CLUSTER] if c.type == c.DiscoveryType.STRICT_DNS]
    assert {c.name for c in external} == {
        "outbound|443||billing.payments.svc.cluster.local",
        "outbound|80||weather.default.svc.cluster.local",
    }
    assignments = {resource_name(a) for a in resources[resource.ENDPOINT]}
    assert not assignments & {c.name for c in external}
    hosts = [h.name for r in resources[resource.ROUTE] for h in r.virtual_hosts]
    assert "weather.default" in hosts and "billing.payments" not in hosts


def test_dns_endpoints_make_strict_dns_clusters_with_inline_endpoints() -> None:
    mesh, proxy = load_case("dns_endpoints")
    resources = translate(mesh, proxy)
    clusters = {c.name: c for c in resources[resource.CLUSTER]}
    legacy = clusters["outbound|5432||legacy.default.svc.cluster.local"]
    assert legacy.type == legacy.DiscoveryType.STRICT_DNS
    assert not legacy.HasField("eds_cluster_config")
    hosts = [(group.locality.zone, e.endpoint.address.socket_address.address)
             for group in legacy.load_assignment.endpoints for e in group.lb_endpoints]
    assert hosts == [("zone-a", "db-1.legacy.example.com"), ("zone-b", "db-2.legacy.example.com")]
    v1 = clusters["outbound|9200|version=v1|search.default.svc.cluster.local"]
    assert v1.type == v1.DiscoveryType.STRICT_DNS
    assert [e.endpoint.address.socket_address.address for group in v1.load_assignment.endpoints
            for e in group.lb_endpoints] == ["search-v1.example.com"]
    assignments = {resource_name(a) for a in resources[resource.ENDPOINT]}
    assert assignments == {"outbound|80||web.default.svc.cluster.local"}


def test_a_port_change_reencodes_only_what_changed() -> None:
    """The per-service unit with several ports: the resources of untouched ports keep
    their encoded objects when one port's endpoints change."""
    mesh, proxy = load_case("multiport")
    first = MeshBuild(mesh)
    data = parse_mesh_yaml((IN / "multiport.yaml").read_text(encoding="utf-8"))
    del data["proxy"]
    data["services"][0]["endpoints"][1]["ports"]["http"] = 8081  # 10.0.0.8 serves only http
    second = MeshBuild(load_mesh_data(data), previous=first)
    before = first.snapshot(proxy)
    after = second.snapshot(proxy, reuse=before)

    def changed(type_url: str) -> set[str]:
        old, new = before.get(type_url), after.get(type_url)
        assert old is not None and new is not None
        return {n for n, r in new.resources.items() if r is not old.resources[n]}

    assert changed(resource.ENDPOINT) == {"outbound|80||api.default.svc.cluster.local"}
    assert changed(resource.CLUSTER) == set()
