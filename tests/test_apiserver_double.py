"""The API server double, driven by the official ``kubernetes`` client.

These pin down the wire behaviour the Kubernetes source relies on, and what the client
makes of it (which exception on 410, on a dropped or silent watch), so that the source's
tests against the double mean something for a real cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    METADATA_LIST_ACCEPT,
    METADATA_WATCH_ACCEPT,
    PODS,
    SERVICE_NAME_LABEL,
    SERVICES,
    TRAFFIC_POLICIES,
)
from tests.kube.apiserver import ApiServerDouble, StatusError
from tests.kube.objects import endpoint_slice, pod, service, traffic_policy

GROUP, VERSION, PLURAL = TRAFFIC_POLICIES.group, TRAFFIC_POLICIES.version, TRAFFIC_POLICIES.plural
Event = dict[str, Any]


@pytest.fixture
def apiserver() -> Iterator[ApiServerDouble]:
    with ApiServerDouble(bookmark_interval=0.2) as double:
        yield double
    assert not double.server_errors


@pytest.fixture
def api(apiserver: ApiServerDouble, tmp_path: Path) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(
        str(apiserver.kubeconfig(tmp_path / "kubeconfig", admin=True)))
    yield api_client
    api_client.close()


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def watch_events(func: Callable[..., Any], *args: Any, until: Callable[[list[Event]], bool],
                 timeout: int = 3, **kwargs: Any) -> list[Event]:
    """Watch until ``until(events)`` or the server's timeout; every wait is bounded."""
    events: list[Event] = []
    stream = watch.Watch().stream(func, *args, timeout_seconds=timeout,
                                  _request_timeout=(2, timeout + 2), **kwargs)
    with contextlib.closing(stream):
        for event in stream:
            events.append(event)
            if until(events):
                break
    return events


