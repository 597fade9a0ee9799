"""``controlplane status``: its flags, light to import (gRPC and the CSDS protos load
only when it runs)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_SERVER = "127.0.0.1:18000"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "status", help="which proxies are connected and whether they have their config (CSDS)",
        description="Every connected proxy, per type SYNCED / STALE / NACKED / NOT SENT, "
        "read through the client status service (CSDS) of one or more replicas.")
    parser.add_argument("--server", action="append", metavar="HOST:PORT",
                        help=f"a replica's xDS address (repeatable: one per replica; "
                        f"default {DEFAULT_SERVER})")
    parser.add_argument("--ca", metavar="FILE", help="speak TLS to the xDS port, verified "
                        "with this bundle (the mesh CA's roots.pem)")
    parser.add_argument("--server-name", metavar="NAME",
                        help="the name to verify in the server's certificate (default: the "
                        "host of --server)")
    parser.add_argument("--token-file", metavar="FILE", help="a token of the control "
                        "plane's namespace, for a server with --authentication token")
    parser.add_argument("--output", "-o", choices=["table", "json"], default="table")
    parser.add_argument("--node", metavar="ID", help="one proxy: per type, what the server "
                        "serves against what the proxy last ACKed, and any NACK error")
    parser.add_argument("--wait", action="store_true",
                        help="poll until every proxy has ACKed the current version of every "
                        "type (exit 0), or exit 1 after --timeout naming the laggards")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long --wait waits (default 60)")
    parser.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for each replica's connection (default 5)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Import the command only now: parsing the flags must stay light."""
    from controlplane.status.status_cmd import run

    code: int = run(args)
    return code
