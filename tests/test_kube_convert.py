"""Kubernetes objects -> mesh: EndpointSlice semantics and TrafficPolicy verdicts."""

from __future__ import annotations

from typing import Any

from controlplane.sources.kubernetes.convert import Converter, convert, protocol_of
from controlplane.sources.kubernetes.kinds import SERVICE_NAME_LABEL


def svc(name: str, *ports: dict[str, Any], ns: str = "default", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"ports": list(ports) or [{"port": 80}], **spec}}


def eps(name: str, service: str, endpoints: list[dict[str, Any]],
        ports: list[dict[str, Any]], ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}


def ep(address: str, ready: bool | None = True, serving: bool | None = None,
       terminating: bool | None = None, zone: str | None = None,
       pod: str | None = None) -> dict[str, Any]:
    conditions = {k: v for k, v in {"ready": ready, "serving": serving,
                                    "terminating": terminating}.items() if v is not None}
    out: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if zone:
        out["zone"] = zone
    if pod:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    return out


def pod(name: str, **labels: str) -> tuple[tuple[str, str], dict[str, Any]]:
    """A Pod as the source stores it (labels only), keyed as the source keys it."""
    return ("default", name), {"metadata": {"name": name, "namespace": "default",
                                            "labels": dict(labels)}}


def policy(name: str, target: str, created: str = "2026-01-01T00:00:00Z", **spec: Any,
           ) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "generation": 3,
                         "creationTimestamp": created},
            "spec": {"targetRef": {"kind": "Service", "name": target}, **spec}}


def test_slices_are_merged_deduplicated_and_matched_by_port_name() -> None:
    service = svc("reviews", {"name": "http", "port": 9080, "targetPort": "web"})
    slices = [
        eps("reviews-a", "reviews", [ep("10.0.0.1", zone="zone-a"), ep("10.0.0.2")],
            [{"name": "http", "port": 8080}]),
        # the same pod in a second slice (mid-move), and one slice of another port name
        eps("reviews-b", "reviews", [ep("10.0.0.2"), ep("10.0.0.3", ready=False)],
            [{"name": "http", "port": 8080}]),
        eps("reviews-c", "reviews", [ep("10.0.0.9")], [{"name": "metrics", "port": 9090}]),
        eps("other", "ratings", [ep("10.0.0.7")], [{"name": "http", "port": 8080}]),
    ]
    [reviews] = convert([service], slices, []).mesh.services
    assert reviews.port == 9080 and reviews.protocol == "http"
    assert [(e.address, e.port, e.zone, e.ready) for e in reviews.endpoints] == [
        ("10.0.0.1", 8080, "zone-a", True), ("10.0.0.2", 8080, None, True),
        ("10.0.0.3", 8080, None, False)]


def test_conditions_ready_serving_terminating() -> None:
    service = svc("api", {"port": 80})
    slices = [eps("api-1", "api", [
        ep("10.0.0.1", ready=None),  # nil means ready
        ep("10.0.0.2", ready=False, serving=True, terminating=True),
        ep("10.0.0.3", ready=False, serving=False, terminating=True),
    ], [{"port": 8080}])]
    [api] = convert([service], slices, []).mesh.services
    states = {e.address: (e.ready, e.is_serving, e.terminating) for e in api.endpoints}
    assert states == {"10.0.0.1": (True, True, False), "10.0.0.2": (False, True, True),
                      "10.0.0.3": (False, False, True)}


def test_service_without_endpoints_keeps_its_place() -> None:
    [lonely] = convert([svc("lonely", {"port": 80})], [], []).mesh.services
    assert lonely.endpoints == []


def test_protocol_from_app_protocol_then_name() -> None:
    assert protocol_of({"port": 1, "appProtocol": "kubernetes.io/h2c"}) == "grpc"
    assert protocol_of({"port": 1, "name": "grpc-api"}) == "grpc"
    assert protocol_of({"port": 1, "name": "tcp-db"}) == "tcp"
    assert protocol_of({"port": 1, "name": "http-web", "appProtocol": "tcp"}) == "tcp"
    assert protocol_of({"port": 1}) == "http"
    udp_only = svc("dns", {"port": 53, "protocol": "UDP"})
    result = convert([udp_only], [], [])
    assert result.mesh.services == [] and "no TCP ports" in result.skipped[0]


def test_valid_policy_applies_and_is_accepted() -> None:
    result = convert([svc("reviews")], [], [policy("p", "reviews", timeout="2s",
                                                   retries={"attempts": 3})])
    [reviews] = result.mesh.services
    assert reviews.policy.timeout is not None and reviews.policy.timeout.total_seconds() == 2
    verdict = result.verdicts[("default", "p")]
    assert verdict.accepted and verdict.reason == "Accepted" and verdict.generation == 3


def test_invalid_policy_names_the_field_and_leaves_the_service_serving() -> None:
    result = convert([svc("reviews"), svc("ratings")], [], [
        policy("bad", "reviews", timeout="-1s", retries={"attempts": 2, "onn": ["5xx"]}),
        policy("good", "ratings", timeout="1s")])
    assert [s.name for s in result.mesh.services] == ["ratings", "reviews"]
    bad = result.verdicts[("default", "bad")]
    assert not bad.accepted and bad.reason == "Invalid"
    assert "spec.timeout: duration '-1s' is negative" in bad.message
    assert "spec.retries.onn: unknown field" in bad.message
    assert result.mesh.service("reviews") is not None
    assert result.mesh.service("reviews").policy.timeout is None  # type: ignore[union-attr]
    assert result.verdicts[("default", "good")].accepted


