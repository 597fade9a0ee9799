"""Each metric the README advertises on /metrics moves as real sidecars connect, ACK,
NACK and disconnect, and as the mesh file changes: read from the running server's own
/metrics page, never by touching the counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import wait_for
from tests.support.promise_rig import Rig, scrape, service, value
from tests.support.promise_servers import ScriptedHttp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TYPES = ("cds", "eds", "lds", "rds")
@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def test_every_advertised_metric_follows_real_events(lab: Rig) -> None:
    reviews, ratings = lab.own(ScriptedHttp("reviews")), lab.own(ScriptedHttp("ratings"))
    server = lab.serve([service("reviews", [reviews])])
    before = scrape(server)
    assert value(before, "controlplane_connected_proxies") == 0
    assert value(before, "controlplane_mesh_updates_total", result="accepted") >= 1

    # A SotW sidecar connects: a stream, requests and ACKs of every type, pushes.
    sotw = lab.envoy("frontend-1")
    wait_for(lambda: sotw.request("reviews")[1] == "reviews", what="reviews routed")
    connected = wait_for(lambda: (s := scrape(server)) and value(
        s, "controlplane_xds_requests_total", type="rds", kind="ack") >= 1 and s,
        what="the first RDS ACK counted")
    assert value(connected, "controlplane_connected_proxies", protocol="sotw") == 1
    for kind in TYPES:
        assert value(connected, "controlplane_xds_pushes_total", type=kind) >= 1, kind
        assert value(connected, "controlplane_xds_requests_total", type=kind,
                     kind="ack") >= 1, kind
        assert value(connected, "controlplane_xds_push_bytes_total", type=kind) > 0, kind
        assert value(connected, "controlplane_config_bytes", type=kind) > 0, kind
    assert value(connected, "controlplane_snapshot_build_seconds_count") >= 1
    assert value(connected, "controlplane_encoded_bytes_total") > 0
    assert value(connected, "controlplane_xds_nacks_total") == 0

    # The mesh grows: one more accepted update, a build, bytes encoded and pushed, a
    # bigger route table and cluster list for the sidecar's group.
    lab.write([service("reviews", [reviews]), service("ratings", [ratings])])
    wait_for(lambda: sotw.request("ratings")[1] == "ratings", what="ratings routed")
    grown = wait_for(lambda: (s := scrape(server)) and value(
        s, "controlplane_xds_requests_total", type="rds", kind="ack") > value(
        connected, "controlplane_xds_requests_total", type="rds", kind="ack") and s,
        what="the new routes ACKed")

    def more(name: str, **labels: str) -> bool:
        return value(grown, name, **labels) > value(connected, name, **labels)

    assert value(grown, "controlplane_mesh_updates_total", result="accepted") == value(
        connected, "controlplane_mesh_updates_total", result="accepted") + 1
    assert more("controlplane_snapshot_build_seconds_count")
    assert more("controlplane_encoded_bytes_total")
    for kind in ("cds", "rds"):
        assert more("controlplane_xds_pushes_total", type=kind), kind
        assert more("controlplane_xds_push_bytes_total", type=kind), kind
        assert more("controlplane_config_bytes", type=kind), kind

    # A bad save: counted as rejected, nothing pushed.
    lab.mesh.write_text("services:\n  - name: reviews\n    port: 99999\n")
    rejected = wait_for(lambda: (s := scrape(server)) and value(
        s, "controlplane_mesh_updates_total", result="rejected") >= 1 and s,
        what="the rejected update counted")
    assert value(rejected, "controlplane_xds_pushes_total") == value(
        grown, "controlplane_xds_pushes_total")
    lab.write([service("reviews", [reviews]), service("ratings", [ratings])])

    # A delta sidecar whose inbound port is taken: a real LDS NACK, counted.
    lab.envoy("reviews-1", delta=True, service="reviews", extra=[
        "--inbound-port", str(reviews.port), "--app-port", str(reviews.port),
        "--inbound-address", "127.0.0.1"])
    nacked = wait_for(lambda: (s := scrape(server)) and value(
        s, "controlplane_xds_nacks_total", type="lds") >= 1 and s, what="the LDS NACK")
    assert value(nacked, "controlplane_xds_requests_total", type="lds", kind="nack") >= 1
    assert value(nacked, "controlplane_connected_proxies", protocol="delta") == 1
    assert value(nacked, "controlplane_connected_proxies", protocol="sotw") == 1

    # Sidecars gone: no stream left.
    for envoy in lab.envoys:
        envoy.stop()
    wait_for(lambda: value(scrape(server), "controlplane_connected_proxies") == 0,
             what="the streams to close")
