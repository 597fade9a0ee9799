"""``controlplane ca``: its flags, light to import (the CA and cryptography load only
when an action runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from controlplane.security.identity import DEFAULT_TRUST_DOMAIN

DEFAULT_NAMESPACE: Final = "controlplane-system"  # deploy.NAMESPACE (not imported: layers)
CA_SECRET: Final = "controlplane-ca"  # castore.CA_SECRET (not imported: cryptography)
ROOT_DAYS: Final = 3650  # ca.ROOT_DAYS (likewise; a test keeps them equal)
ApiClientFactory = Callable[[Path | None], Any]


def add_parser(commands: Any, kube: ApiClientFactory | None = None) -> None:
    """``commands``: the subparsers of ``controlplane``; ``kube(kubeconfig)`` makes a
    Kubernetes API client (for ``--secret``)."""
    ca = commands.add_parser(
        "ca", help="the mesh CA: init, rotate, prune, show",
        description="The mesh CA that issues every workload's certificate, kept in a "
        "directory (--ca-dir) or a Kubernetes Secret (--secret). Rotating the root is "
        "`ca rotate`, then, one workload certificate lifetime later (24h by default), "
        "`ca prune`.")
    actions = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    helps = {
        "init": "make a new CA (refused when one is there)",
        "rotate": "a new root signs from now on; the old roots stay trusted until pruned",
        "prune": "drop the roots the signer does not chain to (after a rotation)",
        "show": "the signer and the trusted roots: names, fingerprints, dates (no key)",
    }
    for name, text in helps.items():
        action = actions.add_parser(name, help=text, description=text)
        where = action.add_mutually_exclusive_group(required=True)
        where.add_argument("--ca-dir", type=Path, metavar="DIR",
                           help="the CA directory (ca.crt, ca.key, roots.pem)")
        where.add_argument("--secret", metavar="NAME", nargs="?", const=CA_SECRET,
                           help=f"the Kubernetes Secret (default {CA_SECRET})")
        action.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                            help=f"the Secret's namespace (default {DEFAULT_NAMESPACE})")
        action.add_argument("--kubeconfig", type=Path, help="for --secret (default: "
                            "in a pod its service account, else KUBECONFIG or ~/.kube/config)")
        if name in ("init", "rotate"):
            action.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                                help=f"named in the root (default {DEFAULT_TRUST_DOMAIN})")
            action.add_argument("--days", type=int, default=ROOT_DAYS,
                                help=f"the new root's lifetime (default {ROOT_DAYS})")
        if name == "show":
            action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(run=_run, kube=kube)


def _run(args: argparse.Namespace) -> int:
    """Import the command only now: parsing the flags must stay light."""
    from controlplane.security.ca_cmd import run

    code: int = run(args)
    return code
