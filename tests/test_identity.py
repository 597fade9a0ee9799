"""A sidecar's zone and service learned from the mesh: the pod index and resolution."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from controlplane.mesh.model import Mesh, Service
from controlplane.mesh.workloads import Workload, WorkloadIndex
from controlplane.proxy import ProxyIdentity, resolve
from controlplane.sources.kubernetes.convert import convert
from controlplane.sources.kubernetes.kinds import SERVICE_NAME_LABEL


def service(name: str, *endpoints: dict[str, Any], ns: str = "shop") -> dict[str, Any]:
    return {"name": name, "namespace": ns, "port": 9080,
            "endpoints": [{"port": 8080, **e} for e in endpoints]}


def mesh(*services: dict[str, Any]) -> Mesh:
    return Mesh.model_validate({"services": list(services)})


def test_endpoints_name_their_pods_and_the_index_maps_pod_to_zone_and_services() -> None:
    m = mesh(service("reviews", {"address": "10.0.0.1", "pod": "p1", "zone": "zone-b"},
                     {"address": "10.0.0.2"}),
             service("reviews-canary", {"address": "10.0.0.1", "pod": "p1"}),
             service("ratings", {"address": "10.0.0.3", "pod": "p3"}, ns="other"))
    index = WorkloadIndex.build(m.services)
    assert dict(index.items()) == {
        "p1.shop": Workload("zone-b", ("reviews-canary.shop", "reviews.shop")),
        "p3.other": Workload("", ("ratings.other",)),
    }
    assert "10.0.0.2" not in index and len(index) == 2


def test_a_pod_name_that_is_no_pod_name_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"(?s)endpoints\.0\.pod.*Pod.s name"):
        mesh(service("reviews", {"address": "10.0.0.1", "pod": "Not_A_Pod"}))


def test_update_reads_only_new_service_objects_and_reports_the_pods_that_changed() -> None:
    reviews = service("reviews", {"address": "10.0.0.1", "pod": "p1"},
                      {"address": "10.0.0.2", "pod": "p2", "zone": "zone-a"})
    ratings = service("ratings", {"address": "10.0.0.3", "pod": "p3"})
    first = mesh(reviews, ratings)
    index, changed = WorkloadIndex().update(first.by_key)
    assert changed == {"p1.shop", "p2.shop", "p3.shop"}
    # The same objects: nothing read, nothing changed.
    again, changed = index.update(dict(first.by_key))
    assert changed == frozenset() and dict(again.items()) == dict(index.items())
    # p1 gains a zone; ratings is a new object with the same content: p3 is unchanged.
    reviews["endpoints"][0]["zone"] = "zone-b"
    second = mesh(reviews, ratings)
    later, changed = index.update(second.by_key)
    assert changed == {"p1.shop"}
    assert later.get("p1.shop") == Workload("zone-b", ("reviews.shop",))
    # ratings goes: p3 leaves the index; the others stay as they were.
    third = mesh(reviews)
    last, changed = later.update(third.by_key)
    assert changed == {"p3.shop"} and last.get("p3.shop") is None
    assert last.get("p2.shop") == Workload("zone-a", ("reviews.shop",))
    assert dict(last.items()) == dict(WorkloadIndex.build(third.services).items())


def proxy(node_id: str = "p1.shop", service: str = "p1", zone: str = "",
          namespace: str = "shop", capture: bool = True) -> ProxyIdentity:
    return ProxyIdentity(node_id=node_id, service=service, namespace=namespace, zone=zone,
                         capture=capture)


def test_resolution_fills_the_zone_and_the_service_the_bootstrap_left_out() -> None:
    m = mesh(service("reviews", {"address": "10.0.0.1", "pod": "p1", "zone": "zone-b"}))
    index = WorkloadIndex.build(m.services)
    found = resolve(proxy(), index, m.by_key)
    assert (found.zone, found.service, found.node_id) == ("zone-b", "reviews", "p1.shop")
    assert "~zone=zone-b" in found.group and found.group.startswith("reviews.shop~")
    assert found.capture and found.inbound_port == 15006
    # The bootstrap wins: its zone, and a node.cluster that is a service of the mesh.
    m2 = mesh(service("reviews", {"address": "10.0.0.1", "pod": "p1", "zone": "zone-b"}),
              service("frontend"))
    index2 = WorkloadIndex.build(m2.services)
    kept = resolve(proxy(service="frontend", zone="zone-a"), index2, m2.by_key)
    assert (kept.zone, kept.service) == ("zone-a", "frontend")


def test_a_pod_behind_several_services_takes_the_first_by_name() -> None:
    m = mesh(service("reviews", {"address": "10.0.0.1", "pod": "p1"}),
             service("api", {"address": "10.0.0.1", "pod": "p1"}))
    found = resolve(proxy(), WorkloadIndex.build(m.services), m.by_key)
    assert found.service == "api"


def test_a_node_id_of_another_namespace_is_not_resolved() -> None:
    m = mesh(service("reviews", {"address": "10.0.0.1", "pod": "p1", "zone": "zone-b"}))
    index = WorkloadIndex.build(m.services)
    stranger = proxy(node_id="p1.shop", namespace="default")
    assert resolve(stranger, index, m.by_key) is stranger


names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(pods=st.lists(st.tuples(names, st.sampled_from(["", "zone-a", "zone-b"])),
                     max_size=6, unique_by=lambda p: p[0]),
       node=names, namespace=st.sampled_from(["shop", "default"]),
       service_name=names, zone=st.sampled_from(["", "zone-c"]))
def test_a_proxy_the_index_does_not_know_is_served_unchanged(
        pods: list[tuple[str, str]], node: str, namespace: str, service_name: str,
        zone: str) -> None:
    endpoints = [{"address": f"10.0.0.{i + 1}", "pod": p, **({"zone": z} if z else {})}
                 for i, (p, z) in enumerate(pods) if p != node]
    m = mesh(service("reviews", *endpoints))
    index = WorkloadIndex.build(m.services)
    for node_id in (f"{node}.{namespace}", node, f"{node}.shop.x"):
        before = proxy(node_id=node_id, service=service_name, zone=zone, namespace=namespace)
        assert resolve(before, index, m.by_key) is before


def test_an_endpoint_slice_target_ref_becomes_the_endpoints_pod() -> None:
    spec = {"metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"ports": [{"port": 9080}], "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10"]}}
    slice_ = {"metadata": {"name": "reviews-a", "namespace": "shop",
                           "labels": {SERVICE_NAME_LABEL: "reviews"}},
              "addressType": "IPv4", "ports": [{"port": 8080}],
              "endpoints": [
                  {"addresses": ["10.0.0.1"], "conditions": {"ready": True},
                   "zone": "zone-b", "nodeName": "n1",
                   "targetRef": {"kind": "Pod", "name": "reviews-7d4f9-x2x8k",
                                 "namespace": "shop"}},
                  {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                  {"addresses": ["10.0.0.3"], "conditions": {"ready": True},
                   "targetRef": {"kind": "Node", "name": "n1"}}]}
    [reviews] = convert([spec], [slice_], []).mesh.services
    assert [(e.address, e.pod, e.zone) for e in reviews.endpoints] == [
        ("10.0.0.1", "reviews-7d4f9-x2x8k", "zone-b"), ("10.0.0.2", None, None),
        ("10.0.0.3", None, None)]
    index = WorkloadIndex.build([reviews])
    assert index.get("reviews-7d4f9-x2x8k.shop") == Workload("zone-b", ("reviews.shop",))


pod_names = st.sampled_from(["p1", "p2", "p3", "p4"])
one_service = st.lists(st.tuples(pod_names, st.sampled_from(["", "zone-a", "zone-b"])),
                       max_size=3, unique_by=lambda p: p[0])
meshes = st.dictionaries(st.sampled_from(["reviews", "ratings", "cart"]), one_service,
                         max_size=3)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(meshes, min_size=1, max_size=4))
def test_the_derived_index_equals_one_built_afresh_and_names_every_changed_pod(
        steps: list[dict[str, list[tuple[str, str]]]]) -> None:
    index = WorkloadIndex()
    kept: dict[str, Service] = {}
    for step in steps:
        m = mesh(*(service(name, *({"address": f"10.0.0.{i + 1}", "pod": p,
                                    **({"zone": z} if z else {})}
                                   for i, (p, z) in enumerate(pods)))
                   for name, pods in step.items()))
        # Services whose content is the same are handed over as the same objects.
        by_key = {k: kept[k] if kept.get(k) == s else s for k, s in m.by_key.items()}
        before = dict(index.items())
        index, changed = index.update(by_key)
        fresh = dict(WorkloadIndex.build(by_key.values()).items())
        assert dict(index.items()) == fresh
        assert changed == {p for p in before.keys() | fresh.keys()
                           if before.get(p) != fresh.get(p)}
        kept = by_key
