"""Typed settings for ``controlplane serve``. Each field is also read from the
environment as ``CONTROLPLANE_<FIELD>`` (a flag given on the command line wins)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONTROLPLANE_", extra="forbid")

    source: str = Field(
        default="file:mesh.yaml",
        description="Where the mesh comes from: file:PATH or kubernetes.",
    )
    xds_address: str = Field(default="0.0.0.0:18000", description="gRPC xDS listen address.")
    admin_address: str = Field(
        default="127.0.0.1:19000",
        description="Admin HTTP address: /healthz /readyz /metrics /debug/*.",
    )
    kubeconfig: Path | None = Field(default=None, description="Kubeconfig for --source kubernetes.")
    namespace: list[str] = Field(
        default_factory=list, description="Namespaces to watch (all when empty)."
    )
    snapshot_dir: Path = Field(
        default=Path("snapshots"), description="Where published snapshots are written."
    )
    snapshot_keep: int = Field(
        default=10, ge=0, description="Snapshots kept per group on disk (0 turns the store off)."
    )
    poll_interval: float = Field(
        default=0.2, gt=0, description="How often the file source checks its file, in seconds."
    )
    debounce_quiet: float = Field(
        default=0.1, gt=0, description="Kubernetes: apply a burst of changes once it has been "
        "quiet this long, in seconds."
    )
    debounce_max: float = Field(
        default=10.0, gt=0, description="Kubernetes: apply a burst of changes at the latest "
        "this long after its first change, in seconds."
    )
    watch_timeout: int = Field(
        default=300, ge=1, description="Kubernetes: seconds after which the API server ends "
        "each watch (it is then resumed from its resourceVersion)."
    )
    watch_inactivity: float = Field(
        default=330.0, gt=0, description="Kubernetes: a watch silent this long (no event, no "
        "bookmark) is dropped and resumed."
    )
    write_status: bool = Field(
        default=True, description="Kubernetes: write each TrafficPolicy's Accepted condition."
    )
    pod_labels: bool = Field(
        default=True, description="Kubernetes: watch Pod metadata (labels only) so that "
        "TrafficPolicies can split and match by label subsets."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="json lines for machines, console for people."
    )
    identifier: str = Field(
        default="controlplane", description="Sent to proxies as control_plane.identifier."
    )
    group_ttl: float = Field(
        default=60.0, gt=0, description="A proxy group none of whose proxies has been "
        "connected this long, in seconds, is forgotten: its snapshot, its stored snapshots "
        "and its metric series (clients choose their identity, so groups would otherwise "
        "only grow). `CONTROLPLANE_GROUP_TTL`."
    )
    shutdown_grace: float = Field(
        default=5.0, ge=0, description="On SIGTERM, streams are asked to end once their "
        "writes are done (clients reconnect, to another replica); after this many seconds "
        "the rest are cut."
    )
    max_node_id_bytes: int = Field(
        default=1024, ge=16, description="Longest node.id (also node.cluster and "
        "node.locality.zone) a proxy may send; longer is refused with INVALID_ARGUMENT."
    )
    max_node_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest node (metadata included), "
        "serialized; larger is refused with INVALID_ARGUMENT."
    )
    max_names_per_request: int = Field(
        default=100_000, ge=1, description="Most resource names in one discovery request; "
        "more is refused with RESOURCE_EXHAUSTED."
    )
    max_unknown_types: int = Field(
        default=16, ge=0, description="Distinct type URLs this server does not serve that "
        "one stream may ask for; more is refused with RESOURCE_EXHAUSTED."
    )
    max_streams: int = Field(
        default=0, ge=0, description="Most xDS streams open at once (0: no cap); more are "
        "refused with RESOURCE_EXHAUSTED."
    )
    stream_log_rate: float = Field(
        default=5.0, gt=0, description="Warnings one stream may cause per second (NACKs, "
        "unknown types, protocol errors); the rest are counted and the count logged."
    )


def split_address(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port), or ValueError naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {address!r} must be HOST:PORT, e.g. 127.0.0.1:18000")
    return host.strip("[]"), int(port)
