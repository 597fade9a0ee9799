"""The mesh model's capture fields: a service's cluster IPs and the mesh's outbound
traffic policy, each refused with an error naming the object and the field; and a
proxy's ``capture`` flag read from its node metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2

from controlplane.errors import MeshError
from controlplane.mesh import MeshLoader, load_mesh_text
from controlplane.proxy import ProxyIdentity


def _problems(text: str) -> list[str]:
    with pytest.raises(MeshError) as caught:
        load_mesh_text(text)
    return caught.value.problems


def test_cluster_ips_and_the_outbound_policy_are_read() -> None:
    mesh = load_mesh_text("""outbound_traffic_policy: REGISTRY_ONLY
services:
  - {name: reviews, port: 9080, cluster_ips: [10.96.0.10, "fd00:0::a"]}
  - {name: db, port: 5432, protocol: tcp, endpoints: [{address: 10.1.0.4, port: 5432}]}
""")
    reviews, db = mesh.services
    assert mesh.outbound_traffic_policy == "REGISTRY_ONLY"
    assert reviews.cluster_ips == ["10.96.0.10", "fd00::a"]  # IPv6 in its short form
    assert db.cluster_ips is None and db.headless and not reviews.headless
    assert load_mesh_text("services: []").outbound_traffic_policy == "ALLOW_ANY"


def test_a_cluster_ip_of_two_services_names_both() -> None:
    [problem] = _problems("""services:
  - {name: reviews, port: 9080, cluster_ips: [10.96.0.10]}
  - {name: ratings, port: 9080, cluster_ips: [10.96.0.11, 10.96.0.10]}
""")
    assert problem.startswith("services[1] (ratings.default).cluster_ips[1]: ")
    assert "10.96.0.10 is also the cluster IP of reviews.default (services[0])" in problem


@pytest.mark.parametrize(("value", "expected"), [
    ("[127.0.0.1]", "cluster_ips[0]: cluster IP '127.0.0.1' is a loopback"),
    ("[0.0.0.0]", "cluster_ips[0]: cluster IP '0.0.0.0' is a loopback, unspecified"),
    ("[reviews]", "cluster_ips[0]: address 'reviews' is not an IP address"),
    ("[10.0.0.1, 10.0.0.1]", "cluster_ips: 10.0.0.1 is listed twice"),
    ("[]", "cluster_ips: List should have at least 1 item"),
])
def test_bad_cluster_ips_are_named(value: str, expected: str) -> None:
    [problem] = _problems(f"services:\n  - {{name: reviews, port: 9080, cluster_ips: {value}}}\n")
    assert problem.startswith("services[0] (reviews.default).")
    assert expected in problem


def test_an_external_name_has_no_cluster_ip() -> None:
    [problem] = _problems("""services:
  - {name: billing, port: 443, protocol: tcp, external_name: billing.example.com,
     cluster_ips: [10.96.0.12]}
""")
    assert "a service with external_name has none" in problem


def test_a_bad_outbound_policy_is_named() -> None:
    [problem] = _problems("outbound_traffic_policy: allow_any\nservices: []\n")
    assert problem.startswith("outbound_traffic_policy: ")
    assert "'ALLOW_ANY' or 'REGISTRY_ONLY'" in problem


def test_the_incremental_loader_reads_the_policy_and_sees_it_change() -> None:
    loader = MeshLoader()
    text = ("outbound_traffic_policy: %s\nservices:\n"
            "  - {name: a, port: 80, cluster_ips: [10.9.0.1]}\n")
    first = loader.load((text % "REGISTRY_ONLY").encode())
    assert loader.parsed == 1 and first.outbound_traffic_policy == "REGISTRY_ONLY"
    second = loader.load((text % "ALLOW_ANY").encode())
    assert loader.parsed == 0  # the service was known: only the frame was read again
    assert second.outbound_traffic_policy == "ALLOW_ANY" and second != first


def test_the_incremental_loader_refuses_a_null_policy_as_the_full_load_does() -> None:
    text = b"outbound_traffic_policy: null\nservices:\n  - {name: a, port: 80}\n"
    with pytest.raises(MeshError) as caught:
        MeshLoader().load(text)
    assert caught.value.problems == ["outbound_traffic_policy: Input should be 'ALLOW_ANY' "
                                     "or 'REGISTRY_ONLY'"]


def _node(**metadata: str) -> base_pb2.Node:
    node = base_pb2.Node(id="reviews-1.default", cluster="reviews")
    for key, value in metadata.items():
        node.metadata.fields[key].string_value = value
    return node


def test_capture_comes_from_node_metadata() -> None:
    captured = ProxyIdentity.from_node(_node(capture="true", egress_port="15001",
                                             inbound_port="15006"))
    assert captured.capture and captured.inbound_port == 15006 and captured.app_port is None
    assert captured.group == "reviews.default~egress=15001~capture"
    # 15006 by default; an app port given by mistake is ignored (no app port in capture)
    assert ProxyIdentity.from_node(_node(capture="true", app_port="9080")).inbound_port == 15006
    plain = ProxyIdentity.from_node(_node(capture="false", inbound_port="15006", app_port="9080"))
    assert not plain.capture and plain.app_port == 9080 and "~capture" not in plain.group


def test_the_captured_example_is_valid_and_a_real_envoy_accepts_its_sidecar() -> None:
    from controlplane.mesh import load_mesh_file
    from controlplane.translator import translate
    from tests.support.envoy_validate import rejected

    example = Path(__file__).parent.parent / "examples" / "captured-mesh.yaml"
    mesh = load_mesh_file(example)
    assert mesh.outbound_traffic_policy == "REGISTRY_ONLY"
    proxies = [ProxyIdentity(node_id=f"{s.name}-0.default", service=s.name, capture=True)
               for s in mesh.services[:2]]
    assert not rejected([translate(mesh, proxy) for proxy in proxies])
