"""The API server double behaves like kube-apiserver where the source relies on it:
RBAC from the shipped ClusterRole, an empty watch cache after a restart, "Too large
resource version", bookmarks about once a minute."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import service
from tests.kube.rbac import Rbac, Rule, shipped_rules

Client = client.ApiClient


@pytest.fixture
def double() -> Iterator[ApiServerDouble]:
    with ApiServerDouble(too_large_wait=0.3) as api:
        yield api
    assert not api.server_errors


def core(api: ApiServerDouble, tmp_path: Path, admin: bool = False) -> client.CoreV1Api:
    kubeconfig = api.kubeconfig(tmp_path / f"kubeconfig-{admin}", admin=admin)
    return client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))


def test_the_service_account_may_do_what_the_shipped_role_allows_and_no_more(
        double: ApiServerDouble, tmp_path: Path) -> None:
    sa = core(double, tmp_path)
    sa.list_namespaced_service("default")
    sa.list_pod_for_all_namespaces()  # the ClusterRoleBinding: every namespace
    # Pods are read, never written (Services are: each Gateway's, by the gateway
    # controller).
    pod = {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "a", "image": "a"}]}}
    with pytest.raises(ApiException) as caught:
        sa.create_namespaced_pod("default", pod)
    assert caught.value.status == 403
    assert json.loads(caught.value.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods is forbidden: User "system:serviceaccount:controlplane-system:'
                   'controlplane" cannot create resource "pods" in API group "" in the '
                   'namespace "default"',
        "reason": "Forbidden", "details": {"kind": "pods"}, "code": 403}
    core(double, tmp_path, admin=True).create_namespaced_pod("default", pod)


def test_rules_are_read_from_the_manifests_so_a_missing_rule_fails(
        double: ApiServerDouble, tmp_path: Path) -> None:
    rules = shipped_rules()
    assert any(r.allows("patch", "mesh.controlplane.io", "trafficpolicies/status")
               for r in rules)
    double.rbac = Rbac([r for r in rules if "endpointslices" not in r.resources])
    api = config.new_client_from_config(str(double.kubeconfig(tmp_path / "k")))
    with pytest.raises(ApiException) as caught:
        client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces()
    assert caught.value.status == 403
    assert json.loads(caught.value.body)["message"].endswith(
        'cannot list resource "endpointslices" in API group "discovery.k8s.io" at the '
        "cluster scope")


def test_role_bindings_in_some_namespaces_only(double: ApiServerDouble,
                                               tmp_path: Path) -> None:
    double.rbac = Rbac(namespaces=["a"])
    sa = core(double, tmp_path)
    sa.list_namespaced_service("a")
    for call in (lambda: sa.list_namespaced_service("b"), sa.list_service_for_all_namespaces):
        with pytest.raises(ApiException) as caught:
            call()
        assert caught.value.status == 403


def test_unknown_token_is_401(double: ApiServerDouble, tmp_path: Path) -> None:
    path = double.kubeconfig(tmp_path / "k")
    path.write_text(path.read_text().replace("apiserver-double-token", "stolen"))
    with pytest.raises(ApiException) as caught:
        client.CoreV1Api(config.new_client_from_config(str(path))).list_namespaced_service(
            "default")
    assert caught.value.status == 401


def test_restart_empties_the_watch_cache(double: ApiServerDouble, tmp_path: Path) -> None:
    double.create(service("reviews").port(80).build())
    admin = core(double, tmp_path, admin=True)
    version = admin.list_namespaced_service("default").metadata.resource_version
    double.create(service("ratings").port(80).build())
    double.restart()
    lines = admin.list_namespaced_service(
        "default", watch=True, resource_version=version, timeout_seconds=1,
        _preload_content=False, _request_timeout=5).read().decode().splitlines()
    [event] = [json.loads(line) for line in lines]
    assert event["type"] == "ERROR"  # in a 200 stream, as the real server sends it
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    assert len(admin.list_namespaced_service("default").items) == 2


def test_a_list_newer_than_the_server_is_too_large(double: ApiServerDouble,
                                                   tmp_path: Path) -> None:
    """A replica restored from an etcd backup is behind the client's resourceVersion."""
    double.create(service("reviews").port(80).build())
    backup = double.backup()
    double.create(service("ratings").port(80).build())
    admin = core(double, tmp_path, admin=True)
    version = admin.list_namespaced_service("default").metadata.resource_version
    double.restore(backup)
    with pytest.raises(ApiException) as caught:
        admin.list_namespaced_service("default", resource_version=version)
    assert caught.value.status == 504
    assert caught.value.headers["Retry-After"] == "1"
    body = json.loads(caught.value.body)
    assert body["reason"] == "Timeout"
    assert body["message"] == f"Too large resource version: {version}, current: {backup['version']}"
    assert body["details"]["causes"] == [{"reason": "ResourceVersionTooLarge",
                                          "message": "Too large resource version"}]
    # A consistent read (no resourceVersion) is what a client falls back to.
    assert [s.metadata.name for s in admin.list_namespaced_service("default").items] == [
        "reviews"]


def test_bookmarks_come_about_once_a_minute_by_default(tmp_path: Path) -> None:
    assert ApiServerDouble().bookmark_interval == 60.0
    with ApiServerDouble(bookmark_interval=0.3) as api:
        admin = core(api, tmp_path, admin=True)
        started = time.monotonic()
        lines = admin.list_namespaced_service(
            "default", watch=True, allow_watch_bookmarks=True, timeout_seconds=1,
            _preload_content=False, _request_timeout=5).read().decode().splitlines()
        assert time.monotonic() - started < 5
        assert {json.loads(line)["type"] for line in lines} == {"BOOKMARK"}


def test_a_rule_matches_group_resource_and_verb() -> None:
    rule = Rule(frozenset({""}), frozenset({"services"}), frozenset({"list"}))
    assert rule.allows("list", "", "services")
    assert not rule.allows("watch", "", "services")
    assert not rule.allows("list", "apps", "services")
