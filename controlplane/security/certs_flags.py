"""``controlplane certs``: its flags, light to import (the command's modules load
only when it runs)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "certs", help="fetch a proxyless gRPC client's mesh certificate into files (and "
        "keep it current)",
        description="Opens an xDS stream as the gRPC client of --bootstrap (its node, its "
        "token), asks for its own certificate and the mesh roots over SDS, and writes "
        "them where the bootstrap's file_watcher certificate provider reads them (made by "
        "`controlplane bootstrap --grpc --cert-dir DIR`). Runs beside the app and writes "
        "again on every rotation; --once writes the first set and exits (an init step).")
    parser.add_argument("--bootstrap", metavar="FILE",
                        default=os.environ.get("GRPC_XDS_BOOTSTRAP"),
                        help="the client's gRPC bootstrap (default: $GRPC_XDS_BOOTSTRAP)")
    parser.add_argument("--once", action="store_true",
                        help="exit 0 once the first certificate is written")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="exit 1 unless the first certificate comes within this long "
                        "(default 60)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="json", choices=["json", "console"])
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Import the command only now: parsing the flags must stay light."""
    from controlplane.security.certs_cmd import run

    code: int = run(args)
    return code