def later(action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in a thread (once the test's watch is open, typically)."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def types(events: list[Event]) -> list[str]:
    return [e["type"] for e in events]


def body(response: object) -> Any:
    """The JSON of a ``_preload_content=False`` response (the client types it as a model)."""
    return json.loads(cast(urllib3.BaseHTTPResponse, response).data)


def status_of(caught: pytest.ExceptionInfo[ApiException]) -> Any:
    """The Status object an ApiException carries."""
    return json.loads(caught.value.body or "null")


def accept(value: str) -> dict[str, str]:
    """``_headers`` for one call (a fresh dict: the client adds to the one it is given)."""
    return {"Accept": value}


# --- LIST -------------------------------------------------------------------------------


def test_list_returns_objects_and_the_current_resource_version(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.create(service("reviews").port(9080, name="http", target="http").build())
    apiserver.create(service("ratings", namespace="shop").port(9080).build())

    listed = core.list_service_for_all_namespaces()
    assert listed.metadata.resource_version == apiserver.resource_version
    assert [(s.metadata.namespace, s.metadata.name) for s in listed.items] == [
        ("default", "reviews"), ("shop", "ratings")]
    reviews = listed.items[0]
    assert reviews.spec.cluster_ip.startswith("10.96.")  # defaulted by the server
    assert reviews.spec.ports[0].target_port == "http"
    assert reviews.spec.ports[0].protocol == "TCP"
    assert [s.metadata.name for s in core.list_namespaced_service("shop").items] == ["ratings"]

    # Raw: built-in list items carry no kind/apiVersion (the list does).
    raw = json.loads(core.list_namespaced_service("default", _preload_content=False).data)
    assert raw["kind"] == "ServiceList" and raw["apiVersion"] == "v1"
    assert "kind" not in raw["items"][0] and "apiVersion" not in raw["items"][0]


def test_custom_resource_list_items_keep_kind(apiserver: ApiServerDouble,
                                             custom: client.CustomObjectsApi) -> None:
    apiserver.create(traffic_policy("reviews", target="reviews", spec={"timeout": "2s"}).build())
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert listed["kind"] == "TrafficPolicyList"
    assert listed["items"][0]["kind"] == "TrafficPolicy"
    assert listed["items"][0]["spec"]["timeout"] == "2s"
    assert listed["items"][0]["metadata"]["generation"] == 1


def test_label_selector_filters(apiserver: ApiServerDouble, api: client.ApiClient) -> None:
    for name, owner in (("reviews-a", "reviews"), ("reviews-b", "reviews"),
                        ("ratings-a", "ratings")):
        apiserver.create(endpoint_slice(name, service=owner).endpoint("10.231.0.2")
                         .port(9080, name="http").build())
    discovery = client.DiscoveryV1Api(api)
    selected = discovery.list_endpoint_slice_for_all_namespaces(
        label_selector=f"{SERVICE_NAME_LABEL}=reviews")
    assert [s.metadata.name for s in selected.items] == ["reviews-a", "reviews-b"]
    others = discovery.list_namespaced_endpoint_slice(
        "default", label_selector=f"{SERVICE_NAME_LABEL}!=reviews")
    assert [s.metadata.name for s in others.items] == ["ratings-a"]
    sets = discovery.list_namespaced_endpoint_slice(
        "default", label_selector=f"{SERVICE_NAME_LABEL} in (ratings, details)")
    assert [s.metadata.name for s in sets.items] == ["ratings-a"]


def test_chunked_list_pages_are_one_consistent_snapshot(apiserver: ApiServerDouble,
                                                         core: client.CoreV1Api) -> None:
    for i in range(5):
        apiserver.create(service(f"svc-{i}").port(80).build())
    first = core.list_namespaced_service("default", limit=2)
    assert [s.metadata.name for s in first.items] == ["svc-0", "svc-1"]
    assert first.metadata.remaining_item_count == 3
    version = first.metadata.resource_version

    # Written between pages: not seen, because every page is at the first page's version.
    apiserver.delete(SERVICES, "default", "svc-3")
    apiserver.create(service("svc-5").port(80).build())
    names, token = [s.metadata.name for s in first.items], first.metadata._continue
    while token:
        page = core.list_namespaced_service("default", limit=2, _continue=token)
        assert page.metadata.resource_version == version
        names += [s.metadata.name for s in page.items]
        token = page.metadata._continue
    assert names == [f"svc-{i}" for i in range(5)]

    # A continue token whose version has been compacted away has expired, as in etcd.
    token = core.list_namespaced_service("default", limit=2).metadata._continue
    apiserver.create(service("svc-6").port(80).build())
    apiserver.compact()
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_service("default", limit=2, _continue=token)
    assert caught.value.status == 410
    assert "continue parameter is too old" in json.loads(caught.value.body)["message"]


# --- WATCH ------------------------------------------------------------------------------


def test_watch_streams_live_changes(apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    version = core.list_namespaced_service("default").metadata.resource_version

    def change() -> None:
        apiserver.wait_for_watches(1)
        created = apiserver.create(service("reviews").port(9080).build())
        created["spec"]["ports"][0]["port"] = 9081
        apiserver.update(created)
        apiserver.delete(SERVICES, "default", "reviews")

    writer = later(change)
    events = watch_events(core.list_namespaced_service, "default", resource_version=version,
                          until=lambda events: events[-1]["type"] == "DELETED")
    writer.join(5)
    assert types(events) == ["ADDED", "MODIFIED", "DELETED"]
    assert events[0]["object"].metadata.name == "reviews"  # typed, as from a real server
    assert events[0]["raw_object"]["kind"] == "Service"  # events carry kind/apiVersion
    assert events[1]["object"].spec.ports[0].port == 9081
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and str(versions[-1]) == apiserver.resource_version


def test_watch_replays_what_happened_after_a_resource_version(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    created = apiserver.create(service("reviews").port(9080).build())
    version = created["metadata"]["resourceVersion"]
    apiserver.apply(service("reviews").port(9090).build())
    apiserver.create(service("ratings").port(9080).build())
    apiserver.delete(SERVICES, "default", "reviews")

    events = watch_events(core.list_namespaced_service, "default", resource_version=version,
                          until=lambda events: len(events) == 3)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("MODIFIED", "reviews"), ("ADDED", "ratings"), ("DELETED", "reviews")]


def test_watch_without_resource_version_starts_with_the_current_state(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.create(service("reviews").port(9080).build())
    apiserver.create(service("ratings").port(9080).build())
    events = watch_events(core.list_namespaced_service, "default",
                          until=lambda events: len(events) == 2)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "ratings"), ("ADDED", "reviews")]


def test_watch_label_selector_turns_leaving_into_deleted(
        apiserver: ApiServerDouble, api: client.ApiClient) -> None:
    slice_ = apiserver.create(endpoint_slice("reviews-a", service="reviews")
                              .endpoint("10.231.0.2").port(9080).build())
    version = slice_["metadata"]["resourceVersion"]
    slice_["metadata"]["labels"][SERVICE_NAME_LABEL] = "ratings"
    apiserver.update(slice_)
    events = watch_events(client.DiscoveryV1Api(api).list_namespaced_endpoint_slice, "default",
                          resource_version=version,
                          label_selector=f"{SERVICE_NAME_LABEL}=reviews",
                          until=lambda events: len(events) == 1)
    assert types(events) == ["DELETED"]
    # The previous content, at the version of the change that moved it out.
    assert events[0]["raw_object"]["metadata"]["labels"][SERVICE_NAME_LABEL] == "reviews"
    assert events[0]["raw_object"]["metadata"]["resourceVersion"] == apiserver.resource_version


def test_watch_is_chunked_json_lines(apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.create(service("reviews").port(9080).build())
    response = core.list_namespaced_service("default", watch=True, timeout_seconds=3,
                                            _preload_content=False, _request_timeout=(2, 3))
    try:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Transfer-Encoding"] == "chunked"
        line = next(watch.watch.iter_resp_lines(response))
    finally:
        response.close()
        response.release_conn()
    assert json.loads(line)["type"] == "ADDED"


def test_bookmarks_arrive_when_allowed(apiserver: ApiServerDouble,
                                       custom: client.CustomObjectsApi) -> None:
    apiserver.create(service("reviews").port(9080).build())  # other kinds move the version
    stream = watch.Watch()
    events: list[Event] = []
    generator = stream.stream(custom.list_namespaced_custom_object, GROUP, VERSION, "default",
                              PLURAL, resource_version=apiserver.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=3,
                              _request_timeout=(2, 5))
    with contextlib.closing(generator):
        for event in generator:
            events.append(event)
            break
    assert types(events) == ["BOOKMARK"]
    bookmark = events[0]["raw_object"]
    assert bookmark == {"kind": "TrafficPolicy", "apiVersion": TRAFFIC_POLICIES.api_version,
                        "metadata": {"resourceVersion": apiserver.resource_version}}
    assert stream.resource_version == apiserver.resource_version  # the client keeps it


def test_bookmark_now_and_none_unless_allowed(apiserver: ApiServerDouble,
                                              core: client.CoreV1Api) -> None:
    apiserver.bookmark_interval = 60.0
    later(lambda: (apiserver.wait_for_watches(1), apiserver.bookmark_now()))
    events = watch_events(core.list_namespaced_service, "default",
                          resource_version=apiserver.resource_version,
                          allow_watch_bookmarks=True, until=lambda events: True)
    assert types(events) == ["BOOKMARK"]

    later(lambda: (apiserver.wait_for_watches(1), apiserver.bookmark_now()))
    started = time.monotonic()
    events = watch_events(core.list_namespaced_service, "default",
                          resource_version=apiserver.resource_version, timeout=1,
                          until=lambda events: True)
    assert events == []  # the watch just ended at timeoutSeconds
    assert 0.8 < time.monotonic() - started < 2.5


def test_too_old_resource_version_is_410_from_the_client(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    version = apiserver.create(service("reviews").port(9080).build())["metadata"][
        "resourceVersion"]
    apiserver.apply(service("reviews").port(9090).build())
    apiserver.compact()

    # On the wire: a 200 whose only event is the Status, as a real server sends it.
    response = core.list_namespaced_service("default", watch=True, resource_version=version,
                                            _preload_content=False, _request_timeout=(2, 3))
    try:
        assert response.status == 200
        event = json.loads(response.data)
    finally:
        response.release_conn()
    assert event == {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {version} ({apiserver.resource_version})",
        "reason": "Expired", "code": 410}}

    # The client turns the ERROR event into ApiException(410); with timeout_seconds it
    # does so at once (no retry) ...
    apiserver.clear_requests()
    with pytest.raises(ApiException) as caught:
        watch_events(core.list_namespaced_service, "default", resource_version=version,
                     until=lambda events: True)
    assert caught.value.status == 410
    assert caught.value.reason.startswith("Expired: too old resource version")
    assert apiserver.count("watch", SERVICES) == 1

    # ... without it, it retries once from the same version, then raises the same.
    apiserver.clear_requests()
    stream = watch.Watch().stream(core.list_namespaced_service, "default",
                                  resource_version=version, _request_timeout=(2, 3))
    with contextlib.closing(stream), pytest.raises(ApiException) as caught:
        next(stream)
    assert caught.value.status == 410
    assert apiserver.count("watch", SERVICES) == 2


def test_dropped_watch_raises_protocol_error_in_the_client(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    def drop() -> None:
        apiserver.wait_for_watches(1)
        apiserver.create(service("reviews").port(9080).build())
        time.sleep(0.1)
        assert apiserver.drop_watches() == 1

    later(drop)
    with pytest.raises(urllib3.exceptions.ProtocolError, match="Response ended prematurely"):
        watch_events(core.list_namespaced_service, "default",
                     resource_version=apiserver.resource_version,
                     until=lambda events: False)
    assert apiserver.open_watches == 0
    # The pooled connection is gone, not poisoned: the next request works.
    assert core.list_namespaced_service("default").items[0].metadata.name == "reviews"


def test_paused_watch_is_silent_until_the_client_read_timeout(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.pause()
    apiserver.create(service("reviews").port(9080).build())
    stream = watch.Watch().stream(core.list_namespaced_service, "default",
                                  allow_watch_bookmarks=True, timeout_seconds=5,
                                  _request_timeout=(2, 0.5))
    started = time.monotonic()
    with contextlib.closing(stream), pytest.raises(urllib3.exceptions.ReadTimeoutError):
        next(stream)
    assert time.monotonic() - started < 2

    apiserver.resume()  # what was held is delivered
    events = watch_events(core.list_namespaced_service, "default",
                          until=lambda events: len(events) == 1)
    assert types(events) == ["ADDED"]


def test_restart_on_the_same_port(apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.create(service("reviews").port(9080).build())
    version = core.list_namespaced_service("default").metadata.resource_version
    port = apiserver.port

    restarter = later(lambda: (apiserver.wait_for_watches(1), apiserver.restart(keep_state=True)))
    events = watch_events(core.list_namespaced_service, "default", resource_version=version,
                          timeout=5, until=lambda events: True)
    assert events == []  # a graceful shutdown ends the watch cleanly
    restarter.join(10)
    assert apiserver.port == port
    apiserver.create(service("ratings").port(9080).build())  # while it was down, or after
    assert [s.metadata.name for s in core.list_namespaced_service("default").items] == [
        "ratings", "reviews"]
    events = watch_events(core.list_namespaced_service, "default", resource_version=version,
                          until=lambda events: True)
    assert types(events) == ["ADDED"]  # the history survived a restart with keep_state

    apiserver.restart(keep_state=False)
    with pytest.raises(ApiException) as caught:
        watch_events(core.list_namespaced_service, "default", resource_version=version,
                     until=lambda events: True)
    assert caught.value.status == 410
    assert len(core.list_namespaced_service("default").items) == 2  # objects survive


def test_stopped_server_refuses_connections(apiserver: ApiServerDouble,
                                            core: client.CoreV1Api) -> None:
    apiserver.stop()
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.list_namespaced_service("default", _request_timeout=(1, 1))
    apiserver.start()
    assert core.list_namespaced_service("default").items == []


async def test_usable_from_async_tests(apiserver: ApiServerDouble,
                                       core: client.CoreV1Api) -> None:
    task = asyncio.create_task(asyncio.to_thread(
        watch_events, core.list_namespaced_service, "default",
        resource_version=apiserver.resource_version, until=lambda events: True))
    await apiserver.async_wait_for_watches(1)
    apiserver.create(service("reviews").port(9080).build())
    events = await asyncio.wait_for(task, 5)
    assert types(events) == ["ADDED"]


# --- Pods, and metadata-only representations -------------------------------------------

PARTIAL = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}


def test_pods_are_a_built_in_kind_with_a_status_subresource(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    sent: Any = pod("reviews-v1").labels(app="reviews").ip("10.231.0.2").build()
    created = body(core.create_namespaced_pod("default", sent, _preload_content=False))
    assert created["metadata"]["generation"] == 1
    # Create drops the status sent; the server sets its own, then only /status changes it.
    assert created["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    container = created["spec"]["containers"][0]
    assert (container["imagePullPolicy"], created["spec"]["restartPolicy"]) == (
        "IfNotPresent", "Always")

    listed = body(core.list_namespaced_pod("default", _preload_content=False))
    assert (listed["kind"], listed["apiVersion"]) == ("PodList", "v1")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["reviews-v1"]
    assert "kind" not in listed["items"][0] and "apiVersion" not in listed["items"][0]
    typed = core.list_namespaced_pod("default", label_selector="app=reviews")
    assert [p.metadata.name for p in typed.items if p.metadata] == ["reviews-v1"]

    running = apiserver.update_status(pod("reviews-v1").ip("10.231.0.2").phase("Running")
                                      .build())
    assert running["status"] == {"phase": "Running", "podIP": "10.231.0.2",
                                 "podIPs": [{"ip": "10.231.0.2"}]}
    assert running["metadata"]["generation"] == 1

    # The main resource ignores status; an image change is a spec change: generation 2.
    patched = body(core.patch_namespaced_pod(
        "reviews-v1", "default", {"spec": {"containers": [
            {**container, "image": "registry.example/app:2"}]}, "status": {"phase": "Failed"}},
        _content_type="application/merge-patch+json", _preload_content=False))
    assert patched["metadata"]["generation"] == 2
    assert patched["status"]["phase"] == "Running"

    deleted = body(core.delete_namespaced_pod("reviews-v1", "default", _preload_content=False))
    assert deleted["kind"] == "Pod" and deleted["status"]["podIP"] == "10.231.0.2"
    assert apiserver.objects(PODS) == []


def test_pod_watch_sends_whole_objects_by_default(apiserver: ApiServerDouble,
                                                 core: client.CoreV1Api) -> None:
    version = apiserver.resource_version

    def change() -> None:
        apiserver.wait_for_watches(1)
        apiserver.create(pod("reviews-v1").labels(app="reviews").build())
        apiserver.update_status(pod("reviews-v1").ip("10.231.0.2").build())

    later(change)
    events = watch_events(core.list_namespaced_pod, "default", resource_version=version,
                          until=lambda events: len(events) == 2)
    assert types(events) == ["ADDED", "MODIFIED"]
    assert events[0]["raw_object"]["kind"] == "Pod"
    assert events[0]["object"].spec.containers[0].image == "registry.example/app:1"
    assert events[1]["raw_object"]["status"]["podIP"] == "10.231.0.2"


def test_metadata_list_is_a_partial_object_metadata_list(apiserver: ApiServerDouble,
                                                        core: client.CoreV1Api) -> None:
    for name, version in (("reviews-v1", "v1"), ("reviews-v2", "v2"), ("reviews-v3", "v3")):
        apiserver.create(pod(name).labels(app="reviews", version=version).build())
    stored = apiserver.get(PODS, "default", "reviews-v1")

    listed = body(core.list_namespaced_pod("default", _headers=accept(METADATA_LIST_ACCEPT),
                                           _preload_content=False))
    assert listed["kind"] == "PartialObjectMetadataList"
    assert listed["apiVersion"] == "meta.k8s.io/v1"
    assert listed["metadata"] == {"resourceVersion": apiserver.resource_version}
    assert [item["metadata"]["labels"]["version"] for item in listed["items"]] == [
        "v1", "v2", "v3"]
    # Each item is the object's whole metadata, and nothing else.
    assert listed["items"][0] == {**PARTIAL, "metadata": stored["metadata"]}
    assert apiserver.requests[-1].accept == METADATA_LIST_ACCEPT

    # Chunking, selectors and the v1beta1 form work as for whole objects.
    page = body(core.list_namespaced_pod(
        "default", limit=2, _headers=accept(METADATA_LIST_ACCEPT.replace("v=v1", "v=v1beta1")),
        _preload_content=False))
    assert page["apiVersion"] == "meta.k8s.io/v1beta1"
    assert page["items"][0]["apiVersion"] == "meta.k8s.io/v1beta1"
    assert page["metadata"]["remainingItemCount"] == 1 and page["metadata"]["continue"]
    selected = body(core.list_namespaced_pod(
        "default", label_selector="version=v2", _headers=accept(METADATA_LIST_ACCEPT),
        _preload_content=False))
    assert [item["metadata"]["name"] for item in selected["items"]] == ["reviews-v2"]
    # Go's nil slice: an empty metadata list has no [] but null.
    empty = body(core.list_namespaced_pod("shop", _headers=accept(METADATA_LIST_ACCEPT),
                                          _preload_content=False))
    assert empty["items"] is None

    # A single GET may ask for metadata only too.
    one = body(core.read_namespaced_pod("reviews-v1", "default",
                                        _headers=accept(METADATA_WATCH_ACCEPT),
                                        _preload_content=False))
    assert one == {**PARTIAL, "metadata": stored["metadata"]}


def test_metadata_watch_sends_partial_object_metadata_events(
        apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.create(pod("reviews-v1").labels(app="reviews", version="v1").build())
    version = apiserver.resource_version

    def change() -> None:
        apiserver.wait_for_watches(1)
        relabelled = apiserver.get(PODS, "default", "reviews-v1")
        relabelled["metadata"]["labels"]["version"] = "v2"
        apiserver.update(relabelled)
        apiserver.update_status(pod("reviews-v1").ip("10.231.0.2").phase("Running").build())
        apiserver.delete(PODS, "default", "reviews-v1")

    later(change)
    events = watch_events(core.list_namespaced_pod, "default", resource_version=version,
                          _headers=accept(METADATA_WATCH_ACCEPT),
                          until=lambda events: events[-1]["type"] == "DELETED")
    assert types(events) == ["MODIFIED", "MODIFIED", "DELETED"]
    for event in events:
        assert event["raw_object"].keys() == {"kind", "apiVersion", "metadata"}
        assert {k: event["raw_object"][k] for k in PARTIAL} == PARTIAL
    relabel, status, deleted = (e["raw_object"]["metadata"] for e in events)
    assert relabel["labels"] == {"app": "reviews", "version": "v2"}
    # A status-only write moves the resourceVersion, so it is an event, metadata or not.
    assert int(status["resourceVersion"]) > int(relabel["resourceVersion"])
    assert status["labels"] == relabel["labels"] and status["uid"] == relabel["uid"]
    assert deleted["resourceVersion"] == apiserver.resource_version


def test_metadata_watch_bookmarks_and_errors(apiserver: ApiServerDouble,
                                             core: client.CoreV1Api) -> None:
    apiserver.bookmark_interval = 60.0

    def bookmark() -> None:
        apiserver.wait_for_watches(1)
        apiserver.bookmark_now()

    later(bookmark)
    events = watch_events(core.list_namespaced_pod, "default",
                          resource_version=apiserver.resource_version,
                          allow_watch_bookmarks=True, _headers=accept(METADATA_WATCH_ACCEPT),
                          until=lambda events: True)
    assert [e["raw_object"] for e in events] == [
        {**PARTIAL, "metadata": {"resourceVersion": apiserver.resource_version}}]

    # ERROR events stay Status objects.
    version = apiserver.create(pod("reviews-v1").build())["metadata"]["resourceVersion"]
    apiserver.apply(pod("reviews-v1").label("app", "reviews").build())
    apiserver.compact()
    response = cast(urllib3.BaseHTTPResponse, core.list_namespaced_pod(
        "default", watch=True, resource_version=version, _headers=accept(METADATA_WATCH_ACCEPT),
        _preload_content=False, _request_timeout=(2, 3)))
    try:
        event = json.loads(response.data)
    finally:
        response.release_conn()
    assert event["type"] == "ERROR"
    assert (event["object"]["kind"], event["object"]["code"]) == ("Status", 410)


@pytest.mark.parametrize("header", [
    "application/json",
    "application/json, application/yaml, application/vnd.kubernetes.protobuf",
    "*/*",
    "application/*",
    "application/json;stream=watch",
    # Clauses the server cannot honour are skipped: an unknown version, a non-meta group.
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v2, application/json",
    "application/json;as=PodList;g=;v=v1, application/json",
    # A higher q wins over the order.
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1;q=0.5, application/json",
])
def test_accept_headers_that_mean_whole_objects(apiserver: ApiServerDouble,
                                               core: client.CoreV1Api, header: str) -> None:
    apiserver.create(pod("reviews-v1").build())
    listed = body(core.list_namespaced_pod("default", _headers=accept(header),
                                           _preload_content=False))
    assert listed["kind"] == "PodList"


def test_watch_asking_for_a_list_kind_gets_whole_objects(apiserver: ApiServerDouble,
                                                        core: client.CoreV1Api) -> None:
    apiserver.create(pod("reviews-v1").build())
    # The real server's conversion of each event fails, and it sends the object instead.
    events = watch_events(core.list_namespaced_pod, "default",
                          _headers=accept(METADATA_LIST_ACCEPT),
                          until=lambda events: len(events) == 1)
    assert events[0]["raw_object"]["kind"] == "Pod"


NOT_ACCEPTABLE = ("only the following media types are accepted: application/json, "
                  "application/yaml, application/vnd.kubernetes.protobuf")


@pytest.mark.parametrize(("header", "message"), [
    ("text/html", NOT_ACCEPTABLE),
    ("application/json;as=PartialObjectMetadata;g=meta.k8s.io", NOT_ACCEPTABLE),  # no v
    # Served by a real server, but not by the double: it says so rather than send JSON.
    ("application/vnd.kubernetes.protobuf", NOT_ACCEPTABLE),
    ("application/json;as=Table;g=meta.k8s.io;v=v1", NOT_ACCEPTABLE),
    ("application/yaml, application/json", NOT_ACCEPTABLE),
    # Negotiation accepts it, the conversion refuses: the fallback clause is never tried.
    ("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json",
     "you requested PartialObjectMetadata, but the requested object is a list "
     "(*core.PodList)"),
])
def test_unservable_accept_headers_are_406(apiserver: ApiServerDouble, core: client.CoreV1Api,
                                           header: str, message: str) -> None:
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_pod("default", _headers=accept(header))
    assert caught.value.status == 406
    status = status_of(caught)
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "NotAcceptable", 406)
    assert status["message"].startswith(message)


def test_watch_and_get_406s(apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.create(pod("reviews-v1").build())
    with pytest.raises(ApiException) as caught:  # YAML has no watch framing
        core.list_namespaced_pod("default", watch=True, _headers=accept("application/yaml"),
                                 _request_timeout=(2, 3))
    assert status_of(caught)["message"] == (
        "only the following media types are accepted: application/json;stream=watch, "
        "application/vnd.kubernetes.protobuf;stream=watch")
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod("reviews-v1", "default", _headers=accept(METADATA_LIST_ACCEPT))
    assert status_of(caught)["message"] == (
        "you requested PartialObjectMetadataList, but the requested object is not a list "
        "(*core.Pod)")
    assert apiserver.count("get", PODS) == 1


def test_pod_validation(apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    no_containers: Any = pod("reviews-v1").build()
    no_containers["spec"]["containers"] = []
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_pod("default", no_containers)
    assert caught.value.status == 422
    status = status_of(caught)
    assert status["message"] == 'Pod "reviews-v1" is invalid: spec.containers: Required value'
    assert status["details"]["causes"] == [{"reason": "FieldValueRequired",
                                            "message": "Required value",
                                            "field": "spec.containers"}]

    no_image: Any = pod("reviews-v1").build()
    no_image["spec"]["containers"] = [{"name": "app"}, {"name": "Sidecar", "image": "x"}]
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_pod("default", no_image)
    assert [c["field"] for c in status_of(caught)["details"]["causes"]] == [
        "spec.containers[0].image", "spec.containers[1].name"]
    assert status_of(caught)["message"].startswith(
        'Pod "reviews-v1" is invalid: [spec.containers[0].image: Required value, '
        'spec.containers[1].name: Invalid value: "Sidecar": a lowercase RFC 1123 label')

    with pytest.raises(StatusError) as from_python:
        apiserver.create(pod("Reviews_v1").build())
    assert from_python.value.code == 422
    assert from_python.value.status["details"]["causes"][0]["field"] == "metadata.name"
    assert apiserver.objects(PODS) == []

    # Beyond images (and a few others), a Pod's spec is immutable.
    created = apiserver.create(pod("reviews-v1").build())
    created["spec"]["containers"][0]["ports"] = [{"containerPort": 9080}]
    with pytest.raises(StatusError) as immutable:
        apiserver.update(created)
    assert immutable.value.message.startswith(
        'Pod "reviews-v1" is invalid: spec: Forbidden: pod updates may not change fields '
        "other than `spec.containers[*].image`")
    with pytest.raises(StatusError) as bad_ip:
        apiserver.update_status(pod("reviews-v1").ip("10.231.0.256").build())
    assert bad_ip.value.status["details"]["causes"][0]["field"] == "status.podIPs[0]"


# --- Writes, validation, status ---------------------------------------------------------


def test_loopback_endpoint_addresses_are_rejected(apiserver: ApiServerDouble,
                                                  api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    body = endpoint_slice("reviews-abc", service="reviews").endpoint("127.0.0.1") \
        .port(9080, name="http").build()
    with pytest.raises(ApiException) as caught:
        discovery.create_namespaced_endpoint_slice("default", body)
    assert caught.value.status == 422
    status = json.loads(caught.value.body)
    assert status["reason"] == "Invalid"
    assert status["message"] == (
        'EndpointSlice.discovery.k8s.io "reviews-abc" is invalid: endpoints[0].addresses[0]: '
        'Invalid value: "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)')
    assert status["details"]["causes"] == [{
        "reason": "FieldValueInvalid", "field": "endpoints[0].addresses[0]",
        "message": 'Invalid value: "127.0.0.1": may not be in the loopback range '
                   "(127.0.0.0/8, ::1/128)"}]

    ipv6 = endpoint_slice("reviews-v6", service="reviews", address_type="IPv6") \
        .endpoint("::1").build()
    with pytest.raises(StatusError) as from_python:
        apiserver.create(ipv6)
    assert from_python.value.code == 422
    assert "may not be in the loopback range (127.0.0.0/8, ::1/128)" in from_python.value.message
    assert apiserver.objects(ENDPOINT_SLICES) == []

    created = discovery.create_namespaced_endpoint_slice("default", endpoint_slice(
        "reviews-ok", service="reviews").endpoint("10.231.0.2", zone="zone-a")
        .port(9080, name="http").build())
    assert created.endpoints[0].zone == "zone-a"
    assert created.endpoints[0].conditions.ready is True


def test_status_patch_stores_status_without_a_new_generation(
        apiserver: ApiServerDouble, custom: client.CustomObjectsApi) -> None:
    created = apiserver.create(
        traffic_policy("reviews", target="reviews", spec={"timeout": "2s"})
        .status({"ignored": "on create"}).build())
    assert "status" not in created
    condition = {"type": "Accepted", "status": "True", "reason": "Valid", "message": "",
                 "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}

    patched = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "reviews", {"status": {"conditions": [condition]}})
    assert patched["status"]["conditions"] == [condition]
    assert patched["metadata"]["generation"] == 1
    version = patched["metadata"]["resourceVersion"]
    assert int(version) > int(created["metadata"]["resourceVersion"])
    assert apiserver.get(TRAFFIC_POLICIES, "default", "reviews")["status"] == patched["status"]
    assert apiserver.requests[-1].subresource == "status"
    assert apiserver.requests[-1].verb == "patch"

    # The same status again is a no-op: no new resourceVersion, so no watch event.
    again = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "reviews", {"status": {"conditions": [condition]}})
    assert again["metadata"]["resourceVersion"] == version == apiserver.resource_version

    # The main resource ignores status; a spec change bumps the generation.
    spec_patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "reviews",
        {"spec": {"timeout": "3s"}, "status": {"conditions": []}})
    assert spec_patched["metadata"]["generation"] == 2
    assert spec_patched["status"]["conditions"] == [condition]


def test_policy_schema_is_enforced_like_the_crd(apiserver: ApiServerDouble,
                                                custom: client.CustomObjectsApi) -> None:
    bad = traffic_policy("reviews", target="reviews", spec={"timeout": "soon"}).build()
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, bad)
    assert caught.value.status == 422
    message = json.loads(caught.value.body)["message"]
    assert message.startswith('TrafficPolicy.mesh.controlplane.io "reviews" is invalid: '
                              'spec.timeout: Invalid value: "soon": spec.timeout in body '
                              "should match")

    # Unknown fields are pruned, with a Warning header (fieldValidation=Warn, the default).
    typo = traffic_policy("reviews", target="reviews", spec={"timout": "2s"}).build()
    response = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, typo,
                                                      _preload_content=False)
    assert response.status == 201
    assert response.headers["Warning"] == '299 - "unknown field \\"spec.timout\\""'
    assert json.loads(response.data)["spec"] == {"targetRef": {"kind": "Service",
                                                               "name": "reviews"}}


def test_crd_not_installed_is_404(tmp_path: Path) -> None:
    with ApiServerDouble(crd_installed=False) as double:
        api = config.new_client_from_config(
            str(double.kubeconfig(tmp_path / "kubeconfig", admin=True)))
        custom = client.CustomObjectsApi(api)
        with pytest.raises(ApiException) as caught:
            custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        assert caught.value.status == 404
        assert json.loads(caught.value.body)["message"] == (
            "the server could not find the requested resource")
        double.install_crd()
        assert custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"] == []
        api.close()


def test_writes_over_http_and_their_conflicts(apiserver: ApiServerDouble,
                                              core: client.CoreV1Api,
                                              custom: client.CustomObjectsApi) -> None:
    created = core.create_namespaced_service("default", service("reviews").port(9080).build())
    assert created.metadata.uid and created.metadata.creation_timestamp
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_service("default", service("reviews").port(9080).build())
    assert (caught.value.status, json.loads(caught.value.body)["reason"]) == (409,
                                                                               "AlreadyExists")

    stale = apiserver.get(SERVICES, "default", "reviews")
    apiserver.apply(service("reviews").port(9090).build())
    with pytest.raises(StatusError) as conflict:
        apiserver.update(stale)
    assert conflict.value.code == 409 and "the object has been modified" in conflict.value.message

    apiserver.create(traffic_policy("reviews", target="reviews", spec={"timeout": "2s"}).build())
    # CustomObjectsApi patches are merge patches unless told otherwise.
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "reviews",
        [{"op": "replace", "path": "/spec/timeout", "value": "5s"}],
        _content_type="application/json-patch+json")
    assert patched["spec"]["timeout"] == "5s"

    deleted = core.delete_namespaced_service("reviews", "default")
    assert deleted.metadata.name == "reviews"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_service("reviews", "default")
    assert json.loads(missing.value.body)["message"] == 'services "reviews" not found'
    assert apiserver.count("create", SERVICES) == 2
    assert apiserver.count("delete") == 1


def test_fail_next_injects_errors(apiserver: ApiServerDouble, core: client.CoreV1Api) -> None:
    apiserver.fail_next(2, status=503, path="/api/v1/namespaces/default/services")
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            core.list_namespaced_service("default")
        assert caught.value.status == 503
    assert core.list_namespaced_service("default").items == []
    assert apiserver.count("list", SERVICES) == 3
