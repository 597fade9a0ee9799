"""One Kubernetes object's fault stays with that object: the converter never raises, and
leaves out (with the reason) only what is wrong."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.mesh.model import Mesh
from controlplane.sources.kubernetes.convert import Converter, Verdict, convert
from controlplane.sources.kubernetes.status import conditions, needs_write
from controlplane.sources.kubernetes.store import ObjectStore, labels_only
from tests.test_kube_convert import ep, eps, pod, policy, svc

# --- fuzzing: JSON-ish values, and objects shaped roughly like the real ones ---

_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=12) | st.sampled_from(["", "TCP", "UDP", "10.0.0.1", "Pod"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the plausible shape, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, _JSON)


_NAMES = st.sampled_from(["reviews", "ratings", "Bad_Name", "", "a" * 70])
_META = _maybe(st.fixed_dictionaries(
    {"name": _maybe(_NAMES), "namespace": _maybe(st.sampled_from(["default", "other"]))},
    optional={"labels": _maybe(st.dictionaries(
        st.sampled_from(["kubernetes.io/service-name", "version"]), _maybe(_NAMES))),
        "generation": _JSON, "uid": _JSON, "creationTimestamp": _JSON}))
_PORT = _maybe(st.fixed_dictionaries(
    {"port": _maybe(st.integers(-1, 70000))},
    optional={"name": _maybe(st.sampled_from(["http", "grpc-x", "tcp"])),
              "protocol": _maybe(st.sampled_from(["TCP", "UDP"])),
              "appProtocol": _JSON}))
SERVICES = st.fixed_dictionaries({"metadata": _META}, optional={"spec": _maybe(
    st.fixed_dictionaries({"ports": _maybe(st.lists(_PORT, max_size=3))}, optional={
        "type": _maybe(st.sampled_from(["ClusterIP", "ExternalName"])),
        "externalName": _JSON}))})
_ENDPOINT = _maybe(st.fixed_dictionaries(
    {"addresses": _maybe(st.lists(_maybe(st.sampled_from(["10.0.0.1", "fd00::1", "x"])),
                                  max_size=2))},
    optional={"conditions": _maybe(st.dictionaries(
        st.sampled_from(["ready", "serving", "terminating"]), _JSON)),
        "zone": _JSON,
        "targetRef": _maybe(st.fixed_dictionaries({"kind": st.just("Pod"),
                                                   "name": _maybe(_NAMES)}))}))
SLICES = st.fixed_dictionaries({"metadata": _META}, optional={
    "addressType": _maybe(st.sampled_from(["IPv4", "IPv6", "FQDN"])),
    "ports": _maybe(st.lists(_PORT, max_size=2)),
    "endpoints": _maybe(st.lists(_ENDPOINT, max_size=3))})
_SPEC_VALUES = {"timeout": _maybe(st.sampled_from(["1s", "-1s", "9999999999999h", "0s"])),
                "split": _maybe(st.lists(_maybe(st.fixed_dictionaries(
                    {"weight": _JSON}, optional={"labels": _JSON, "service": _JSON})),
                    max_size=2)),
                "circuit_breaker": _maybe(st.fixed_dictionaries(
                    {"max_connections": st.integers(-1, 2**64)})),
                "rate_limit": _JSON, "retries": _JSON, "match": _JSON, "fallback": _JSON}
POLICIES = st.fixed_dictionaries({"metadata": _META}, optional={"status": _JSON, "spec": _maybe(
    st.fixed_dictionaries({"targetRef": _maybe(st.fixed_dictionaries(
        {"kind": st.just("Service"), "name": _maybe(_NAMES)}))},
        optional=_SPEC_VALUES))})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services=st.lists(SERVICES | _JSON, max_size=4), slices=st.lists(SLICES | _JSON,
                                                                         max_size=4),
       policies=st.lists(POLICIES | _JSON, max_size=3),
       pods=st.none() | st.dictionaries(st.tuples(st.just("default"), _NAMES),
                                        st.fixed_dictionaries({"metadata": _META}),
                                        max_size=2))
def test_no_object_shape_makes_the_converter_raise(
        services: list[Any], slices: list[Any], policies: list[Any],
        pods: dict[tuple[str, str], Any] | None) -> None:
    converter = Converter()
    for _ in range(2):  # the second time through the memo
        result = converter.convert(services, slices, policies, pods)
        assert isinstance(result.mesh, Mesh)
        Mesh.model_validate(result.mesh.model_dump(by_alias=True))  # a valid mesh
        for verdict in result.verdicts.values():
            assert verdict.accepted or verdict.message


# --- one object's fault, that object only ---

def test_a_malformed_service_is_left_out_alone() -> None:
    bad = svc("reviews", {"port": True})  # a bool is no port
    worse = {"metadata": {"name": "ratings"}, "spec": {"ports": "80"}}
    junk: Any = ["not", "an", "object"]
    result = convert([bad, worse, svc("details", {"port": 80}), junk], [], [])
    assert [s.name for s in result.mesh.services] == ["details"]
    assert ("service default/reviews: spec.ports[0].port: True is not a port number "
            "(an integer 1-65535); fix the Service") in result.skipped
    assert any(p.startswith("service default/ratings: spec.ports: expected a list")
               for p in result.skipped)


def test_a_malformed_endpoint_slice_is_left_out_of_its_service_only() -> None:
    service = svc("reviews", {"port": 80})
    broken = eps("reviews-b", "reviews", [{"addresses": "10.0.0.9"}], [{"port": 8080}])
    good = eps("reviews-a", "reviews", [ep("10.0.0.1")], [{"port": 8080}])
    result = convert([service], [good, broken], [])
    [reviews] = result.mesh.services
    assert [e.address for e in reviews.endpoints] == ["10.0.0.1"]
    [problem] = result.skipped
    assert problem.startswith("EndpointSlice default/reviews-b: endpoints[0].addresses: "
                              "expected a list, got str")


def test_a_policy_split_to_a_missing_service_is_dropped_not_the_service() -> None:
    """The policy is the faulty object: its Service keeps serving, without it."""
    result = convert([svc("a"), svc("c"), svc("d")], [], [
        policy("to-gone", "a", split=[{"service": "gone", "weight": 1}]),
        policy("to-a", "c", split=[{"service": "a", "weight": 1}])])
    assert [s.name for s in result.mesh.services] == ["a", "c", "d"]
    assert result.mesh.service("a").policy.split is None  # type: ignore[union-attr]
    assert result.mesh.service("c").policy.split is not None  # type: ignore[union-attr]
    dropped = result.verdicts[("default", "to-gone")]
    assert (dropped.accepted, dropped.reason) == (False, "Invalid")
    assert "policy.split[0].service: no service 'gone' in namespace 'default'" in (
        dropped.message)
    assert result.verdicts[("default", "to-a")].accepted


def test_a_split_to_a_subset_no_endpoint_has_is_accepted_but_unresolved() -> None:
    canary: dict[str, Any] = {"split": [{"labels": {"version": "v1"}, "weight": 9},
                        {"labels": {"version": "v3"}, "weight": 1}]}
    slices = [eps("reviews-a", "reviews", [ep("10.0.0.1", pod="r-1")], [{"port": 8080}])]
    pods = dict([pod("r-1", version="v1")])
    result = convert([svc("reviews")], slices, [policy("canary", "reviews", **canary)], pods)
    verdict = result.verdicts[("default", "canary")]
    assert verdict.accepted
    assert verdict.unresolved.startswith(
        "spec.split[1].labels (version=v3): no endpoint of Service 'reviews' has these labels")
    pods.update([pod("r-2", version="v3")])
    slices[0]["endpoints"].append(ep("10.0.0.2", pod="r-2"))
    fixed = convert([svc("reviews")], slices, [policy("canary", "reviews", **canary)], pods)
    assert fixed.verdicts[("default", "canary")].unresolved == ""


def test_a_policy_carries_its_uid_so_a_recreated_one_is_another_verdict() -> None:
    first, second = policy("p", "reviews"), policy("p", "reviews")
    first["metadata"]["uid"], second["metadata"]["uid"] = "uid-1", "uid-2"
    one = convert([svc("reviews")], [], [first]).verdicts[("default", "p")]
    two = convert([svc("reviews")], [], [second]).verdicts[("default", "p")]
    assert one.accepted and two.accepted and one != two


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["ADDED", "MODIFIED", "DELETED"]),
                                 POLICIES | SLICES | _JSON), max_size=6),
       listed=st.lists(POLICIES | _JSON, max_size=3))
def test_no_object_shape_breaks_the_stores(events: list[tuple[str, Any]],
                                           listed: list[Any]) -> None:
    """What the watchers hand the source (status kept, as for TrafficPolicies), then the
    status check: nothing raises."""
    store = ObjectStore(keep_status=True)
    pods = ObjectStore(reduce=labels_only)
    store.replace(listed, None)
    for event, obj in events:
        store.apply(event, obj)
        pods.apply(event, obj)
    verdict = Verdict(True, "Accepted", "applied", 1)
    for status in store.status.values():
        needs_write(verdict, status)
        conditions(verdict, status)
