"""``controlplane bootstrap``: its flags, light to import (the command's modules load
only when it runs)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bootstrap", help="print an Envoy bootstrap for a sidecar")
    parser.add_argument("--node-id", required=True, help="unique id of this proxy")
    parser.add_argument("--service",
                        help="the service this sidecar belongs to (required, but with "
                        "--gateway)")
    parser.add_argument("--gateway", metavar="NAME",
                        help="an ingress gateway for the Gateway NAME in --namespace: it "
                        "serves that Gateway's listeners (bound on --inbound-address) and "
                        "nothing of a sidecar; --service defaults to NAME")
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
                        help="serve /stats/prometheus on this port, every metric labelled "
                        "with source_service and source_namespace, upstream ones with "
                        "destination_service and destination_namespace (default 15090 "
                        "with --capture, else none; needs a fixed --admin-port)")
    parser.add_argument("--health-port", type=int,
                        help="answer /healthz/ready (the admin's /ready) on this port "
                        "(default 15021 with --capture, else none)")
    parser.add_argument("--service-account", help="the pod's ServiceAccount (node metadata)")
    parser.add_argument("--instance-ip", help="the pod's IP (node metadata)")
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    parser.add_argument("--grpc", action="store_true",
                        help="print the JSON bootstrap of a proxyless gRPC client "
                        "(GRPC_XDS_BOOTSTRAP, for xds:///NAME targets) instead of Envoy's; "
                        "takes --node-id, --service, --namespace, --xds-address, --zone, "
                        "--xds-ca, --token-file, --cert-dir")
    parser.add_argument("--grpc-server", action="store_true",
                        help="with --grpc: the process also serves with grpc.server(xds=True); "
                        "the bootstrap names its server listeners (gRFC A36), which the "
                        "control plane makes for --service (mTLS and authorization as a "
                        "sidecar's inbound)")
    parser.add_argument("--cert-dir", metavar="DIR",
                        help="with --grpc: the client reads the mesh certificates from DIR "
                        "(gRPC's file_watcher provider; `controlplane certs` keeps them "
                        "current), so STRICT services are called with mTLS")
    secure = parser.add_argument_group(
        "identity (a control plane run with a CA: serve --ca-dir, or Kubernetes)")
    secure.add_argument("--xds-ca", metavar="FILE",
                        help="the control plane's trust bundle (PEM): xDS over TLS, the "
                        "server verified against it (the --xds-address host must be one "
                        "of its certificate's names)")
    secure.add_argument("--token-file", metavar="FILE",
                        help="the proxy's token, sent as `authorization: Bearer` and read "
                        "again on every new stream (needs --xds-ca). With --ca-dir: where "
                        "the minted token is written (default: beside -o, as NAME.token)")
    secure.add_argument("--ca-dir", metavar="DIR",
                        help="file mode: mint this proxy's token with the CA of `serve "
                        "--ca-dir DIR` for --service-account in --namespace, bound to "
                        "--node-id; the bundle defaults to the CA's")
    secure.add_argument("--trust-domain", default="cluster.local",
                        help="the mesh's trust domain, as the server's (default cluster.local)")
    secure.add_argument("--token-ttl", default="720h",
                        help="lifetime of a minted token (default 720h: 30 days)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Import the command only now: parsing the flags must stay light."""
    from controlplane.bootstrap_cmd import run

    code: int = run(args)
    return code
