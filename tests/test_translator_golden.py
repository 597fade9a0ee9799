"""Golden files for the translator: each ``in/<case>.yaml`` (a mesh file plus a
``proxy:`` block) must translate to exactly ``out/<case>.yaml``.

Regenerate with ``pytest --update-golden`` and review the diff like code.
"""

from __future__ import annotations

import difflib
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.mesh.security import MeshIdentity
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources, resource_name, translate
from tests.support.envoy_validate import rejected
from tests.test_security_translate import envoy_rejects, static_bootstrap

DATA = Path(__file__).parent / "testdata" / "translator"
IN = DATA / "in"
OUT = DATA / "out"
CASES = sorted(path.stem for path in IN.glob("*.yaml"))
SECTIONS = {
    "listeners": resource.LISTENER,
    "routes": resource.ROUTE,
    "clusters": resource.CLUSTER,
    "endpoints": resource.ENDPOINT,
    "secrets": resource.SECRET,
}


def load_case(name: str) -> tuple[Mesh, ProxyIdentity]:
    """``server_identity``, when given, is the identity the server sets when it runs a
    CA (a mesh file cannot)."""
    path = IN / f"{name}.yaml"
    data = parse_mesh_yaml(path.read_text(encoding="utf-8"))
    proxy = ProxyIdentity(**data.pop("proxy"))
    identity = data.pop("server_identity", None)
    mesh = load_mesh_data(data, origin=str(path))
    if identity is not None:
        mesh = mesh.model_copy(update={"identity": MeshIdentity(**identity)})
    return mesh, proxy


def render(resources: Resources) -> str:
    document: dict[str, list[Any]] = {}
    for section, type_url in SECTIONS.items():
        messages = resources[type_url]
        if section == "secrets" and not messages:
            continue
        document[section] = [to_dict(message) for message in messages]
    return yaml.safe_dump(document, sort_keys=False, width=100)


def to_dict(message: Message) -> Any:
    """MessageToDict, with map and Struct keys sorted: protobuf iterates maps in an
    order that changes from one process to the next."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _sort_maps(data, message.DESCRIPTOR)


def _sort_maps(data: Any, descriptor: Descriptor) -> Any:
    if isinstance(data, list):
        return [_sort_maps(item, descriptor) for item in data]
    if not isinstance(data, dict):
        return data
    if descriptor.full_name in ("google.protobuf.Struct", "google.protobuf.Value"):
        return _sort_all(data)
    if "@type" in data:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(
            data["@type"].rsplit("/", 1)[-1]
        )
    result: dict[str, Any] = {}
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None or field.type != FieldDescriptor.TYPE_MESSAGE:
            result[key] = value
        elif field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            result[key] = {
                k: _sort_maps(v, value_field.message_type)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE
                else v
                for k, v in sorted(value.items())
            }
        else:
            result[key] = _sort_maps(value, field.message_type)
    return result


def _sort_all(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _sort_all(data[key]) for key in sorted(data)}
    if isinstance(data, list):
        return [_sort_all(item) for item in data]
    return data


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    mesh, proxy = load_case(case)
    actual = render(translate(mesh, proxy))
    golden = OUT / f"{case}.yaml"
    if request.config.getoption("--update-golden"):
        OUT.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
        return
    assert golden.exists(), f"{golden} is missing; run pytest --update-golden"
    expected = golden.read_text(encoding="utf-8")
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"out/{case}.yaml (golden)",
            tofile=f"out/{case}.yaml (actual)",
        )
        pytest.fail("translation differs from the golden file:\n" + "".join(diff), False)


def test_every_golden_output_is_accepted_by_a_real_envoy() -> None:
    """No golden output is one Envoy would reject: every case's resources, as static
    resources in one bootstrap, pass ``envoy --mode validate`` (EDS clusters carry their
    ClusterLoadAssignment inline, so endpoints and addresses are checked too)."""
    cases = [case for case in CASES if load_case(case)[0].identity is None]
    translations = [translate(*load_case(case)) for case in cases]
    refused = rejected(translations)
    assert not refused, {cases[i]: error for i, error in refused.items()}


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("security_")])
def test_security_golden_output_is_accepted_by_a_real_envoy(case: str, tmp_path: Path) -> None:
    """The cases with mesh mTLS, with the two SDS secrets as static secrets of the same
    names (a validating Envoy has no ADS stream to fetch them on)."""
    error = envoy_rejects(static_bootstrap(translate(*load_case(case))), tmp_path)
    assert error is None, error


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    stale = sorted(path for path in OUT.glob("*.yaml") if path.stem not in CASES)
    if request.config.getoption("--update-golden"):
        for path in stale:
            path.unlink()
        return
    assert not stale, f"golden files without an input (run pytest --update-golden): {stale}"


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
