"""The control plane dashboard: its proxies, what it pushes, how fast a change reaches
every proxy, and what was rejected (by the proxies, or by the control plane itself).

Queries read the control plane's own /metrics (controlplane/metrics.py), scraped from
each replica's admin port by the Deployment's prometheus.io annotations; ``instance``
(which Prometheus adds per scraped pod) picks replicas.
"""

from __future__ import annotations

from typing import Any, Final

from controlplane.dashboards.grafana import (
    RATE,
    Query,
    Row,
    dashboard,
    label_variable,
    stat,
    timeseries,
)

UID: Final = "controlplane-server"
REPLICAS: Final = 'instance=~"$instance"'


def _sum(metric: str, by: str = "", extra: str = "") -> str:
    """The replicas' gauges added up (by ``by`` when given)."""
    grouping = f" by ({by})" if by else ""
    matchers = f"{REPLICAS}, {extra}" if extra else REPLICAS
    return f"sum{grouping} ({metric}{{{matchers}}})"


def _rate(metric: str, by: str = "", extra: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    matchers = f"{REPLICAS}, {extra}" if extra else REPLICAS
    return f"sum{grouping} (rate({metric}{{{matchers}}}[{RATE}]))"


def _increase(metric: str, by: str, window: str = RATE) -> str:
    return f"sum by ({by}) (increase({metric}{{{REPLICAS}}}[{window}]))"


def _quantiles(metric: str, by: str, legend: str) -> tuple[Query, Query]:
    grouping = f"{by}, le" if by else "le"

    def quantile(q: float) -> str:
        return (f"histogram_quantile({q}, sum by ({grouping}) "
                f"(rate({metric}_bucket{{{REPLICAS}}}[{RATE}])))")

    return Query(quantile(0.5), f"{legend} p50"), Query(quantile(0.99), f"{legend} p99")


def _fleet() -> Row:
    return Row("Fleet", (
        stat("Connected proxies", "xDS streams open now, every replica together.",
             Query(_sum("controlplane_connected_proxies"))),
        stat("Proxies rejecting config", "Proxies whose latest response of some type they "
             "NACKed, now (`controlplane status` names them and their error).",
             Query(_sum("controlplane_proxy_nacks")), red_from=1),
        stat("Convergence p99", "From the source event (file save, Kubernetes watch event) "
             "to a proxy's ACK of the version that has it, over the dashboard's range.",
             Query("histogram_quantile(0.99, sum by (le) (rate("
                   f"controlplane_convergence_seconds_bucket{{{REPLICAS}}}[$__range])))"),
             unit="s"),
        stat("Services not translated", "Services of the current mesh served at their last "
             "good version, or left out (the highest replica's count).",
             Query(f"max(controlplane_services_rejected{{{REPLICAS}}})"), red_from=1),
        timeseries("Connected proxies", "Streams open per replica and protocol (sotw, "
                   "delta): after a rollout, max connection age spreads them again.",
                   Query(_sum("controlplane_connected_proxies", "instance, protocol"),
                         "{{instance}} {{protocol}}"), width=12),
        timeseries("Proxy groups", "Groups with a snapshot (a proxy connected, or gone for "
                   "less than the group TTL), per replica.",
                   Query(_sum("controlplane_proxy_groups", "instance"), "{{instance}}"),
                   width=12),
    ))


def _convergence() -> Row:
    return Row("Convergence: from a change's source event to each proxy's ACK", (
        timeseries("Convergence p50 / p99", "Per resource type, from the source event to "
                   "each proxy's ACK of the version that contains it.",
                   *_quantiles("controlplane_convergence_seconds", "type", "{{type}}"),
                   unit="s", width=12),
        timeseries("Changes by result", "Changes that every affected proxy ACKed "
                   "(converged), that some had not ACKed after --convergence-warn-after "
                   "(not_converged, logged as change.not_converged with the laggards), and "
                   "that were dropped unfinished (too many pending).",
                   Query(_increase("controlplane_changes_total", "result"), "{{result}}"),
                   width=12),
    ))


def _pushes() -> Row:
    return Row("Pushes", (
        timeseries("Pushes / s by type", "Discovery responses sent a second.",
                   Query(_rate("controlplane_xds_pushes_total", "type"), "{{type}}"),
                   unit="ops"),
        timeseries("Push bytes / s by type", "Bytes of discovery responses sent a second.",
                   Query(_rate("controlplane_xds_push_bytes_total", "type"), "{{type}}"),
                   unit="Bps"),
        timeseries("Requests / s by kind", "Discovery requests a second: initial, ack, "
                   "nack, stale, ...",
                   Query(_rate("controlplane_xds_requests_total", "kind"), "{{kind}}"),
                   unit="reqps"),
    ))


def _rejections() -> Row:
    return Row("Rejections", (
        timeseries("NACKs / s by type", "Responses the proxies rejected; the TrafficPolicy "
                   "or SecurityPolicy behind them says so in its status.",
                   Query(_rate("controlplane_xds_nacks_total", "type"), "{{type}}"),
                   unit="ops"),
        timeseries("Proxies rejecting config", "Proxies whose latest response of some type "
                   "is NACKed now, per replica.",
                   Query(_sum("controlplane_proxy_nacks", "instance"), "{{instance}}")),
        timeseries("Mesh updates by result", "Mesh states from the source, accepted or "
                   "rejected (a rejected mesh is never served; the last good one stays).",
                   Query(_increase("controlplane_mesh_updates_total", "result"),
                         "{{result}}")),
        timeseries("Services not translated", "Services of the current mesh that could not "
                   "be translated, per replica.",
                   Query(_sum("controlplane_services_rejected", "instance"), "{{instance}}"),
                   width=12),
        timeseries("Streams refused / s by reason", "Streams ended for what the client "
                   "sent (unauthenticated, permission_denied, limits, ...).",
                   Query(_rate("controlplane_xds_streams_refused_total", "reason"),
                         "{{reason}}"), unit="ops", width=12),
    ))


def _snapshots() -> Row:
    return Row("Snapshots", (
        timeseries("Snapshot build time p50 / p99", "Time to translate and encode one "
                   "group's snapshot.",
                   *_quantiles("controlplane_snapshot_build_seconds", "", "build"), unit="s"),
        timeseries("Snapshot builds by result", "Builds a second: published, unchanged, "
                   "rejected.",
                   Query(_rate("controlplane_snapshot_builds_total", "result"), "{{result}}"),
                   unit="ops"),
        timeseries("Served config bytes by type", "Encoded size of the served config, all "
                   "groups together (the highest replica's).",
                   Query(f"max by (type) (sum by (instance, type) "
                         f"(controlplane_config_bytes{{{REPLICAS}}}))", "{{type}}"),
                   unit="bytes"),
    ))


def control_plane_dashboard() -> dict[str, Any]:
    return dashboard(
        UID, "controlplane: control plane",
        "Connected proxies, pushes, convergence and rejections, from the control plane's "
        "/metrics (admin port 19000, scraped by the Deployment's prometheus.io "
        "annotations).",
        [_fleet(), _convergence(), _pushes(), _rejections(), _snapshots()],
        [label_variable("instance", "instance", "controlplane_connected_proxies")],
        tags=["controlplane", "xds"])
