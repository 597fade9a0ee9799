"""Kubernetes objects -> mesh: EndpointSlice semantics and TrafficPolicy verdicts."""

from __future__ import annotations

from typing import Any

from controlplane.sources.kubernetes.convert import convert, protocol_of
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
       terminating: bool | None = None, zone: str | None = None) -> dict[str, Any]:
    conditions = {k: v for k, v in {"ready": ready, "serving": serving,
                                    "terminating": terminating}.items() if v is not None}
    out: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if zone:
        out["zone"] = zone
    return out


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
    from controlplane.sources.kubernetes.convert import Converter

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


def test_label_subsets_are_refused_with_a_way_out() -> None:
    result = convert([svc("reviews"), svc("reviews-v2")], [], [
        policy("canary", "reviews", split=[{"labels": {"version": "v1"}, "weight": 90},
                                           {"labels": {"version": "v2"}, "weight": 10}]),
        policy("by-service", "reviews-v2", created="2026-03-01T00:00:00Z",
               split=[{"service": "reviews", "weight": 10}])])
    refused = result.verdicts[("default", "canary")]
    assert (refused.accepted, refused.reason) == (False, "Unsupported")
    assert refused.message.startswith("spec.split[0].labels: label subsets need pod labels")
    assert result.verdicts[("default", "by-service")].accepted
