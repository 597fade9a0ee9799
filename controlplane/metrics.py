"""Prometheus metrics, defined in one place (served on the admin port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTED_PROXIES = Gauge(
    "controlplane_connected_proxies", "xDS streams open now, by protocol.", ["protocol"]
)
REQUESTS = Counter(
    "controlplane_xds_requests_total",
    "Discovery requests received, by type and kind (initial, ack, nack, stale, ...).",
    ["type", "kind"],
)
PUSHES = Counter("controlplane_xds_pushes_total", "Discovery responses sent, by type.", ["type"])
PUSH_BYTES = Counter(
    "controlplane_xds_push_bytes_total", "Bytes of discovery responses sent, by type.", ["type"]
)
NACKS = Counter("controlplane_xds_nacks_total", "Responses rejected by a proxy, by type.", ["type"])
SNAPSHOT_BUILD_SECONDS = Histogram(
    "controlplane_snapshot_build_seconds",
    "Time to translate and encode one group's snapshot.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SNAPSHOT_BUILDS = Counter(
    "controlplane_snapshot_builds_total",
    "Snapshot builds, by result (published, unchanged, rejected).",
    ["result"],
)
CONFIG_BYTES = Gauge(
    "controlplane_config_bytes", "Encoded size of the served config, by group and type.",
    ["group", "type"],
)
MESH_UPDATES = Counter(
    "controlplane_mesh_updates_total",
    "Mesh states received from the source, by result (accepted, rejected).",
    ["result"],
)
ENCODED_BYTES = Counter(
    "controlplane_encoded_bytes_total",
    "Bytes of resources serialized to build snapshots: per changed service, and per group "
    "its own listeners. Streams never serialize resources; they send these bytes.",
)
K8S_EVENTS = Counter(
    "controlplane_kubernetes_events_total",
    "Watch events received from the Kubernetes API, by resource and type.",
    ["resource", "type"],
)
K8S_RELISTS = Counter(
    "controlplane_kubernetes_watch_restarts_total",
    "Watches started again, by resource and reason (gone: relisted after 410; "
    "reconnect: dropped or silent; error: the API failed, with backoff).",
    ["resource", "reason"],
)
K8S_REBUILDS = Counter(
    "controlplane_kubernetes_rebuilds_total",
    "Debounced batches of Kubernetes changes, by result (published, unchanged).",
    ["result"],
)
PROXY_GROUPS = Gauge(
    "controlplane_proxy_groups",
    "Proxy groups with a snapshot: a proxy connected, or gone for less than the group TTL.",
)
GROUPS_EXPIRED = Counter(
    "controlplane_proxy_groups_expired_total",
    "Groups forgotten after the group TTL with no proxy connected.",
)
STREAMS_REFUSED = Counter(
    "controlplane_xds_streams_refused_total",
    "Streams ended for what the client sent, by reason (node, names, unknown_types, "
    "streams, malformed, protocol, unauthenticated, permission_denied, unavailable).",
    ["reason"],
)
SERVICES_REJECTED = Gauge(
    "controlplane_services_rejected",
    "Services of the current mesh that could not be translated (each served at its last "
    "good version, or left out).",
)
CONVERGENCE_SECONDS = Histogram(
    "controlplane_convergence_seconds",
    "From a source event (a file saved, a Kubernetes watch event) until a proxy ACKed the "
    "config it caused, by type (cluster, endpoint, listener, route, virtual_host, secret).",
    ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CHANGES = Counter(
    "controlplane_changes_total",
    "Mesh changes followed to the proxies, by result (converged: every affected proxy "
    "ACKed; not_converged: some had not after --convergence-warn-after; dropped: too many "
    "changes pending).",
    ["result"],
)
PROXY_NACKS = Gauge(
    "controlplane_proxy_nacks",
    "Proxies whose latest response of some type they rejected (NACKed) and not yet "
    "accepted a newer one.",
)
