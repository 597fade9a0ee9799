"""``controlplane inject -f FILE [-o OUT]``: a manifest with sidecars, made offline."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlplane.inject.config import InjectConfig

_DEFAULTS = InjectConfig()


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
    from controlplane.inject.offline import ManifestError, inject_manifest

    try:
        bundle = _read_bundle(args.xds_ca) if args.xds_ca else None
        config = InjectConfig(
            proxy_image=args.proxy_image, init_image=args.init_image,
            xds_address=args.xds_address, proxy_uid=args.proxy_uid,
            proxy_cpu=args.proxy_cpu, proxy_memory=args.proxy_memory,
            proxy_memory_limit=args.proxy_memory_limit, delta=args.delta,
            log_level=args.proxy_log_level, xds_ca=bundle).check()
    except ValueError as exc:
        print(f"controlplane inject: {exc}", file=sys.stderr)
        return 2
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        print(f"controlplane inject: cannot read {args.filename}: {exc.strerror}",
              file=sys.stderr)
        return 1
    try:
        output, outcomes = inject_manifest(text, config, namespace=args.namespace,
                                           source=args.filename)
    except ManifestError as exc:
        print(f"controlplane inject: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(output)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(output)
    for outcome in outcomes:
        verb = "injected" if outcome.injected else "left alone"
        print(f"controlplane inject: {outcome.what}: {verb} ({outcome.reason})",
              file=sys.stderr)
    return 0


def _read_bundle(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise ValueError(f"--xds-ca: cannot read {path}: {exc.strerror}") from exc
