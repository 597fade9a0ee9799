"""``controlplane ca {init,rotate,prune,show}``: the mesh CA by hand, in a directory
(``--ca-dir``, file mode and the lab) or in the Kubernetes Secret the servers share
(``--secret``, cert-manager's format).

A root rotation is two steps, with time between them: ``rotate`` makes a new root that
signs from then on and keeps the old ones in the trust bundle (running servers pick it up
within their poll, 30 s, and reissue every sidecar's certificate); ``prune``, once every
sidecar has its new certificate (one workload certificate lifetime, 24 h by default),
drops the old roots. Nothing here prints a private key.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from controlplane import logs
from controlplane.security import castore
from controlplane.security.ca import ROOT_DAYS, CaProblem, CertificateAuthority
from controlplane.security.castore import CaError
from controlplane.security.identity import DEFAULT_TRUST_DOMAIN

DEFAULT_NAMESPACE: Final = "controlplane-system"  # deploy.NAMESPACE (not imported: layers)
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
        where.add_argument("--secret", metavar="NAME", nargs="?", const=castore.CA_SECRET,
                           help=f"the Kubernetes Secret (default {castore.CA_SECRET})")
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
        action.set_defaults(run=run, kube=kube)


def build_parser(kube: ApiClientFactory | None = None) -> argparse.ArgumentParser:
    """``controlplane ca`` alone (tests; ``cli.py`` adds it with ``add_parser``)."""
    parser = argparse.ArgumentParser(prog="controlplane")
    add_parser(parser.add_subparsers(dest="command", required=True), kube)
    return parser


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _core(args: argparse.Namespace) -> Any:
    if args.kube is None:
        raise CaError("--secret needs the Kubernetes client; use --ca-dir")
    from kubernetes import client
    return client.CoreV1Api(args.kube(args.kubeconfig))


def _do(args: argparse.Namespace, now: datetime.datetime) -> tuple[CertificateAuthority, str]:
    """Carry out the action; the CA after it and a line saying what happened."""
    action = args.ca_command
    if args.ca_dir is not None:
        folder: Path = args.ca_dir
        where = f"the directory {folder}"
        if action == "init":
            if (folder / castore.CERT_FILE).exists() or (folder / castore.KEY_FILE).exists():
                raise CaError(f"{where} already holds a CA: see it with `controlplane ca show "
                              f"--ca-dir {folder}`, replace its root with `ca rotate`")
            return castore.load_dir(folder, args.trust_domain, now), f"made a CA in {where}"
        if action == "rotate":
            return (castore.rotate_dir(folder, args.trust_domain, now, args.days),
                    f"rotated the root of {where}")
        if action == "prune":
            return castore.prune_dir(folder), f"pruned the trust bundle of {where}"
        return castore.load_dir(folder, DEFAULT_TRUST_DOMAIN, now, create=False), where
    core, namespace, name = _core(args), args.namespace, args.secret
    where = f"Secret {namespace}/{name}"
    if action == "init":
        try:
            castore.load_secret(core, namespace, name, create=False)
        except CaError as exc:
            if "there is no" not in str(exc):
                raise
        else:
            raise CaError(f"{where} already holds a CA: see it with `controlplane ca show "
                          f"--secret {name}`, replace its root with `ca rotate`")
        return (castore.load_secret(core, namespace, name, trust_domain=args.trust_domain,
                                    now=now), f"made a CA in {where}")
    if action == "rotate":
        return (castore.rotate_secret(core, namespace, name, args.trust_domain, now,
                                      args.days), f"rotated the root of {where}")
    if action == "prune":
        return castore.prune_secret(core, namespace, name), f"pruned the trust bundle of {where}"
    return castore.load_secret(core, namespace, name, create=False), where


def _next_step(action: str) -> str:
    return {
        "init": "serve it with `controlplane serve --ca-dir DIR` (Kubernetes: the server "
                "uses the Secret by itself)",
        "rotate": "running servers take the new root within 30 s and reissue every "
                  "sidecar's certificate; the old root stays trusted until `controlplane ca "
                  "prune`: run it once every sidecar has its new certificate (one "
                  "--workload-cert-ttl, 24h by default)",
        "prune": "certificates and tokens signed under a dropped root are no longer "
                 "trusted; sidecars still holding one get a new certificate from the server",
    }.get(action, "")


def render(ca: CertificateAuthority, where: str) -> str:
    """What ``show`` prints: the description only (no key can be in it)."""
    described = ca.describe()
    lines = [f"CA of {where}", "signer:"]
    lines += [f"  {k}: {v}" for k, v in described["signer"].items()]
    lines.append(f"trusted roots ({len(described['roots'])}):")
    for root in described["roots"]:
        lines.append(f"  - subject: {root['subject']}")
        lines += [f"    {k}: {v}" for k, v in root.items() if k != "subject"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, now: datetime.datetime | None = None) -> int:
    logs.configure("warning", "console")
    try:
        ca, said = _do(args, now or _now())
    except (CaError, CaProblem) as exc:
        print(f"controlplane ca {args.ca_command}: {exc}", file=sys.stderr)
        return 1
    if args.ca_command == "show":
        if args.json:
            sys.stdout.write(json.dumps({"where": said, **ca.describe()}, indent=2) + "\n")
        else:
            sys.stdout.write(render(ca, said))
        return 0
    sys.stdout.write(f"{said}\n{render(ca, said)}{_next_step(args.ca_command)}\n")
    return 0


def main(argv: Sequence[str] | None = None, kube: ApiClientFactory | None = None) -> int:
    args = build_parser(kube).parse_args(argv)
    code: int = args.run(args)
    return code
