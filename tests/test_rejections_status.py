"""The ``Programmed`` condition (sources/kubernetes/programmed.py, status.py): which
objects shaped a Service, what a replica writes, and two replicas that never undo each
other's findings. The sources run against the API server double, which enforces the
shipped CRDs and bumps ``generation`` on spec edits as a real API server does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.observe.rejections import Rejected
from controlplane.sources.kubernetes import Debounce, KubernetesSource, api_client
from controlplane.sources.kubernetes.convert import convert
from controlplane.sources.kubernetes.kinds import (
    POLICY_KIND,
    SECURITY_POLICY_KIND,
    SIDECAR_KIND,
    TRAFFIC_POLICIES,
)
from controlplane.sources.kubernetes.policies import Verdict
from controlplane.sources.kubernetes.programmed import ACCEPTED_BY_ALL, programmed
from controlplane.sources.kubernetes.status import conditions, needs_write
from controlplane.sources.kubernetes.watch import WatchTiming
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, security_policy, service, traffic_policy
from tests.test_kube_source import Feed, next_mesh

KEY = (POLICY_KIND, "default", "reviews-policy")
ACCEPTED = Verdict(True, "Accepted", "applied to Service 'reviews'", 3)


def test_the_conversion_names_the_objects_that_shaped_each_service() -> None:
    services = [service(n).port(9080, name="http").build() for n in ("reviews", "ratings")]
    policies = [traffic_policy("reviews-policy", "reviews", {"timeout": "2s"}).build(),
                traffic_policy("broken", "ratings", {"timeout": "-1s"}).build()]
    security = [security_policy("reviews-authz", "reviews").rule(
                    "no-admin", action="deny", to=[{"paths": [{"prefix": "/admin"}]}]).build(),
                security_policy("namespace-wide").mtls("permissive").build()]
    result = convert(services, [], policies, None, (), security)
    assert result.origins == {"default/reviews": (
        (POLICY_KIND, "default", "reviews-policy"),
        (SECURITY_POLICY_KIND, "default", "reviews-authz"))}  # not the invalid, nor wide


def test_what_a_replica_wants() -> None:
    assert programmed(ACCEPTED, None, None, "a") == programmed(ACCEPTED, {}, None, "b")
    fine = programmed(ACCEPTED, None, None, "a")
    assert fine is not None and (fine.status, fine.reason, fine.message) == (
        "True", "Programmed", ACCEPTED_BY_ALL)
    bad = programmed(ACCEPTED, None, Rejected(3, "no such thing", ["cds", "rds"]), "a")
    assert bad is not None and (bad.status, bad.reason) == ("False", "Rejected")
    assert bad.message.startswith(
        "rejected by 3 proxies (cds, rds): no such thing (seen by replica a); ")
    one = programmed(ACCEPTED, None, Rejected(1, "x", ["lds"]), "a")
    assert one is not None and one.message.startswith("rejected by 1 proxy (lds): x")
    # Another replica's finding of this generation stays; its own, or an older one, not.
    written = {"conditions": conditions(ACCEPTED, None, bad)}
    kept = programmed(ACCEPTED, written, None, "b")
    assert kept is not None and kept.status == "False" and kept.message == bad.message
    assert not needs_write(ACCEPTED, written, kept)
    mine = programmed(ACCEPTED, written, None, "a")
    assert mine is not None and mine.status == "True" and needs_write(ACCEPTED, written, mine)
    edited = Verdict(True, "Accepted", "applied to Service 'reviews'", 4)
    moved = programmed(edited, written, None, "b")
    assert moved is not None and moved.status == "True"
    # None on objects the proxies cannot reject: refused ones, Sidecars.
    assert programmed(Verdict(False, "Invalid", "spec: bad", 3), None, None, "a") is None
    sidecar = Verdict(True, "Accepted", "selects 1", 1, kind=SIDECAR_KIND)
    assert programmed(sidecar, None, Rejected(1, "x", ["lds"]), "a") is None
    assert [c["type"] for c in conditions(ACCEPTED, None, fine)] == [
        "Accepted", "ResolvedRefs", "Programmed"]
    assert needs_write(ACCEPTED, {"conditions": conditions(ACCEPTED, None)}, fine)


def _replica(api: ApiServerDouble, tmp_path: Path, name: str) -> KubernetesSource:
    return KubernetesSource(api_client(api.kubeconfig(tmp_path / f"kubeconfig-{name}")),
                            timing=WatchTiming(server_timeout=30, inactivity=5,
                                               backoff_initial=0.1),
                            debounce=Debounce(quiet=0.05, max_delay=1.0), replica=name)


async def _programmed(api: ApiServerDouble, check: Callable[[dict[str, Any]], bool],
                      timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = api.get(TRAFFIC_POLICIES, "default", "reviews-policy").get("status") or {}
        found = next((c for c in status.get("conditions") or []
                      if c["type"] == "Programmed"), {})
        if found and check(found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"Programmed never as wanted: {found}")


async def test_two_replicas_never_undo_each_others_findings(tmp_path: Path) -> None:
    api = ApiServerDouble(bookmark_interval=0.5).start()
    feeds: list[Feed] = []
    try:
        api.create(service("reviews").port(9080, name="http").build())
        api.create(traffic_policy("reviews-policy", "reviews", {"timeout": "2s"}).build())
        seen: dict[str, dict[tuple[str, str, str], Rejected]] = {"a": {}, "b": {}}
        replicas = {name: _replica(api, tmp_path, name) for name in seen}
        changed = {name: source.watch_rejections(lambda n=name: seen[n])  # type: ignore[misc]
                   for name, source in replicas.items()}
        feeds = [Feed(source.updates()) for source in replicas.values()]
        for feed in feeds:
            await next_mesh(feed)
        await _programmed(api, lambda c: c["status"] == "True")

        seen["a"][KEY] = Rejected(2, "Didn't find a registered implementation", ["rds"])
        changed["a"]()
        found = await _programmed(api, lambda c: c["status"] == "False")
        assert found["message"].startswith("rejected by 2 proxies (rds): Didn't find a "
                                           "registered implementation (seen by replica a)")
        # b sees no rejection, rechecks, converts a change: a's finding stays.
        changed["b"]()
        api.apply(endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
                  .endpoint("10.1.0.1").build())
        await asyncio.sleep(1.6)
        assert (await _programmed(api, lambda c: True))["status"] == "False"

        seen["a"].clear()  # a's proxies took the fix
        changed["a"]()
        await _programmed(api, lambda c: c["status"] == "True")

        seen["a"][KEY] = Rejected(1, "again", ["cds"])
        changed["a"]()
        await _programmed(api, lambda c: c["status"] == "False")
        await feeds[0].aclose()  # replica a goes away; an edit of the policy clears it
        api.apply(traffic_policy("reviews-policy", "reviews", {"timeout": "3s"}).build())
        found = await _programmed(api, lambda c: c["status"] == "True")
        policy = api.get(TRAFFIC_POLICIES, "default", "reviews-policy")
        assert found["observedGeneration"] == policy["metadata"]["generation"]
    finally:
        for feed in feeds:
            with contextlib.suppress(Exception):
                await feed.aclose()
        api.stop()
