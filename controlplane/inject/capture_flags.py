"""``controlplane capture``: its flags, light to import (the command's modules load
only when it runs)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    capture = commands.add_parser(
        "capture", help="install the pod's traffic capture rules (iptables)",
        description="Redirect the pod's TCP to its sidecar with iptables (nat table, chains "
        "CONTROLPLANE_*): outbound to --outbound-port, inbound to --inbound-port; the "
        "proxy's own traffic (--proxy-uid), loopback and the exclusions are left alone. "
        "Safe to re-run; --clean removes exactly what it added. Needs NET_ADMIN.")
    capture.add_argument("--proxy-uid", type=int, default=1337,
                         help="the sidecar's UID, whose traffic is not captured (default 1337)")
    capture.add_argument("--proxy-gid", type=int,
                         help="the sidecar's GID, likewise (default: the same as --proxy-uid)")
    capture.add_argument("--outbound-port", type=int, default=15001,
                         help="where outbound TCP goes (default 15001)")
    capture.add_argument("--inbound-port", type=int, default=15006,
                         help="where inbound TCP goes (default 15006)")
    capture.add_argument("--include-inbound-ports", default="*", metavar="PORTS",
                         help="inbound ports captured: * (default) every port, a comma list, "
                         "or '' for none")
    capture.add_argument("--exclude-inbound-ports", default="", metavar="PORTS",
                         help="inbound ports left alone (comma list); 15000, 15001, 15006, "
                         "15021 and 15090 always are")
    capture.add_argument("--exclude-outbound-ports", default="", metavar="PORTS",
                         help="destination ports left alone (comma list)")
    capture.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS",
                         help="destination networks left alone (comma list)")
    capture.add_argument("--include-outbound-cidrs", default="*", metavar="CIDRS",
                         help="destinations captured: * (default) all, a comma list of "
                         "CIDRs, or '' for none")
    capture.add_argument("--exclude-address", action="append", default=[],
                         metavar="HOST:PORT", help="a destination left alone, e.g. the "
                         "control plane's xDS address (repeatable; names are resolved now)")
    capture.add_argument("--ipv6", action="store_true", help="program ip6tables too")
    capture.add_argument("--clean", action="store_true",
                         help="remove the rules and chains capture added, and nothing else")
    capture.add_argument("--dry-run", action="store_true",
                         help="print the rules it would install (or, with --clean, remove); "
                         "change nothing")
    capture.add_argument("--log-level", default="info",
                         choices=["debug", "info", "warning", "error"])
    capture.add_argument("--log-format", default="json", choices=["json", "console"])
    capture.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Import the command only now: parsing the flags must stay light."""
    from controlplane.inject.capture_cmd import run

    code: int = run(args)
    return code
