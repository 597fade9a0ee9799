"""Every metric the Grafana dashboards query exists in a real scrape: the control plane's
/metrics with real sidecars connected and a change made and ACKed, and the sidecars'
stats listeners (/stats/prometheus on the port Prometheus scrapes) after real requests
through them (a caller's outbound cluster and the callee's inbound listener). A renamed
metric would leave a panel silently empty."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import dashboards
from tests.support.procs import free_port, http_get, wait_for
from tests.support.promise_rig import Rig, service
from tests.support.promise_servers import ScriptedHttp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
# The series names a declared family stores, by its type, once it has series.
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(\{.*\})?\s")
LABEL = re.compile(r'([A-Za-z_]\w*)="(?:[^"\\]|\\.)*"')
TYPE = re.compile(r"^# TYPE ([A-Za-z_:][\w:]*) (\w+)")


def exposed(text: str) -> dict[str, set[str]]:
    """Each series name a scrape exposes, as Prometheus stores it, -> its label names. A
    labelled metric declared but never observed is exposed by name, without labels.
    (prometheus_client's parser is not used: it renames a counter without ``_total``,
    such as Envoy's ``envoy_cluster_upstream_rq_xx``, and Prometheus does not.)"""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        declared = TYPE.match(line)
        if declared:
            family, kind = declared.groups()
            for suffix in SUFFIXES.get(kind, ("",)):
                names.setdefault(family + suffix, set())
            continue
        sample = SAMPLE.match(line)
        if sample:
            names.setdefault(sample.group(1), set()).update(
                LABEL.findall(sample.group(2) or ""))
    return names


MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^()]*)\)")


def labels_of(expr: str) -> set[str]:
    """The label names a query matches on or groups by (``le`` included)."""
    found = set(MATCHER.findall(" ".join(re.findall(r"\{[^{}]*\}", expr))))
    for group in GROUPING.findall(expr):
        found |= {name.strip() for name in group.split(",") if name.strip()}
    return found


def board(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (ROOT / dashboards.DIR / name).read_text(encoding="utf-8"))
    return loaded


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def prometheus(port: int) -> str:
    """A sidecar's metrics as Prometheus scrapes them: its stats listener (the port the
    pod's prometheus.io/port annotation names), not its loopback admin."""
    status, text, _ = http_get(f"http://127.0.0.1:{port}/stats/prometheus")
    assert status == 200, text
    return text


def test_every_dashboard_metric_exists_in_a_real_scrape(lab: Rig) -> None:
    app = lab.own(ScriptedHttp("reviews"))
    server = lab.serve([service("reviews", [app])])
    stats = {"reviews-1": free_port(), "frontend-1": free_port()}

    def ports(node_id: str) -> list[str]:
        """The stats listener forwards to the admin, whose port it must know (the last
        --admin-port wins over the rig's 0)."""
        return ["--stats-port", str(stats[node_id]), "--admin-port", str(free_port())]

    callee = lab.envoy("reviews-1", service="reviews", app_port=app.port,
                       extra=ports("reviews-1"))
    caller = lab.envoy("frontend-1", extra=ports("frontend-1"))
    wait_for(lambda: caller.request("reviews")[0] == 200, what="reviews routed to its app")

    # The change: reviews is now reached through its own sidecar's inbound listener.
    assert callee.inbound_port is not None
    lab.write([{"name": "reviews", "port": 9080,
                "endpoints": [{"address": "127.0.0.1", "port": callee.inbound_port}]}])
    wait_for(lambda: caller.request("reviews")[0] == 200
             and callee.stat("http.inbound.downstream_rq_completed") > 0,
             what="requests through both sidecars", timeout=30)
    for _ in range(5):
        assert caller.request("reviews")[0] == 200

    # The sidecars: the caller's outbound cluster and the callee's inbound listener, once
    # their latency histograms have been flushed.
    wanted = dashboards.dashboard_metrics(board("mesh.json"))

    def sidecars() -> dict[str, set[str]] | None:
        names = exposed(prometheus(stats[caller.node_id]))
        for metric, labels in exposed(prometheus(stats[callee.node_id])).items():
            names.setdefault(metric, set()).update(labels)
        missing = wanted - set(names)
        assert not missing, f"the sidecars expose no {sorted(missing)}"
        return names

    found = wait_for(sidecars, what="every mesh dashboard metric in the sidecars' scrape",
                     timeout=30, interval=0.5)
    # ... with the labels the queries match on and group by (the sidecars' own and
    # destination tags, Envoy's response class and listener prefix).
    mesh = board("mesh.json")
    for panel in mesh["panels"]:
        for target in panel.get("targets", []):
            for metric in dashboards.metric_names(target["expr"]):
                missing = labels_of(target["expr"]) - found[metric]
                assert not missing, f"{metric} has no label {sorted(missing)}: {target['expr']}"

    # The control plane: the change is ACKed and measured (convergence observed).
    def control_plane() -> dict[str, set[str]] | None:
        status, text, _ = server.get("/metrics")
        assert status == 200, text
        names = exposed(text)
        observed = names.get("controlplane_convergence_seconds_bucket", set())
        assert {"type", "le"} <= observed, "no convergence observed yet"
        return names

    scraped = wait_for(control_plane, what="the change's convergence observed", timeout=30)
    wanted = dashboards.dashboard_metrics(board("controlplane.json"))
    assert wanted, "the control plane dashboard names no metric"
    assert not wanted - set(scraped), (
        f"metrics the control plane dashboard queries but /metrics lacks: "
        f"{sorted(wanted - set(scraped))}")
