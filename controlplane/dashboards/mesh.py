"""The mesh dashboard: what the traffic does, per service, from the sidecars' own stats.

Two views of the same requests. Outbound: the callers' sidecars, per destination service
(their upstream cluster stats; ``destination_service`` is extracted from our cluster
names), which counts what callers see, connection failures and timeouts included.
Inbound: each service's own sidecar (its inbound listener's stats; ``source_service`` is
the sidecar's own service, a fixed tag of its bootstrap), which counts what the app
answered. Latency quantiles come from Envoy's histograms (milliseconds).
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

UID: Final = "controlplane-mesh"
# Outbound series of the chosen services; ".+" also leaves out clusters that are not a
# mesh service (the xDS cluster, inbound clusters), which carry no destination_service.
OUT: Final = 'destination_namespace=~"$namespace", destination_service=~"$service"'
BY_DESTINATION: Final = "destination_namespace, destination_service"
DESTINATION: Final = "{{destination_service}}.{{destination_namespace}}"
IN: Final = ('envoy_http_conn_manager_prefix="inbound", source_namespace=~"$namespace", '
             'source_service=~"$service"')
BY_SERVICE: Final = "source_namespace, source_service"
SERVICE: Final = "{{source_service}}.{{source_namespace}}"
# An ingress gateway's own listeners (stat prefix gateway_<port>); its source_service is
# the Gateway's name, a fixed tag of its bootstrap like a sidecar's service.
EDGE: Final = 'envoy_http_conn_manager_prefix=~"gateway_.*", source_namespace=~"$namespace"'


def _rate(metric: str, matchers: str, by: str = "") -> str:
    """Per second, summed by ``by`` (over every series when empty)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{matchers}}}[{RATE}]))"


def _success(prefix: str, matchers: str, by: str = "") -> str:
    """The share of responses that are not 5xx (4xx is the caller's business)."""
    metric = f"{prefix}_xx"
    ok = _rate(metric, f'{matchers}, envoy_response_code_class!="5"', by)
    return f"{ok} / {_rate(metric, matchers, by)}"


def _quantile(q: float, metric: str, matchers: str, by: str = "") -> str:
    return (f"histogram_quantile({q}, sum by ({by + ', ' if by else ''}le) "
            f"(rate({metric}_bucket{{{matchers}}}[{RATE}])))")


def _latency(metric: str, matchers: str, by: str, legend: str) -> tuple[Query, Query]:
    return (Query(_quantile(0.5, metric, matchers, by), f"{legend} p50"),
            Query(_quantile(0.99, metric, matchers, by), f"{legend} p99"))


def _outbound() -> Row:
    upstream = "envoy_cluster_upstream_rq"
    return Row("Outbound: per destination service, as its callers' sidecars see it", (
        timeseries("Request rate", "Requests a second the callers' sidecars sent to each "
                   "service (retries included).",
                   Query(_rate(f"{upstream}_total", OUT, BY_DESTINATION), DESTINATION),
                   unit="reqps"),
        timeseries("Success rate", "Share of responses that are not 5xx, per destination "
                   "service (503s Envoy made itself, for no healthy upstream, count as 5xx).",
                   Query(_success(upstream, OUT, BY_DESTINATION), DESTINATION),
                   unit="percentunit"),
        timeseries("Latency p50 / p99", "Upstream request time per destination service, "
                   "from the callers' histograms.",
                   *_latency(f"{upstream}_time", OUT, BY_DESTINATION, DESTINATION),
                   unit="ms"),
    ))


def _inbound() -> Row:
    downstream = "envoy_http_downstream_rq"
    return Row("Inbound: per service, as its own sidecars served it", (
        timeseries("Request rate", "Requests a second each service's sidecars received.",
                   Query(_rate(f"{downstream}_total", IN, BY_SERVICE), SERVICE),
                   unit="reqps"),
        timeseries("Success rate", "Share of the responses each service's sidecars sent "
                   "that are not 5xx.",
                   Query(_success(downstream, IN, BY_SERVICE), SERVICE), unit="percentunit"),
        timeseries("Latency p50 / p99", "Time from the request's first byte to the "
                   "response's last, at each service's own sidecars.",
                   *_latency(f"{downstream}_time", IN, BY_SERVICE, SERVICE), unit="ms"),
    ))


