"""The convergence tracker (observe/convergence.py) over real protocol streams (SotwStream
driven by DiscoveryRequests, real snapshots) and an injected clock: crediting,
supersession, disconnects, the completion and not-converged logs, and the bounds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from controlplane import resource
from controlplane.cache.snapshot import Snapshot
from controlplane.observe.changes import changed_types, percentile
from controlplane.observe.convergence import Convergence
from controlplane.server.sotw import SotwStream
from controlplane.server.stream import Push
from tests.support.snapshots import snapshot
from tests.support.xds_client import node

TYPES = (resource.CLUSTER, resource.ENDPOINT)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Fleet:
    """Streams of one group, each subscribed to clusters and endpoints (wildcard)."""

    clock: Clock = field(default_factory=Clock)
    streams: dict[int, SotwStream] = field(default_factory=dict)
    tracker: Convergence = field(init=False)
    current: Snapshot | None = None

    def __post_init__(self) -> None:
        self.tracker = Convergence(lambda: list(self.streams.values()), warn_after=30.0,
                                   clock=self.clock)

    def connect(self, stream_id: int, eds_names: tuple[str, ...] = ()) -> SotwStream:
        stream = SotwStream(stream_id, "ads")
        stream.on_request(discovery_pb2.DiscoveryRequest(
            node=node(f"proxy-{stream_id}"), type_url=resource.CLUSTER))
        stream.on_request(discovery_pb2.DiscoveryRequest(
            type_url=resource.ENDPOINT, resource_names=list(eds_names)))
        self.streams[stream_id] = stream
        if self.current is not None:
            for push in stream.on_snapshot(self.current):
                self.ack(stream, push)
        return stream

    @property
    def group(self) -> str:
        proxy = next(iter(self.streams.values())).proxy
        assert proxy is not None
        return proxy.group

    def publish(self, generation: int, clusters: dict[str, tuple[int, ...]],
                observed_at: float | None = None) -> Snapshot:
        """The pipeline's side: a new snapshot for the group, and what it changed."""
        made = snapshot(clusters, reuse=self.current)
        changed = changed_types(self.current, made)
        self.current = made
        self.tracker.published(generation, self.clock.now if observed_at is None
                               else observed_at, {self.group: changed})
        return made

    def take(self, stream_id: int) -> list[Push]:
        """The stream takes the group's latest snapshot: what it sends."""
        assert self.current is not None
        return self.streams[stream_id].on_snapshot(self.current)

    def ack(self, stream: SotwStream, push: Push) -> None:
        state = stream.types[push.type_url]
        names = sorted(state.subscribed) if not state.wildcard else []
        stream.on_request(discovery_pb2.DiscoveryRequest(
            type_url=push.type_url, version_info=push.version, response_nonce=push.nonce,
            resource_names=names))
        self.tracker.acked(stream, push.type_url)

    def take_and_ack(self, stream_id: int) -> None:
        for push in self.take(stream_id):
            self.ack(self.streams[stream_id], push)

    def close(self, stream_id: int) -> None:
        self.tracker.closed(self.streams.pop(stream_id))


def _count(label: str) -> float:
    value = REGISTRY.get_sample_value("controlplane_convergence_seconds_count",
                                      {"type": label})
    return value or 0.0


def _changes(result: str) -> float:
    return REGISTRY.get_sample_value("controlplane_changes_total", {"result": result}) or 0.0


def _fleet(count: int) -> Fleet:
    fleet = Fleet()
    for stream_id in range(1, count + 1):
        fleet.connect(stream_id)
    fleet.publish(1, {"a": (1,)})  # the first config: every stream takes and ACKs it
    for stream_id in fleet.streams:
        fleet.take_and_ack(stream_id)
    return fleet


def test_every_proxy_acks_then_the_change_converged() -> None:
    fleet = _fleet(3)
    endpoints_before = _count("endpoint")
    converged_before = _changes("converged")
    with capture_logs() as logs:
        fleet.publish(2, {"a": (2,)}, observed_at=fleet.clock.now - 0.1)
        for stream_id, delay in ((1, 0.1), (2, 0.2), (3, 0.5)):
            fleet.clock.now += delay
            fleet.take_and_ack(stream_id)
    [converged] = [e for e in logs if e["event"] == "change.converged"]
    assert converged["generation"] == 2 and converged["proxies"] == 3
    assert abs(converged["seconds"] - 0.9) < 1e-6 and abs(converged["p50"] - 0.4) < 1e-6
    assert _count("endpoint") == endpoints_before + 3  # the clusters did not change
    assert _changes("converged") == converged_before + 1
    [latest, *_] = fleet.tracker.summary()["changes"]
    assert latest["generation"] == 2 and latest["complete"] and latest["acked"] == 3
    assert latest["affected"] == 3 and latest["pending"] == 0 and latest["laggards"] == []
    assert fleet.tracker.proxy(3) == {"generation": 2, "seconds": 0.9}


