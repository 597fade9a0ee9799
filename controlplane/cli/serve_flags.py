"""``controlplane serve``: its flags, light to import (the server loads only when it
runs)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
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
    serve.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Import the server only now: parsing the flags must stay light."""
    from controlplane.cli.serve_cmd import run

    return run(args)
