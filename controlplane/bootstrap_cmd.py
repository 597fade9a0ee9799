"""``controlplane bootstrap``: the flags, and the files the command reads and writes.

The bootstrap itself is made by the pure :mod:`controlplane.bootstrap`; this module is
its edge: it parses flags, reads the trust bundle, mints a file-mode token and writes
the output.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlplane import bootstrap as boot


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bootstrap", help="print an Envoy bootstrap for a sidecar")
    parser.add_argument("--node-id", required=True, help="unique id of this proxy")
    parser.add_argument("--service", required=True,
                        help="the service this sidecar belongs to")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--xds-address", default="127.0.0.1:18000",
                        help="the server's HOST:PORT")
    parser.add_argument("--admin-port", type=int,
                        help="Envoy's admin port (default 9901; 15000 with --capture)")
    parser.add_argument("--admin-address", default="127.0.0.1", help="Envoy's admin address")
    parser.add_argument("--egress-port", type=int, default=15001,
                        help="port of the egress listener the app calls (default 15001)")
    parser.add_argument("--inbound-port", type=int,
                        help="port of the inbound listener (default 15006 with --capture)")
    parser.add_argument("--app-port", type=int,
                        help="port the app listens on (with --inbound-port)")
    parser.add_argument("--inbound-address", default="0.0.0.0",
                        help="address the inbound listener binds (default 0.0.0.0)")
    parser.add_argument("--delta", action="store_true",
                        help="incremental xDS instead of SotW")
    parser.add_argument("--on-demand", action="store_true",
                        help="fetch a service's routes and clusters on its first call "
                        "(implies --delta)")
    parser.add_argument("--zone", help="the proxy's zone: endpoints in it are preferred, "
                        "others used when it has no healthy ones")
    parser.add_argument("--capture", action="store_true",
                        help="the pod's traffic is captured by iptables (controlplane "
                        "capture): egress 15001 and inbound 15006 take any destination; "
                        "no --app-port")
    parser.add_argument("--stats-port", type=int,
                        help="serve /stats/prometheus on this port (default 15090 with "
                        "--capture, else none)")
    parser.add_argument("--health-port", type=int,
                        help="answer /healthz/ready (the admin's /ready) on this port "
                        "(default 15021 with --capture, else none)")
    parser.add_argument("--service-account", help="the pod's ServiceAccount (node metadata)")
    parser.add_argument("--instance-ip", help="the pod's IP (node metadata)")
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    capture = bool(args.capture)

    def pick(given: int | None, captured: int | None, plain: int | None) -> int | None:
        return given if given is not None else captured if capture else plain

    try:
        text = boot.render_bootstrap(boot.BootstrapOptions(
            node_id=args.node_id, service=args.service, namespace=args.namespace,
            xds_address=args.xds_address,
            admin_port=pick(args.admin_port, boot.CAPTURE_ADMIN_PORT, 9901) or 0,
            admin_address=args.admin_address, egress_port=args.egress_port,
            inbound_port=pick(args.inbound_port, boot.CAPTURE_INBOUND_PORT, None),
            app_port=args.app_port,
            inbound_address=args.inbound_address, delta=args.delta, zone=args.zone,
            on_demand=args.on_demand, capture=capture,
            service_account=args.service_account, instance_ip=args.instance_ip,
            stats_port=pick(args.stats_port, boot.CAPTURE_STATS_PORT, None),
            health_port=pick(args.health_port, boot.CAPTURE_HEALTH_PORT, None)))
    except ValueError as exc:
        print(f"controlplane bootstrap: {exc}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0
