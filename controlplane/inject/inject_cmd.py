"""``controlplane inject -f FILE [-o OUT]``: a manifest with sidecars, made offline."""

from __future__ import annotations

import argparse
import sys

from controlplane.inject.config import InjectConfig


def run(args: argparse.Namespace) -> int:
    from controlplane.inject.offline import ManifestError, inject_manifest

    try:
        bundle = _read_bundle(args.xds_ca) if args.xds_ca else None
        config = InjectConfig(
            proxy_image=args.proxy_image, init_image=args.init_image,
            xds_address=args.xds_address, proxy_uid=args.proxy_uid,
            proxy_cpu=args.proxy_cpu, proxy_memory=args.proxy_memory,
            proxy_memory_limit=args.proxy_memory_limit, delta=args.delta,
            log_level=args.proxy_log_level, xds_ca=bundle).check()
    except ValueError as exc:
        print(f"controlplane inject: {exc}", file=sys.stderr)
        return 2
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        print(f"controlplane inject: cannot read {args.filename}: {exc.strerror}",
              file=sys.stderr)
        return 1
    try:
        output, outcomes = inject_manifest(text, config, namespace=args.namespace,
                                           source=args.filename)
    except ManifestError as exc:
        print(f"controlplane inject: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(output)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(output)
    for outcome in outcomes:
        verb = "injected" if outcome.injected else "left alone"
        print(f"controlplane inject: {outcome.what}: {verb} ({outcome.reason})",
              file=sys.stderr)
    return 0


def _read_bundle(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise ValueError(f"--xds-ca: cannot read {path}: {exc.strerror}") from exc