def _overview() -> Row:
    upstream = "envoy_cluster_upstream_rq"
    return Row("The chosen services, together", (
        stat("Requests / s", "Requests a second to the chosen services.",
             Query(_rate(f"{upstream}_total", OUT)), unit="reqps"),
        stat("Success rate", "Share of their responses that are not 5xx.",
             Query(_success(upstream, OUT)), unit="percentunit"),
        stat("Latency p50", "The median of their upstream request time.",
             Query(_quantile(0.5, f"{upstream}_time", OUT)), unit="ms"),
        stat("Latency p99", "The 99th percentile of their upstream request time.",
             Query(_quantile(0.99, f"{upstream}_time", OUT)), unit="ms"),
    ))


def _connections() -> Row:
    """What a TCP service has (no requests), and HTTP's connections too."""
    upstream = "envoy_cluster_upstream_cx"
    return Row("Connections: TCP services, and HTTP's connections", (
        timeseries("Connections / s", "Connections the callers' sidecars opened to each "
                   "service a second.",
                   Query(_rate(f"{upstream}_total", OUT, BY_DESTINATION), DESTINATION),
                   unit="cps"),
        timeseries("Bytes / s sent", "Bytes the callers' sidecars sent to each service.",
                   Query(_rate(f"{upstream}_tx_bytes_total", OUT, BY_DESTINATION),
                         DESTINATION), unit="Bps"),
        timeseries("Bytes / s received", "Bytes the callers' sidecars received from each "
                   "service.",
                   Query(_rate(f"{upstream}_rx_bytes_total", OUT, BY_DESTINATION),
                         DESTINATION), unit="Bps"),
    ))


def _gateways() -> Row:
    """What enters the mesh: each ingress gateway's listeners, as its clients see them
    (the backends it calls show in the outbound rows, with the gateway as the caller)."""
    downstream = "envoy_http_downstream_rq"
    return Row("Gateways: what enters the mesh, per ingress gateway", (
        timeseries("Request rate", "Requests a second each gateway's HTTP and HTTPS "
                   "listeners received from outside.",
                   Query(_rate(f"{downstream}_total", EDGE, BY_SERVICE), SERVICE),
                   unit="reqps"),
        timeseries("Success rate", "Share of the responses each gateway sent that are "
                   "not 5xx (a route with no backend answers 500 or 503 here).",
                   Query(_success(downstream, EDGE, BY_SERVICE), SERVICE),
                   unit="percentunit"),
        timeseries("Latency p50 / p99", "Time from the request's first byte to the "
                   "response's last, at each gateway.",
                   *_latency(f"{downstream}_time", EDGE, BY_SERVICE, SERVICE), unit="ms"),
    ))


def _callers() -> Row:
    by = f"source_namespace, source_service, {BY_DESTINATION}"
    return Row("Who calls whom", (
        timeseries("Requests by caller and destination", "Requests a second from each "
                   "caller service's sidecars to each destination service.",
                   Query(_rate("envoy_cluster_upstream_rq_total", OUT, by),
                         f"{{{{source_service}}}} -> {DESTINATION}"),
                   unit="reqps", width=24),
    ))


def mesh_dashboard() -> dict[str, Any]:
    variables = [
        label_variable("namespace", "destination_namespace",
                       "envoy_cluster_upstream_rq_total", all_value=".+"),
        label_variable("service", "destination_service",
                       'envoy_cluster_upstream_rq_total{destination_namespace=~"$namespace"}',
                       all_value=".+"),
    ]
    return dashboard(
        UID, "controlplane: mesh traffic",
        "Request rate, success rate and latency per service, from the sidecars' "
        "/stats/prometheus (port 15090, scraped by the pods' prometheus.io annotations).",
        [_overview(), _outbound(), _inbound(), _connections(), _callers(), _gateways()], variables,
        tags=["controlplane", "mesh", "envoy"])
