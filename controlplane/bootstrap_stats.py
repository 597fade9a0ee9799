"""The bootstrap's ``stats_config``: the labels every sidecar metric carries.

Tags are bootstrap-only in Envoy (no xDS changes them), so they are fixed here: the
sidecar's own service and namespace on every metric, and the destination service and
namespace read out of our outbound cluster names (``outbound|9080|v1|reviews.default.svc
.cluster.local``, translator/names.py) on the upstream cluster metrics.

Envoy's default tag regexes run before any custom one, and its cluster-name regex stops
at the first dot: our names would come out as ``envoy_cluster_svc_cluster_local_*``
metrics. Its override switch is newer than the protobufs we build with, so, as Istio
does, the defaults are off and the ones a mesh uses are listed here (the same tag names,
so dashboards written for Envoy work), with a cluster-name regex that knows our names.
In each regex the first group is what Envoy cuts out of the metric name, the second the
label's value. Histogram buckets (milliseconds) are fewer than Envoy's 20 defaults: each
is a series per cluster in every scrape.
"""

from __future__ import annotations

from typing import Any, Final

SOURCE_SERVICE: Final = "source_service"
SOURCE_NAMESPACE: Final = "source_namespace"
DESTINATION_SERVICE: Final = "destination_service"
DESTINATION_NAMESPACE: Final = "destination_namespace"

_WORD: Final = r"[^.]+"
_NAME: Final = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_OURS: Final = r"(?:outbound|inbound)\|\d+\|[^|]*\|[^|]+?\.svc\.cluster\.local"
_OUTBOUND: Final = r"^cluster\.outbound\|\d+\|[^|]*\|"
_ADDRESS: Final = r"(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}_\d+|\[[_a-fA-F0-9]+\]_\d+)"

TAGS: Final[tuple[tuple[str, str], ...]] = (
    ("envoy.response_code", r"_rq(_(\d{3}))$"),
    ("envoy.response_code_class", r"_rq_((\d))xx$"),
    ("envoy.cluster_name", rf"^cluster\.(({_OURS}|{_WORD})\.)"),
    (DESTINATION_SERVICE, rf"{_OUTBOUND}(({_NAME})\.){_NAME}\.svc\."),
    (DESTINATION_NAMESPACE, rf"{_OUTBOUND}{_NAME}\.(({_NAME})\.)svc\."),
    ("envoy.http_conn_manager_prefix", rf"^listener\..*?\.http\.(({_WORD})\.)"),
    ("envoy.http_conn_manager_prefix", rf"^http\.(({_WORD})\.)"),
    ("envoy.rds_route_config", rf"^http\.{_WORD}\.rds\.(([\w.-]+)\.)\w+?$"),
    ("envoy.tcp_prefix", rf"^tcp\.(({_WORD})\.)"),
    ("envoy.listener_address", rf"^listener\.(({_ADDRESS})\.)"),
    ("envoy.worker_id", r"^listener_manager\.((worker_\d+)\.)"),
)
HISTOGRAM_BUCKETS_MS: Final = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                               30000, 60000)


def stats_config(service: str, namespace: str) -> dict[str, Any]:
    """``stats_config`` of a sidecar of ``service`` in ``namespace``."""
    return {
        "stats_tags": [
            {"tag_name": SOURCE_SERVICE, "fixed_value": service},
            {"tag_name": SOURCE_NAMESPACE, "fixed_value": namespace},
            *({"tag_name": name, "regex": regex} for name, regex in TAGS),
        ],
        "use_all_default_tags": False,
        "histogram_bucket_settings": [
            {"match": {"safe_regex": {"regex": ".*"}}, "buckets": list(HISTOGRAM_BUCKETS_MS)},
        ],
    }
