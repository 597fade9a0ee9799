"""The ``controlplane`` command: serve, bootstrap, validate, lab, status, capture, inject,
ca, certs.

The parser is built from light flag modules (argparse and constants only); a command's
own modules (gRPC, protobuf, pydantic, the Kubernetes client, cryptography) are imported
when it runs, so ``capture`` in an init container or the ``certs`` agent beside every
proxyless app load only what they use.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from controlplane import bootstrap_flags
from controlplane.cli import local_flags, serve_flags
from controlplane.inject import capture_flags, inject_flags
from controlplane.security import ca_flags, certs_flags
from controlplane.status import status_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlplane",
        description="An xDS control plane for Envoy sidecars, driven by a mesh file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_flags.add_parser(commands)
    bootstrap_flags.add_parser(commands)
    local_flags.add_parsers(commands)
    status_flags.add_parser(commands)
    capture_flags.add_parser(commands)
    inject_flags.add_parser(commands)
    ca_flags.add_parser(commands, kube=_kube_client)
    certs_flags.add_parser(commands)
    return parser


def _kube_client(kubeconfig: Any) -> Any:
    from controlplane.sources.kubernetes import api_client

    return api_client(kubeconfig, pool_size=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code