def test_not_converged_names_the_laggards_then_stops_following() -> None:
    fleet = _fleet(3)
    before = _changes("not_converged")
    fleet.publish(2, {"a": (2,)})
    fleet.take_and_ack(1)
    fleet.take(2)  # sent, never ACKed (a stuck sidecar)
    with capture_logs() as logs:
        fleet.clock.now += 29.0
        fleet.tracker.tick()
        assert not [e for e in logs if e["event"] == "change.not_converged"]
        fleet.clock.now += 1.0
        fleet.tracker.tick()
    [warning] = [e for e in logs if e["event"] == "change.not_converged"]
    assert warning["log_level"] == "warning"
    assert warning["laggards"] == ["proxy-2", "proxy-3"] and warning["not_converged"] == 2
    assert warning["converged"] == 1 and "NACK" in warning["hint"]
    assert _changes("not_converged") == before + 1
    [latest, *_] = fleet.tracker.summary()["changes"]
    assert latest["result"] == "not_converged" and not latest["complete"]
    assert latest["pending"] == 2 and latest["laggards"] == ["proxy-2", "proxy-3"]
    fleet.take_and_ack(3)  # too late: no longer followed, nothing breaks
    assert fleet.tracker.proxy(3) == {"generation": 1, "seconds": 0.0}


def test_a_stream_that_leaves_drops_out() -> None:
    fleet = _fleet(2)
    fleet.publish(2, {"a": (2,)})
    fleet.take_and_ack(1)
    with capture_logs() as logs:
        fleet.close(2)
    [converged] = [e for e in logs if e["event"] == "change.converged"]
    assert converged["proxies"] == 1
    [latest, *_] = fleet.tracker.summary()["changes"]
    assert latest["complete"] and latest["disconnected"] == 1
    assert fleet.tracker.proxy(2) is None


def test_a_stream_that_moves_to_another_group_drops_out() -> None:
    fleet = _fleet(2)
    fleet.publish(2, {"a": (2,)})
    fleet.take_and_ack(1)
    moved = fleet.streams[2]
    assert moved.proxy is not None
    moved.proxy = dataclasses.replace(moved.proxy, zone="zone-b")  # re-resolved
    with capture_logs() as logs:
        fleet.tracker.tick()
    assert [e["proxies"] for e in logs if e["event"] == "change.converged"] == [1]
    [latest, *_] = fleet.tracker.summary()["changes"]
    assert latest["complete"] and latest["disconnected"] == 1


def test_a_newer_change_supersedes_and_keeps_the_older_clock() -> None:
    fleet = _fleet(2)
    fleet.publish(2, {"a": (2,)}, observed_at=fleet.clock.now)
    fleet.take_and_ack(1)  # stream 1 takes generation 2; stream 2 is busy
    fleet.clock.now += 1.0
    fleet.publish(3, {"a": (3,)}, observed_at=fleet.clock.now)
    fleet.clock.now += 0.5
    fleet.take_and_ack(1)
    with capture_logs() as logs:
        fleet.take_and_ack(2)  # straight to generation 3: it got generation 2's change too
    by_generation = {e["generation"]: e for e in logs if e["event"] == "change.converged"}
    assert by_generation[2]["proxies"] == 2 and by_generation[2]["seconds"] == 1.5
    assert by_generation[3]["proxies"] == 2 and by_generation[3]["seconds"] == 0.5
    assert [c["generation"] for c in fleet.tracker.summary()["changes"]][:3] == [3, 2, 1]


def test_a_stream_sent_nothing_is_not_waited_for() -> None:
    fleet = _fleet(1)
    fleet.connect(2, eds_names=("b",))  # subscribes to b's endpoints only
    fleet.take_and_ack(2)
    fleet.publish(2, {"a": (2,)})  # a's endpoints change: stream 2 is sent nothing
    with capture_logs() as logs:
        fleet.take_and_ack(2)
        fleet.tracker.tick()
        assert not [e for e in logs if e["event"] == "change.converged"]
        fleet.take_and_ack(1)
    [converged] = [e for e in logs if e["event"] == "change.converged"]
    assert converged["proxies"] == 1
    [latest, *_] = fleet.tracker.summary()["changes"]
    assert latest["affected"] == 1


def test_an_ack_before_the_pipeline_said_is_credited() -> None:
    fleet = _fleet(1)
    made = snapshot({"a": (2,)}, reuse=fleet.current)
    changed = changed_types(fleet.current, made)
    fleet.current = made
    fleet.take_and_ack(1)  # (the pipeline yields to the streams between groups)
    with capture_logs() as logs:
        fleet.tracker.published(2, fleet.clock.now, {fleet.group: changed})
    assert [e["proxies"] for e in logs if e["event"] == "change.converged"] == [1]


def test_pending_changes_are_bounded() -> None:
    fleet = _fleet(1)
    fleet.tracker = Convergence(lambda: list(fleet.streams.values()), clock=fleet.clock,
                                max_pending=3, keep=4)
    before = _changes("dropped")
    with capture_logs() as logs:
        for generation in range(2, 8):  # the stream never takes any: all pending
            fleet.publish(generation, {"a": (generation,)})
    assert len([e for e in logs if e["event"] == "change.dropped"]) == 3
    assert _changes("dropped") == before + 3
    shown = fleet.tracker.summary()["changes"]
    assert len(shown) <= 3 + 4
    assert [c["generation"] for c in shown if c["result"] == "pending"] == [7, 6, 5]
    fleet.take_and_ack(1)  # ACKs the newest: the three pending converge, credited
    assert [c["generation"] for c in fleet.tracker.summary()["changes"]
            if c["result"] == "converged"][:3] == [7, 6, 5]
    assert not fleet.tracker._index  # nothing pending is left indexed


def test_no_connected_proxy_no_change_followed() -> None:
    tracker = Convergence(lambda: [], clock=Clock())
    tracker.published(1, 0.0, {"g": {resource.CLUSTER: "v"}})
    assert tracker.summary() == {"changes": []}


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
