"""What injection adds to a pod, and the names users and manifests depend on.

One frozen :class:`InjectConfig` is shared by the webhook (from the serve settings) and
``controlplane inject`` (from its flags), so both inject the same sidecar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from controlplane.bootstrap import (
    CAPTURE_ADMIN_PORT,
    CAPTURE_EGRESS_PORT,
    CAPTURE_HEALTH_PORT,
    CAPTURE_INBOUND_PORT,
    CAPTURE_STATS_PORT,
    parse_host_port,
)
from controlplane.bootstrap_xds import check_bundle

PREFIX = "mesh.controlplane.io/"
INJECT_LABEL = PREFIX + "inject"
"""Namespace label ``enabled``/``disabled``; pod label (or annotation) ``true``/``false``."""
STATUS_ANNOTATION = PREFIX + "status"
"""Written on an injected pod: what was injected (and so, that it was)."""
SERVICE_ANNOTATION = PREFIX + "service"
"""The service a pod belongs to, when its labels do not say."""
SERVICE_ACCOUNT_ANNOTATION = PREFIX + "service-account"
"""Written on an injected pod: its ServiceAccount. Pods are watched as metadata only, so
this is how the source learns a pod's identity (and that it has a sidecar)."""

EXCLUDE_OUTBOUND_PORTS = PREFIX + "exclude-outbound-ports"
EXCLUDE_OUTBOUND_CIDRS = PREFIX + "exclude-outbound-cidrs"
INCLUDE_OUTBOUND_CIDRS = PREFIX + "include-outbound-cidrs"
EXCLUDE_INBOUND_PORTS = PREFIX + "exclude-inbound-ports"
INCLUDE_INBOUND_PORTS = PREFIX + "include-inbound-ports"
PROXY_CPU = PREFIX + "proxy-cpu"
PROXY_CPU_LIMIT = PREFIX + "proxy-cpu-limit"
PROXY_MEMORY = PREFIX + "proxy-memory"
PROXY_MEMORY_LIMIT = PREFIX + "proxy-memory-limit"
PROXY_LOG_LEVEL = PREFIX + "proxy-log-level"

INIT_NAME = "controlplane-init"
PROXY_NAME = "controlplane-proxy"
OUR_CONTAINERS = (INIT_NAME, PROXY_NAME)

TOKEN_VOLUME = "controlplane-token"
TOKEN_DIR = "/var/run/secrets/controlplane"
TOKEN_PATH = TOKEN_DIR + "/token"
"""Where the sidecar reads its projected ServiceAccount token (re-read per xDS stream)."""
TOKEN_AUDIENCE = "controlplane"
"""The token's audience (``security.tokens.AUDIENCE``): the server's TokenReview asks for
it, so a token made for another audience (the API server's own) is refused."""
TOKEN_SECONDS = 3600
"""The kubelet renews a projected token at 80% of its life; an hour is the shortest the
API server allows without extending it."""

ADMIN_PORT = CAPTURE_ADMIN_PORT
OUTBOUND_PORT = CAPTURE_EGRESS_PORT
INBOUND_PORT = CAPTURE_INBOUND_PORT
HEALTH_PORT = CAPTURE_HEALTH_PORT
STATS_PORT = CAPTURE_STATS_PORT
RESERVED_PORTS = (ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, HEALTH_PORT, STATS_PORT)
"""Ports the sidecar binds in the pod's network namespace: an app may not use them."""

LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")

# A Kubernetes resource quantity (apimachinery's resource.Quantity), e.g. 100m, 1.5, 128Mi.
QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
_IMAGE = re.compile(r"^[a-z0-9][a-zA-Z0-9._/:@-]*$")


@dataclass(frozen=True)
class InjectConfig:
    """The sidecar every injected pod gets; field names follow the flags (``--proxy-image``
    ...) and the serve settings (``inject_proxy_image`` ...)."""

    proxy_image: str = "envoyproxy/envoy:v1.40-latest"
    init_image: str = "controlplane:latest"
    """The control plane's own image: its init container runs ``controlplane capture``."""
    xds_address: str = "controlplane.controlplane-system.svc:18000"
    """The Service of deploy/kubernetes/ (controlplane.deploy.SERVICE_ADDRESS)."""
    proxy_uid: int = 1337
    proxy_cpu: str = "100m"
    proxy_memory: str = "128Mi"
    proxy_memory_limit: str = "512Mi"
    delta: bool = False
    log_level: str = "warning"
    """Envoy's log level (``--log-level`` of the sidecar)."""
    xds_ca: str | None = None
    """The mesh CA's trust bundle (PEM). Set: sidecars reach xDS over TLS, verifying the
    server against it, and authenticate with their projected ServiceAccount token."""

    def check(self) -> InjectConfig:
        """Raise ValueError naming the field (as its ``--flag``) when a value is unusable;
        return self so a caller can check where it builds."""
        for name in ("proxy_image", "init_image"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _IMAGE.match(value):
                raise ValueError(f"--{_flag(name)} must be an image reference such as "
                                 f"envoyproxy/envoy:v1.40-latest, got {value!r}")
        parse_host_port(self.xds_address, "--xds-address")
        if isinstance(self.proxy_uid, bool) or not isinstance(self.proxy_uid, int) or not (
                0 < self.proxy_uid < 2**31):
            raise ValueError(f"--proxy-uid must be a user id above 0 (capture leaves this "
                             f"user's traffic alone), got {self.proxy_uid!r}")
        for name in ("proxy_cpu", "proxy_memory", "proxy_memory_limit"):
            value = getattr(self, name)
            if not isinstance(value, str) or not QUANTITY.match(value):
                raise ValueError(f"--{_flag(name)} must be a Kubernetes quantity such as "
                                 f"100m or 128Mi, got {value!r}")
        if self.xds_ca is not None:
            check_bundle(self.xds_ca)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--proxy-log-level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}")
        return self


def field_names() -> tuple[str, ...]:
    """InjectConfig's fields, for the CLI and the settings that mirror them."""
    return tuple(item.name for item in fields(InjectConfig))


def _flag(name: str) -> str:
    return name.replace("_", "-")


class InjectError(ValueError):
    """A pod injection cannot understand. ``field`` is where (``spec.containers[0].name``),
    the message says what is wrong and what to do; the webhook admits the pod unchanged
    (or denies it, when configured closed) with this message."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def under(self, prefix: str) -> InjectError:
        """The same error, its field seen from an enclosing object (a workload's
        ``spec.template``)."""
        return InjectError(f"{prefix}.{self.field}", self.reason)
