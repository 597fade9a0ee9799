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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controlplane import logs
from controlplane.security import castore
from controlplane.security.ca import CaProblem, CertificateAuthority
from controlplane.security.ca_flags import ApiClientFactory, add_parser
from controlplane.security.castore import CaError
from controlplane.security.identity import DEFAULT_TRUST_DOMAIN


def build_parser(kube: ApiClientFactory | None = None) -> argparse.ArgumentParser:
    """``controlplane ca`` alone (tests; ``controlplane.cli`` adds it with
    ``ca_flags.add_parser``)."""
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
