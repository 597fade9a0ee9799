"""``controlplane inject``: its flags, light to import (the injector and YAML load only
when it runs)."""

from __future__ import annotations

import argparse
from typing import Any


class _DEFAULTS:
    """InjectConfig's defaults, copied so that parsing any command's flags does not load
    the bootstrap and YAML (a test keeps them equal to ``InjectConfig()``)."""

    proxy_image = "envoyproxy/envoy:v1.40-latest"
    init_image = "controlplane:latest"
    xds_address = "controlplane.controlplane-system.svc:18000"
    proxy_uid = 1337
    proxy_cpu = "100m"
    proxy_memory = "128Mi"
    proxy_memory_limit = "512Mi"
    log_level = "warning"


def add_parser(commands: Any) -> None:
    inject = commands.add_parser(
        "inject", help="add the sidecar to the pods of a manifest (offline)",
        description="Inject the sidecar into every Pod, Deployment, StatefulSet, DaemonSet, "
        "ReplicaSet, Job and CronJob of a manifest, as the webhook would; other objects "
        "pass through unchanged. Pods labelled mesh.controlplane.io/inject: \"false\" "
        "are left alone. Pods annotated mesh.controlplane.io/proxyless: grpc get no Envoy "
        "and no capture but the gRPC bootstrap (and with --xds-ca their certificates and "
        "the agent that renews them).")
    inject.add_argument("-f", "--filename", required=True, metavar="FILE",
                        help="the manifest (multi-document YAML); - reads stdin")
    inject.add_argument("-o", "--output", metavar="OUT", default="-",
                        help="where to write the result (default -: stdout)")
    inject.add_argument("-n", "--namespace", default="default",
                        help="namespace of objects that name none (default: default)")
    inject.add_argument("--proxy-image", default=_DEFAULTS.proxy_image,
                        help=f"the sidecar's Envoy image (default {_DEFAULTS.proxy_image})")
    inject.add_argument("--init-image", default=_DEFAULTS.init_image,
                        help="the image whose `controlplane capture` programs the pod's "
                        "capture; proxyless pods run its `controlplane bootstrap` and "
                        f"`controlplane certs` (default {_DEFAULTS.init_image})")
    inject.add_argument("--xds-address", default=_DEFAULTS.xds_address,
                        help=f"the control plane's xDS HOST:PORT (default "
                        f"{_DEFAULTS.xds_address})")
    inject.add_argument("--proxy-uid", type=int, default=_DEFAULTS.proxy_uid,
                        help=f"the sidecar's user id (default {_DEFAULTS.proxy_uid})")
    inject.add_argument("--proxy-cpu", default=_DEFAULTS.proxy_cpu,
                        help=f"the sidecar's CPU request (default {_DEFAULTS.proxy_cpu})")
    inject.add_argument("--proxy-memory", default=_DEFAULTS.proxy_memory,
                        help=f"its memory request (default {_DEFAULTS.proxy_memory})")
    inject.add_argument("--proxy-memory-limit", default=_DEFAULTS.proxy_memory_limit,
                        help=f"its memory limit (default {_DEFAULTS.proxy_memory_limit})")
    inject.add_argument("--delta", action="store_true",
                        help="sidecars use incremental (delta) xDS")
    inject.add_argument("--proxy-log-level", default=_DEFAULTS.log_level,
                        help=f"Envoy's log level (default {_DEFAULTS.log_level})")
    inject.add_argument("--xds-ca", metavar="FILE",
                        help="the mesh CA's trust bundle (PEM; `serve --ca-dir`'s roots.pem, "
                        "or the ca.crt of the controlplane-ca Secret): sidecars reach xDS "
                        "over TLS and authenticate with a projected ServiceAccount token")
    inject.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Import the command only now: parsing the flags must stay light."""
    from controlplane.inject.inject_cmd import run

    code: int = run(args)
    return code
