"""Load balancing through real Envoy: consistent hashing keeps a client on its host."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_text
from tests.support.procs import wait_for
from tests.test_e2e import Lab, lab  # noqa: F401 (fixture)

# Every test here is bounded: a hung Envoy or backend fails the test, not the suite.
pytestmark = pytest.mark.timeout(180)


def write(target: Lab, balancer: dict[str, object]) -> None:
    backends = target.backends
    target.mesh.write_text(yaml.safe_dump({"services": [{
        "name": "reviews", "port": 9080, "policy": {"load_balancer": balancer},
        "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends]}]}))


@pytest.mark.e2e
@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_hash_on_a_header_keeps_each_client_on_one_host(lab: Lab, policy: str) -> None:  # noqa: F811
    for i in range(3):
        lab.backend(f"reviews-{i + 1}")
    write(lab, {"policy": policy, "hash": {"header": "x-user"}})
    lab.serve()
    envoy = lab.envoy("frontend-1", delta=False)
    wait_for(lambda: envoy.request("reviews", headers={"x-user": "u0"})[0] == 200,
             what="reviews routed")
    chosen: dict[str, Counter[str]] = {}
    for user in (f"user-{n}" for n in range(20)):
        chosen[user] = Counter(envoy.request("reviews", headers={"x-user": user})[1]
                               for _ in range(5))
    assert all(len(hosts) == 1 for hosts in chosen.values()), chosen  # sticky per user
    spread = {next(iter(hosts)) for hosts in chosen.values()}
    assert len(spread) >= 2, f"20 users all hashed to {spread}"  # and users spread out


def test_hash_settings_are_checked() -> None:
    def problems(balancer: str) -> list[str]:
        with pytest.raises(MeshError) as info:
            load_mesh_text(
                f"services: [{{name: a, port: 80, policy: {{load_balancer: {balancer}}}}}]")
        return info.value.problems

    assert "ring_hash needs hash" in problems("{policy: ring_hash}")[0]
    assert "hash only applies to ring_hash and maglev" in problems(
        "{policy: round_robin, hash: {header: x}}")[0]
    assert "exactly one of header, cookie, source_ip" in problems(
        "{policy: maglev, hash: {header: x, source_ip: true}}")[0]
    assert "cookie_ttl goes with cookie" in problems(
        "{policy: maglev, hash: {source_ip: true, cookie_ttl: 1s}}")[0]




@pytest.mark.e2e
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_the_own_zone_is_preferred_and_failed_over(lab: Lab, delta: bool) -> None:  # noqa: F811
    near, far = lab.backend("reviews-zone-a"), lab.backend("reviews-zone-b")

    def mesh(near_ready: bool) -> None:
        lab.mesh.write_text(yaml.safe_dump({"services": [{
            "name": "reviews", "port": 9080, "endpoints": [
                {"address": "127.0.0.1", "port": near.port, "zone": "zone-a",
                 "ready": near_ready},
                {"address": "127.0.0.1", "port": far.port, "zone": "zone-b"}]}]}))

    mesh(near_ready=True)
    lab.serve()
    local = lab.envoy("frontend-a", delta, extra=["--zone", "zone-a"])
    plain = lab.envoy("frontend-x", delta)  # no zone: no preference

    def seen(envoy: object, count: int = 20) -> set[str]:
        return {envoy.request("reviews")[1] for _ in range(count)}  # type: ignore[attr-defined]

    wait_for(lambda: seen(local) == {"reviews-zone-a"}, what="zone-a preferred")
    assert seen(local, 40) == {"reviews-zone-a"}
    wait_for(lambda: seen(plain) == {"reviews-zone-a", "reviews-zone-b"}, what="no preference")
    mesh(near_ready=False)  # zone-a emptied: fail over to zone-b
    wait_for(lambda: seen(local) == {"reviews-zone-b"}, what="failed over to zone-b")
    mesh(near_ready=True)  # and back
    wait_for(lambda: seen(local) == {"reviews-zone-a"}, what="back to zone-a")


def test_prefer_zone_sets_priorities_only_when_it_matters() -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

    from controlplane.translator.locality import prefer_zone

    def cla(*zones: str) -> endpoint_pb2.ClusterLoadAssignment:
        return endpoint_pb2.ClusterLoadAssignment(cluster_name="c", endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(locality=base_pb2.Locality(zone=z))
            for z in zones])

    preferred = prefer_zone(cla("zone-a", "zone-b", "zone-c"), "zone-b")
    assert preferred is not None
    assert [(g.locality.zone, g.priority) for g in preferred.endpoints] == [
        ("zone-a", 1), ("zone-b", 0), ("zone-c", 1)]
    assert prefer_zone(cla("zone-a", "zone-b"), "") is None  # a proxy without a zone
    assert prefer_zone(cla("zone-a", "zone-b"), "zone-x") is None  # nothing local: as is
    assert prefer_zone(cla("zone-a"), "zone-a") is None  # all local: as is
