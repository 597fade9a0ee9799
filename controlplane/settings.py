"""Typed settings for ``controlplane serve``. Each field is also read from the
environment as ``CONTROLPLANE_<FIELD>`` (a flag given on the command line wins)."""

from __future__ import annotations

import os
import socket
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
        default_factory=socket.gethostname,
        description="This replica's name (default the host name: the pod's name in a "
        "cluster): sent to proxies as control_plane.identifier, shown by `controlplane "
        "status` (REPLICA) and in a policy's Programmed condition.")
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
    convergence_warn_after: float = Field(
        default=30.0, gt=0, description="Seconds a mesh change may take to reach every "
        "proxy it affects (each ACKed it); then a warning (change.not_converged) names the "
        "laggards and the change is no longer followed. "
        "`CONTROLPLANE_CONVERGENCE_WARN_AFTER`."
    )
    max_large_writes: int = Field(
        default=16, ge=0, description="Large xDS responses (initial syncs, a big mesh's "
        "whole CDS or RDS) written at once over every stream (0: no bound); more wait their "
        "turn, small updates never wait."
    )
    large_write_bytes: int = Field(
        default=64 * 1024, ge=1, description="From this size on a response is large."
    )
    large_write_turn_seconds: float = Field(
        default=1.0, gt=0, description="How long a large write keeps its turn before the "
        "next waiting one starts (a client that does not read stops holding others up)."
    )
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = Field(
        default="ALLOW_ANY", description="Kubernetes: where captured sidecars send calls to "
        "destinations outside the mesh: through to the original destination (ALLOW_ANY), "
        "or nowhere, with a 502 that says so (REGISTRY_ONLY). A mesh file says it itself."
    )
    # -- identity and zero trust (issue 11)
    ca_dir: Path | None = Field(
        default=None, description="Run the mesh CA from this directory (ca.crt, ca.key, "
        "roots.pem), made on first start: xDS over TLS, proxies authenticated, SDS secrets "
        "per workload."
    )
    ca_cert: Path | None = Field(
        default=None, description="Bring your own CA: its PEM certificate (with ca_key)."
    )
    ca_key: Path | None = Field(default=None, description="PEM key of ca_cert.")
    ca_bundle: Path | None = Field(
        default=None, description="PEM trust bundle (one or more roots) for ca_cert; "
        "default: the roots in ca_cert."
    )
    ca_secret: str = Field(
        default="controlplane-ca", description="Kubernetes: the Secret (in the control "
        "plane's namespace, cert-manager's tls.crt/tls.key/ca.crt) holding the mesh CA; made "
        "on first start, shared by replicas."
    )
    trust_domain: str = Field(
        default="cluster.local", description="SPIFFE trust domain of workload identities."
    )
    workload_cert_ttl: str = Field(
        default="24h", description="Lifetime of workload certificates (e.g. 24h, 90s); each "
        "is renewed at half its life, without a restart."
    )
    authentication: Literal["token", "none"] | None = Field(
        default=None, description="How proxies prove who they are when a CA runs: token "
        "(Kubernetes: TokenReview of the pod's projected token; file mode: tokens minted by "
        "`controlplane bootstrap --ca-dir`), the default; none trusts the node's claim and "
        "serves xDS in plaintext (development only; logged as a warning)."
    )
    xds_server_name: list[str] = Field(
        default_factory=list, description="More DNS names or IPs for the xDS server's TLS "
        "certificate (besides controlplane.<namespace>.svc..., localhost, 127.0.0.1)."
    )
    ca_poll_interval: float = Field(
        default=30.0, gt=0, description="How often the CA source is read again, in seconds "
        "(a rotated root reaches every proxy without a restart)."
    )

    # -- the injection webhook (DESIGN.md section 5; deploy/kubernetes sets these)
    webhook_address: str | None = Field(
        default=None, description="HTTPS HOST:PORT of the sidecar injection webhook. Default: "
        "0.0.0.0:15017 with --source kubernetes inside a pod (where the API server can "
        "call it), else off; `off` turns it off."
    )
    webhook_cert: Path | None = Field(
        default=None, description="PEM serving certificate for the webhook (with "
        "webhook_key; e.g. cert-manager's Secret, mounted). Without them the control plane "
        "makes its own CA and certificate."
    )
    webhook_key: Path | None = Field(default=None, description="PEM key of webhook_cert.")
    webhook_ca: Path | None = Field(
        default=None, description="PEM CA of webhook_cert, written into the webhook "
        "configuration's caBundle (Kubernetes); default: none written (cert-manager's "
        "CA injector, or you, fill it)."
    )
    webhook_namespace: str = Field(
        default="controlplane-system", description="Kubernetes: the control plane's own "
        "namespace (the manifests set it from the downward API): where its certificate's "
        "Secret is kept, and the Service name its certificate is for."
    )
    webhook_service: str = Field(
        default="controlplane", description="The Service the API server calls the webhook "
        "through: the certificate is for <service>.<namespace>.svc."
    )
    webhook_configuration: str = Field(
        default="controlplane-injector", description="Kubernetes: the "
        "MutatingWebhookConfiguration whose caBundle the control plane keeps current."
    )
    webhook_cert_dir: Path = Field(
        default=Path("webhook-certs"), description="Mesh file mode: where a self-made CA "
        "and certificate are kept between runs (in Kubernetes: a Secret)."
    )
    inject_failure_policy: Literal["open", "closed"] = Field(
        default="open", description="A pod the webhook cannot understand: admitted without "
        "a sidecar and a warning (open), or refused with the reason (closed)."
    )
    inject_proxy_image: str = Field(
        default="envoyproxy/envoy:v1.40-latest", description="Image of injected sidecars."
    )
    inject_init_image: str = Field(
        default="controlplane:latest", description="Image of the init container that "
        "installs traffic capture (`controlplane capture`)."
    )
    inject_xds_address: str = Field(
        # deploy.SERVICE_ADDRESS; tests/test_deploy.py keeps the two equal.
        default="controlplane.controlplane-system.svc:18000",
        description="HOST:PORT injected sidecars dial for xDS."
    )
    inject_proxy_uid: int = Field(
        default=1337, ge=1, description="UID (and GID) of injected sidecars, which capture "
        "leaves alone."
    )
    inject_proxy_cpu: str = Field(default="100m", description="Sidecar CPU request.")
    inject_proxy_memory: str = Field(default="128Mi", description="Sidecar memory request.")
    inject_proxy_memory_limit: str = Field(default="512Mi",
                                           description="Sidecar memory limit.")
    inject_delta: bool = Field(default=False,
                               description="Injected sidecars use delta xDS instead of SotW.")
    inject_log_level: str = Field(default="warning", description="Injected Envoys' log level.")

    # -- status and rebalancing (issue 12)
    status_namespace: str | None = Field(
        default=None, min_length=1, description="With token authentication, the client "
        "status (CSDS) answers only credentials of this namespace. Default: the control "
        "plane's own (webhook_namespace, controlplane-system unless the manifests say; file "
        "mode: a token minted for it with controlplane bootstrap --ca-dir --namespace)."
    )
    max_connection_age: float = Field(
        default=1800.0, ge=0, description="Seconds after which the server asks a proxy's "
        "connection to go (gRPC GOAWAY, +/-10% jitter), so that after a rollout or a "
        "scale-up sidecars spread over the replicas again; 0: never."
    )
    max_connection_age_grace: float = Field(
        default=10.0, ge=0, description="Seconds the streams of an aged connection get "
        "before they are ended (the proxy has reconnected by then; its versions do not "
        "change: replicas of one mesh serve the same versions)."
    )

    def ca_mode(self) -> Literal["files", "dir", "secret"] | None:
        """Where the mesh CA comes from; None: no CA (no identities, plaintext xDS)."""
        if self.ca_cert is not None or self.ca_key is not None:
            return "files"
        if self.ca_dir is not None:
            return "dir"
        return "secret" if self.source == "kubernetes" else None

    def status_readers(self) -> str:
        """The namespace whose credentials may read the client status (CSDS)."""
        return self.status_namespace or self.webhook_namespace

    def tokens_required(self) -> bool:
        """Whether streams must authenticate (and xDS is TLS): a CA and not ``none``."""
        return self.ca_mode() is not None and self.authentication != "none"

    def webhook_listen(self) -> str | None:
        """The webhook's address, or None when it does not run. Unset, it runs only in a
        cluster's pod (the API server calls it through a Service): a ``serve --source
        kubernetes --kubeconfig`` on a laptop or in tests binds no 0.0.0.0:15017."""
        if self.webhook_address == "off":
            return None
        if self.webhook_address:
            return self.webhook_address
        in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return "0.0.0.0:15017" if self.source == "kubernetes" and in_pod else None


def split_address(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port), or ValueError naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {address!r} must be HOST:PORT, e.g. 127.0.0.1:18000")
    return host.strip("[]"), int(port)
