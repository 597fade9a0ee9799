"""``controlplane validate`` and ``controlplane lab``: their flags, light to import (the
mesh model and the lab load only when they run)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(commands: Any) -> None:
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


def _validate(args: argparse.Namespace) -> int:
    from controlplane.cli.local_cmd import validate

    return validate(args)


def _lab(args: argparse.Namespace) -> int:
    from controlplane.cli.local_cmd import lab

    return lab(args)