def test_policy_target_missing_or_conflicting() -> None:
    result = convert([svc("reviews")], [], [
        policy("first", "reviews", created="2026-01-01T00:00:00Z", timeout="1s"),
        policy("second", "reviews", created="2026-02-01T00:00:00Z", timeout="9s"),
        policy("orphan", "nowhere"),
        {"metadata": {"name": "no-target", "namespace": "default"}, "spec": {}}])
    assert result.verdicts[("default", "first")].accepted
    assert result.verdicts[("default", "second")].reason == "Conflicted"
    assert result.verdicts[("default", "orphan")].reason == "TargetNotFound"
    assert "spec.targetRef" in result.verdicts[("default", "no-target")].message
    assert result.mesh.services[0].policy.timeout.total_seconds() == 1  # type: ignore[union-attr]


def test_converter_converts_again_only_what_changed() -> None:
    services = [svc("a", {"port": 80}), svc("b", {"port": 80})]
    slices = [eps("a-1", "a", [ep("10.0.0.1")], [{"port": 8080}]),
              eps("b-1", "b", [ep("10.0.0.2")], [{"port": 8080}])]
    converter = Converter()
    first = converter.convert(services, slices, []).mesh
    slices[1] = eps("b-1", "b", [ep("10.0.0.3")], [{"port": 8080}])  # b's slice replaced
    second = converter.convert(services, slices, []).mesh
    assert second.services[0] is first.services[0]  # a: the same object, not converted again
    assert second.services[1] is not first.services[1]
    assert second.services[1].endpoints[0].address == "10.0.0.3"


CANARY: dict[str, Any] = {"split": [{"labels": {"version": "v1"}, "weight": 90},
                   {"labels": {"version": "v2"}, "weight": 10}]}


def test_label_subsets_without_pod_labels_are_refused_with_a_way_out() -> None:
    result = convert([svc("reviews"), svc("reviews-v2")], [], [
        policy("canary", "reviews", **CANARY),
        policy("by-service", "reviews-v2", created="2026-03-01T00:00:00Z",
               split=[{"service": "reviews", "weight": 10}])], pods=None)
    refused = result.verdicts[("default", "canary")]
    assert (refused.accepted, refused.reason) == (False, "Unsupported")
    assert refused.message.startswith(
        "spec.split[0].labels: label subsets need Pod labels, which this server does not "
        "watch (--no-pod-labels)")
    assert result.verdicts[("default", "by-service")].accepted


def test_label_subsets_take_the_selected_labels_of_each_endpoints_pod() -> None:
    slices = [eps("reviews-a", "reviews", [
        ep("10.0.0.1", pod="reviews-v1-a"), ep("10.0.0.2", pod="reviews-v2-b"),
        ep("10.0.0.3", pod="not-yet-seen"), ep("10.0.0.4")],  # no Pod known, no targetRef
        [{"port": 8080}])]
    pods = dict([pod("reviews-v1-a", version="v1", **{"pod-template-hash": "abc"}),
                 pod("reviews-v2-b", version="v2", app="reviews")])
    result = convert([svc("reviews")], slices, [policy("canary", "reviews", **CANARY)], pods)
    assert result.verdicts[("default", "canary")].accepted
    [reviews] = result.mesh.services
    assert [(e.address, e.labels) for e in reviews.endpoints] == [
        ("10.0.0.1", {"version": "v1"}), ("10.0.0.2", {"version": "v2"}),
        ("10.0.0.3", {}), ("10.0.0.4", {})]  # only the keys a subset selects on
    plain = convert([svc("reviews")], slices, [], pods).mesh.services[0]
    assert all(e.labels == {} for e in plain.endpoints)  # no subsets: no labels read


def test_a_relabelled_pod_converts_its_service_again_and_nothing_else() -> None:
    services = [svc("reviews"), svc("ratings")]
    slices = [eps("reviews-a", "reviews", [ep("10.0.0.1", pod="r-1")], [{"port": 8080}]),
              eps("ratings-a", "ratings", [ep("10.0.0.2", pod="x-1")], [{"port": 8080}])]
    policies = [policy("canary", "reviews", **CANARY)]
    pods = dict([pod("r-1", version="v1"), pod("x-1", version="v1")])
    converter = Converter()
    first = converter.convert(services, slices, policies, pods).mesh
    pods.update([pod("x-1", version="v2")])  # ratings has no subsets: unchanged
    second = converter.convert(services, slices, policies, pods).mesh
    assert second.services == first.services
    assert all(a is b for a, b in zip(second.services, first.services, strict=True))
    pods.update([pod("r-1", version="v2")])
    third = converter.convert(services, slices, policies, pods).mesh
    [_, reviews] = third.services
    assert reviews.endpoints[0].labels == {"version": "v2"}
    del pods[("default", "r-1")]  # the Pod gone before its endpoint: no labels, no error
    assert converter.convert(services, slices, policies, pods).mesh.services[1].endpoints[
        0].labels == {}
