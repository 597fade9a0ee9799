"""``controlplane capture``: install (or ``--clean``) the pod's traffic capture rules."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(commands: Any) -> None:
    capture = commands.add_parser("capture", help="install the pod's traffic capture rules")
    capture.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    print("controlplane capture: not built yet", file=sys.stderr)
    return 2
