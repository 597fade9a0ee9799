"""What captured sidecars route by, from the cluster: each Service's ClusterIPs (none for
headless and ExternalName Services), and the mesh's outbound traffic policy from the
serve setting (a cluster has no object that says it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controlplane.settings import ServeSettings
from controlplane.sources import open_source
from controlplane.sources.kubernetes import Debounce, KubernetesSource, WatchTiming
from controlplane.sources.kubernetes.convert import convert
from controlplane.sources.kubernetes.services import Malformed, cluster_ips_of
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, service


def external(name: str) -> dict[str, Any]:
    obj = service(name).port(443, name="tls").build()
    obj["spec"] = {"type": "ExternalName", "externalName": "billing.example.com",
                   "ports": obj["spec"]["ports"]}
    return obj


@pytest.mark.parametrize(("spec", "expected"), [
    ({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"]},
     ["10.96.0.10", "fd00::a"]),
    ({"clusterIP": "10.96.0.11"}, ["10.96.0.11"]),  # an older server: no clusterIPs
    ({"clusterIP": "None", "clusterIPs": ["None"]}, None),  # headless
    ({"type": "ExternalName", "externalName": "x.example.com"}, None),
    ({}, None),
])
def test_cluster_ips_of_a_spec(spec: dict[str, Any], expected: list[str] | None) -> None:
    assert cluster_ips_of(spec) == expected


def test_a_malformed_cluster_ip_list_names_the_field() -> None:
    with pytest.raises(Malformed, match=r"spec.clusterIPs\[0\]"):
        cluster_ips_of({"clusterIPs": [7]})


def test_services_from_the_api_server_carry_their_cluster_ips() -> None:
    with ApiServerDouble(crd_installed=False) as api:
        reviews = api.create(service("reviews").port(9080, name="http").build())
        headless = api.create(service("db").port(5432, name="tcp-pg").headless().build())
        billing = api.create(external("billing"))
        slices = [api.create(endpoint_slice("db-1", service="db")
                             .endpoint("10.231.0.2").port(5432, name="tcp-pg").build())]
        mesh = convert([reviews, headless, billing], slices, []).mesh
    by_name = {s.name: s for s in mesh.services}
    assert by_name["reviews"].cluster_ips == [reviews["spec"]["clusterIP"]]
    assert by_name["db"].cluster_ips is None
    assert [e.address for e in by_name["db"].endpoints] == ["10.231.0.2"]
    assert by_name["billing"].cluster_ips is None
    assert mesh.outbound_traffic_policy == "ALLOW_ANY"


def test_the_outbound_policy_is_the_setting() -> None:
    mesh = convert([service("a").port(80).build()], [], [],
                   outbound_traffic_policy="REGISTRY_ONLY").mesh
    assert mesh.outbound_traffic_policy == "REGISTRY_ONLY"


async def test_the_source_yields_meshes_with_the_configured_policy(tmp_path: Path) -> None:
    with ApiServerDouble(crd_installed=False) as api:
        api.create(service("reviews").port(9080, name="http").build())
        settings = ServeSettings(source="kubernetes",
                                 kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
                                 outbound_traffic_policy="REGISTRY_ONLY")
        source = open_source(settings)
        assert isinstance(source, KubernetesSource)
        source.timing = WatchTiming(server_timeout=30, inactivity=5, backoff_initial=0.1)
        source.debounce = Debounce(quiet=0.05, max_delay=1.0)
        updates = source.updates()
        try:
            mesh = await asyncio.wait_for(anext(updates), 10)
        finally:
            await updates.aclose()
    assert mesh.outbound_traffic_policy == "REGISTRY_ONLY"
    (reviews,) = mesh.services
    assert reviews.cluster_ips is not None and len(reviews.cluster_ips) == 1

