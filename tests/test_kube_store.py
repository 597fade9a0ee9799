"""What counts as a change, and when a TrafficPolicy's status needs writing."""

from __future__ import annotations

import copy
from typing import Any

from controlplane.sources.kubernetes.convert import Verdict
from controlplane.sources.kubernetes.status import condition, conditions, needs_write
from controlplane.sources.kubernetes.store import ObjectStore


def slice_(name: str, ns: str = "default", rv: str = "1", port: int = 8080) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "metadata": {
        "name": name, "namespace": ns, "resourceVersion": rv, "annotations": {"a": "1"},
        "managedFields": [{"manager": "kube-controller-manager"}]},
        "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": port}]}


def test_only_changes_envoy_could_see_count() -> None:
    store = ObjectStore()
    assert store.apply("ADDED", slice_("a"))
    bumped = slice_("a", rv="2")
    bumped["metadata"]["annotations"] = {"a": "2"}
    bumped["metadata"]["managedFields"] = []
    assert not store.apply("MODIFIED", bumped)  # resourceVersion, annotations, managedFields
    assert store.apply("MODIFIED", slice_("a", rv="3", port=9090))
    assert store.apply("DELETED", slice_("a"))
    assert not store.apply("DELETED", slice_("a"))


def test_relist_replaces_what_was_known_in_its_namespace() -> None:
    store = ObjectStore()
    store.replace([slice_("a"), slice_("b"), slice_("c", ns="other")], None)
    # After 410 Gone: the fresh list for "default" no longer has b, and has d.
    assert store.replace([slice_("a"), slice_("d")], "default")
    assert sorted(store.objects) == [("default", "a"), ("default", "d"), ("other", "c")]
    assert not store.replace([slice_("a"), slice_("d")], "default")
    # A cluster-wide list is the whole truth.
    store.replace([slice_("a")], None)
    assert list(store.objects) == [("default", "a")]


def test_status_is_written_only_when_it_changes() -> None:
    accepted = Verdict(True, "Accepted", "applied to Service 'reviews'", 2)
    assert needs_write(accepted, None)
    written = {"conditions": conditions(accepted, None)}
    assert not needs_write(accepted, written)
    again = condition(accepted, written)
    assert again["lastTransitionTime"] == written["conditions"][0]["lastTransitionTime"]
    newer = Verdict(True, "Accepted", "applied to Service 'reviews'", 3)
    assert needs_write(newer, written)  # observedGeneration moves on
    rejected = Verdict(False, "Invalid", "spec.timeout: negative", 3)
    flipped = condition(rejected, copy.deepcopy(written))
    assert flipped["status"] == "False" and flipped["reason"] == "Invalid"


def test_an_accepted_policy_says_whether_its_subsets_select_endpoints() -> None:
    resolved = Verdict(True, "Accepted", "applied to Service 'reviews'", 2)
    written = {"conditions": conditions(resolved, None)}
    assert [(c["type"], c["status"], c["reason"]) for c in written["conditions"]] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]
    empty = Verdict(True, "Accepted", "applied to Service 'reviews'", 2,
                    unresolved="spec.split[1].labels (version=v3): no endpoint")
    assert needs_write(empty, written)
    [accepted, refs] = conditions(empty, written)
    assert accepted["lastTransitionTime"] == written["conditions"][0]["lastTransitionTime"]
    assert (refs["status"], refs["reason"]) == ("False", "NoMatchingEndpoints")
    assert refs["message"].startswith("spec.split[1].labels (version=v3)")
    refused = Verdict(False, "Invalid", "spec.timeout: negative", 2)
    assert [c["type"] for c in conditions(refused, written)] == ["Accepted"]
    assert needs_write(refused, written)


def test_a_huge_message_is_cut_to_what_the_api_accepts() -> None:
    many = "; ".join(f"spec.split[{i}].weight: must be an integer" for i in range(5000))
    [accepted] = conditions(Verdict(False, "Invalid", many, 1), None)
    assert len(accepted["message"]) == 32768
    assert accepted["message"].endswith("(cut; the server's log has every problem)")
    assert not needs_write(Verdict(False, "Invalid", many, 1), {"conditions": [accepted]})
