"""``controlplane validate`` (a mesh file, with the warnings of what it would not serve)
and ``controlplane lab`` (the local lab)."""

from __future__ import annotations

import argparse
import sys

from controlplane import logs
from controlplane.errors import ControlPlaneError, MeshError


def validate(args: argparse.Namespace) -> int:
    from controlplane.mesh.loader import load_mesh_file
    from controlplane.pipeline import check_mesh

    try:
        mesh = load_mesh_file(args.path)
        check_mesh(mesh)
    except MeshError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ControlPlaneError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 1
    from controlplane.mesh.security import security_warnings

    for warning in security_warnings(mesh):  # valid, but not doing what it seems to
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    from controlplane.mesh.attach import route_warnings

    for warning in route_warnings(mesh):  # a route (or a share of it) not served
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    from controlplane.mesh.gateway_attach import gateway_warnings

    for warning in gateway_warnings(mesh):  # a Gateway's route or listener not served
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    from controlplane.mesh.egress import shared_port_warnings

    for warning in shared_port_warnings(mesh.services):  # external tcp ports not routed
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    count = len(mesh.services)
    print(f"{args.path}: ok, {count} service{'s' if count != 1 else ''}")
    return 0


def lab(args: argparse.Namespace) -> int:
    from controlplane.lab import LabError, run_lab

    logs.configure(args.log_level, "console")
    try:
        return int(run_lab(duration=args.duration, mesh_path=args.mesh,
                           headless=True if args.headless else None, scenario=args.scenario,
                           explicit=args.explicit))
    except (ValueError, LabError, ControlPlaneError) as exc:
        print(f"controlplane lab: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no port left, no envoy binary
        print(f"controlplane lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
