"""The ``controlplane`` command: serve, bootstrap, validate, lab, capture, inject, ca."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from controlplane import bootstrap_cmd, logs
from controlplane.errors import ControlPlaneError, MeshError
from controlplane.inject import capture_cmd, inject_cmd
from controlplane.security import ca_cmd, certs_cmd
from controlplane.status import status_cmd


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from controlplane.app import serve
    from controlplane.settings import ServeSettings

    given: dict[str, Any] = {
        key: value
        for key, value in {
            "source": args.source,
            "xds_address": args.xds_address,
            "admin_address": args.admin_address,
            "kubeconfig": args.kubeconfig,
            "namespace": args.namespace,
            "pod_labels": False if args.no_pod_labels else None,
            "snapshot_dir": args.snapshot_dir,
            "snapshot_keep": args.snapshot_keep,
            "group_ttl": args.group_ttl,
            "convergence_warn_after": args.convergence_warn_after,
            "shutdown_grace": args.shutdown_grace,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "max_large_writes": args.max_large_writes,
            "large_write_bytes": args.large_write_bytes,
            "large_write_turn_seconds": args.large_write_turn_seconds,
            "outbound_traffic_policy": args.outbound_traffic_policy,
            "webhook_address": args.webhook_address,
            "webhook_cert": args.webhook_cert,
            "webhook_key": args.webhook_key,
            "webhook_ca": args.webhook_ca,
            "webhook_namespace": args.webhook_namespace,
            "inject_failure_policy": args.inject_failure_policy,
            "inject_proxy_image": args.inject_proxy_image,
            "inject_init_image": args.inject_init_image,
            "inject_xds_address": args.inject_xds_address,
            "ca_dir": args.ca_dir,
            "ca_cert": args.ca_cert,
            "ca_key": args.ca_key,
            "ca_bundle": args.ca_bundle,
            "ca_secret": args.ca_secret,
            "trust_domain": args.trust_domain,
            "workload_cert_ttl": args.workload_cert_ttl,
            "authentication": args.authentication,
            "xds_server_name": args.xds_server_name,
            "status_namespace": args.status_namespace,
            "max_connection_age": args.max_connection_age,
            "max_connection_age_grace": args.max_connection_age_grace,
        }.items()
        if value is not None
    }
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            field = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"controlplane serve: {field}: {err['msg']}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ControlPlaneError, ValueError, OSError) as exc:
        print(f"controlplane serve: {_bind_error(exc, settings) or exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        told = _bind_error(exc, settings)
        if told is None:
            raise
        print(f"controlplane serve: {told}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _bind_error(exc: BaseException, settings: Any) -> str | None:
    """One line for a listen address that is taken or not ours, naming the flag to
    change; None for any other error."""
    text = str(exc)
    if text.startswith("Failed to bind"):
        address, flag = settings.xds_address, "--xds-address"
    elif isinstance(exc, OSError) and "bind" in text:
        address, flag = settings.admin_address, "--admin-address"
    else:
        return None
    return (f"cannot listen on {address} ({flag}): the port is in use or the address is "
            f"not this machine's; stop what uses it, or choose another with {flag}")


def _validate(args: argparse.Namespace) -> int:
    from controlplane.mesh.loader import load_mesh_file
    from controlplane.pipeline import check_mesh

    try:
        mesh = load_mesh_file(args.path)
        check_mesh(mesh)
    except MeshError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ControlPlaneError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 1
    from controlplane.mesh.security import security_warnings

    for warning in security_warnings(mesh):  # valid, but not doing what it seems to
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    from controlplane.mesh.attach import route_warnings

    for warning in route_warnings(mesh):  # a route (or a share of it) not served
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    from controlplane.mesh.gateway_attach import gateway_warnings

    for warning in gateway_warnings(mesh):  # a Gateway's route or listener not served
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    from controlplane.mesh.egress import shared_port_warnings

    for warning in shared_port_warnings(mesh.services):  # external tcp ports not routed
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    count = len(mesh.services)
    print(f"{args.path}: ok, {count} service{'s' if count != 1 else ''}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    from controlplane.lab import LabError, run_lab

    logs.configure(args.log_level, "console")
    try:
        return int(run_lab(duration=args.duration, mesh_path=args.mesh,
                           headless=True if args.headless else None, scenario=args.scenario,
                           explicit=args.explicit))
    except (ValueError, LabError, ControlPlaneError) as exc:
        print(f"controlplane lab: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no port left, no envoy binary
        print(f"controlplane lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlplane",
        description="An xDS control plane for Envoy sidecars, driven by a mesh file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve xDS from a mesh source")
    serve.add_argument("--source", help="file:PATH or kubernetes [env CONTROLPLANE_SOURCE]")
    serve.add_argument("--xds-address", help="gRPC listen HOST:PORT (default 0.0.0.0:18000)")
    serve.add_argument("--admin-address", help="admin HTTP HOST:PORT (default 127.0.0.1:19000)")
    serve.add_argument("--kubeconfig", help="kubeconfig for --source kubernetes")
    serve.add_argument("--namespace", action="append",
                       help="namespace to watch (repeatable; default all)")
    serve.add_argument("--no-pod-labels", action="store_true",
                       help="do not watch Pod metadata; TrafficPolicies with label subsets "
                       "are then refused [env CONTROLPLANE_POD_LABELS=false]")
    serve.add_argument("--snapshot-dir", help="where published snapshots go (default snapshots/)")
    serve.add_argument("--snapshot-keep", type=int,
                       help="snapshots kept per group (default 10; 0 turns the store off)")
    serve.add_argument("--group-ttl", type=float,
                       help="seconds a proxy group is kept with no proxy connected (default 60)")
    serve.add_argument("--convergence-warn-after", type=float,
                       help="seconds a mesh change may take to reach every proxy it affects "
                       "before a warning names the laggards (default 30)")
    serve.add_argument("--shutdown-grace", type=float,
                       help="seconds streams get to finish on SIGTERM (default 5)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["json", "console"])
    serve.add_argument("--max-large-writes", type=int, help="large xDS responses written at "
                       "once over every stream (default 16; 0: no bound); small updates "
                       "never wait")
    serve.add_argument("--large-write-bytes", type=int,
                       help="from this size on a response is large (default 65536)")
    serve.add_argument("--large-write-turn-seconds", type=float,
                       help="how long a large write keeps its turn (default 1)")
    serve.add_argument("--outbound-traffic-policy", choices=["ALLOW_ANY", "REGISTRY_ONLY"],
                       help="Kubernetes: what captured sidecars do with a destination outside "
                       "the mesh: pass it through (default) or refuse it")
    hook = serve.add_argument_group("sidecar injection webhook (env CONTROLPLANE_WEBHOOK_*, "
                                    "CONTROLPLANE_INJECT_*)")
    hook.add_argument("--webhook-address", metavar="HOST:PORT|off",
                      help="HTTPS address of the injection webhook (default 0.0.0.0:15017 "
                      "when running in a pod with --source kubernetes, else off)")
    hook.add_argument("--webhook-cert", help="PEM serving certificate (e.g. cert-manager's); "
                      "without it the control plane makes and keeps its own")
    hook.add_argument("--webhook-key", help="PEM key of --webhook-cert")
    hook.add_argument("--webhook-ca", help="PEM CA of --webhook-cert, written into caBundle")
    hook.add_argument("--webhook-namespace",
                      help="the control plane's namespace (its Secret and Service live there)")
    hook.add_argument("--inject-failure-policy", choices=["open", "closed"],
                      help="a pod the webhook cannot understand: admitted without a sidecar "
                      "(open, the default) or refused with the reason (closed)")
    hook.add_argument("--inject-proxy-image", help="the sidecar's Envoy image")
    hook.add_argument("--inject-init-image",
                      help="the image whose `controlplane capture` programs the pod's capture")
    hook.add_argument("--inject-xds-address", help="HOST:PORT injected sidecars dial")
    trust = serve.add_argument_group("identity and zero trust (env CONTROLPLANE_CA_*, ...): "
                                     "with a CA, xDS is TLS and proxies authenticate")
    trust.add_argument("--ca-dir", help="run the mesh CA from this directory (made on "
                       "first start: ca.crt, ca.key, roots.pem)")
    trust.add_argument("--ca-cert", help="bring your own CA: PEM certificate (with --ca-key)")
    trust.add_argument("--ca-key", help="PEM key of --ca-cert")
    trust.add_argument("--ca-bundle", help="PEM trust bundle for --ca-cert (default: its roots)")
    trust.add_argument("--ca-secret", help="Kubernetes: the CA's Secret in the control "
                       "plane's namespace (default controlplane-ca)")
    trust.add_argument("--trust-domain", help="SPIFFE trust domain (default cluster.local)")
    trust.add_argument("--workload-cert-ttl", metavar="DURATION",
                       help="workload certificate lifetime (default 24h; renewed at half)")
    trust.add_argument("--authentication", choices=["token", "none"],
                       help="token (default with a CA): proxies present a token; none: "
                       "trust the node's claim, plaintext xDS (development only)")
    trust.add_argument("--xds-server-name", action="append", metavar="NAME",
                       help="another DNS name or IP for the xDS TLS certificate (repeatable)")
    fleet = serve.add_argument_group("status and rebalancing (env CONTROLPLANE_STATUS_*, "
                                     "CONTROLPLANE_MAX_CONNECTION_AGE*)")
    fleet.add_argument("--status-namespace", help="with token authentication, only tokens "
                       "of this namespace may read the client status (CSDS; default: "
                       "the control plane's own, --webhook-namespace)")
    fleet.add_argument("--max-connection-age", type=float, metavar="SECONDS",
                       help="ask proxies to reconnect after this long (+/-10%%), so they "
                       "spread over the replicas again (default 1800; 0: never)")
    fleet.add_argument("--max-connection-age-grace", type=float, metavar="SECONDS",
                       help="how long an aged connection's streams may go on (default 10)")
    serve.set_defaults(run=_serve)

    bootstrap_cmd.add_parser(commands)

    validate = commands.add_parser("validate", help="check a mesh file")
    validate.add_argument("path")
    validate.set_defaults(run=_validate)

    lab = commands.add_parser("lab", help="run the local lab: server, demo services, sidecars")
    lab.add_argument("--mesh", metavar="FILE",
                     help="mesh file to start from (default: the embedded lab mesh). It needs "
                     "a service `frontend` with an endpoint (the traffic generator calls it), "
                     "and single-port services (each endpoint becomes a demo app and its "
                     "sidecar); frontend's app calls `reviews`, reviews' app calls `ratings`")
    lab.add_argument("--duration", type=float, default=0.0,
                     help="stop after this many seconds (default: run until Ctrl-C)")
    lab.add_argument("--headless", action="store_true",
                     help="print the view as one line a second instead of a live table "
                     "(the default when the output is not a terminal)")
    lab.add_argument("--scenario", choices=["canary", "fault", "circuit-breaker",
                                            "endpoint-gone"],
                     help="run a scenario against the live lab (it edits the lab's mesh file)")
    lab.add_argument("--explicit", action="store_true",
                     help="no network namespaces or capture: apps on loopback call their "
                     "sidecar's egress port with a Host header (the mode without root)")
    lab.add_argument("--log-level", default="warning",
                     choices=["debug", "info", "warning", "error"])
    lab.set_defaults(run=_lab)

    status_cmd.add_parser(commands)
    capture_cmd.add_parser(commands)
    inject_cmd.add_parser(commands)
    ca_cmd.add_parser(commands, kube=_kube_client)
    certs_cmd.add_parser(commands)
    return parser


def _kube_client(kubeconfig: Any) -> Any:
    from controlplane.sources.kubernetes import api_client

    return api_client(kubeconfig, pool_size=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
