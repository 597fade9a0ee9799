#!/usr/bin/env python3
"""CLI startup: how long the ``controlplane`` command takes to start and how much memory
it peaks at, per command (session 21, H10).

Why it matters: ``controlplane capture`` runs in every injected pod's init container
(memory limit 128Mi), ``controlplane certs`` runs beside every proxyless gRPC app for
its whole life, and ``controlplane bootstrap`` runs once per proxyless pod. Each case
runs ``python -m controlplane ARGS`` as a fresh process (``--runs`` times, after one
warm-up that fills the OS page cache) and reports the wall time (median and min) and
the peak resident set (``ru_maxrss`` of that one child, read by GNU time), plus which
heavy libraries the command loaded (``-X importtime``'s list, one extra run).

    .venv/bin/python bench/cli_startup.py [--runs 10] [--tree PATH] [--deadline 300]

``--tree PATH`` measures another checkout (e.g. a ``git worktree`` of the commit
before), so before/after come from the same interpreter and machine. Each run writes
bench/results/runs/cli_startup-<UTC time>.json; ``--update-baseline`` writes
bench/results/cli_startup.json instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import BenchError, Deadline, add_output_flags, finish

BASELINE = "cli_startup.json"
TIME = "/usr/bin/time"  # GNU time: the child's peak RSS (apt-get install time)
HEAVY = ("grpc", "google.protobuf", "envoy", "pydantic", "kubernetes", "cryptography",
         "structlog", "yaml", "asyncio", "aiohttp")
"""Libraries a light command should not pay for (reported per case)."""


def cases(scratch: Path) -> dict[str, list[str]]:
    """The commands timed; ``bootstrap --grpc (pod)`` is what a proxyless pod's init
    container runs with the mesh CA (inject/proxyless.py's bootstrap_args)."""
    out = str(scratch / "bootstrap.yaml")
    bundle, token = scratch / "roots.pem", scratch / "token"
    bundle.write_text(trust_bundle(), encoding="utf-8")
    token.write_text("a.b.c", encoding="utf-8")
    return {
        "help": ["--help"],
        "capture --help": ["capture", "--help"],
        "capture --dry-run": ["capture", "--dry-run"],
        "certs --help": ["certs", "--help"],
        "bootstrap": ["bootstrap", "--node-id", "pod-1.default", "--service", "reviews",
                      "--capture", "-o", out],
        "bootstrap --grpc": ["bootstrap", "--grpc", "--node-id", "pod-1.default",
                             "--service", "reviews", "-o", out + ".json"],
        "bootstrap --grpc (pod)": ["bootstrap", "--grpc", "--grpc-server", "--node-id",
                                   "pod-1.default", "--service", "reviews", "--xds-address",
                                   "controlplane.controlplane-system.svc:18000", "--xds-ca",
                                   str(bundle), "--token-file", str(token), "--cert-dir",
                                   str(scratch / "certs"), "-o", out + ".pod.json"],
    }


def trust_bundle() -> str:
    """A mesh CA's roots (PEM), made by this checkout's CA code in a child process: the
    bench itself stays small, since a child's ``ru_maxrss`` starts from the RSS of the
    process it was forked from."""
    code = ("import datetime; from controlplane.security.ca import CertificateAuthority as C; "
            "print(C.create('cluster.local', datetime.datetime.now(datetime.UTC))"
            ".bundle_pem.decode(), end='')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True).stdout


def run_once(argv: list[str], tree: Path, deadline: Deadline) -> tuple[float, int]:
    """One fresh process: (wall seconds, peak RSS in KiB). It must exit 0.

    The peak is read by GNU time (``%M``, the child's own ``ru_maxrss``), not by this
    process: a child forked from here starts its high-water mark at this process's RSS,
    which would hide anything smaller."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.NamedTemporaryFile(prefix="cli-startup-rss-") as rss:
        start = time.perf_counter()
        try:
            done = subprocess.run([TIME, "-f", "%M", "-o", rss.name, sys.executable, "-m",
                                   "controlplane", *argv], cwd=tree, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=deadline.left(60.0), check=False)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"controlplane {' '.join(argv)} did not exit within the "
                             "deadline") from exc
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise BenchError(f"controlplane {' '.join(argv)} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')[-500:]}")
        return wall, int(Path(rss.name).read_text(encoding="utf-8").split()[-1])


def heavy_loaded(argv: list[str], tree: Path, deadline: Deadline) -> dict[str, Any]:
    """The heavy libraries the command imported, and how many modules in all."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "controlplane", *argv],
                          cwd=tree, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=deadline.left(60.0), check=False)
    names = [line.rpartition("|")[2].strip() for line in
             done.stderr.decode(errors="replace").splitlines()
             if line.startswith("import time:") and "|" in line]
    names = [name for name in names if name and name != "package"]
    heavy = sorted(lib for lib in HEAVY
                   if any(n == lib or n.startswith(lib + ".") for n in names))
    return {"modules_imported": len(names), "heavy_libraries": heavy}


def measure(tree: Path, runs: int, deadline: Deadline) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as scratch:
        for name, argv in cases(Path(scratch)).items():
            deadline.check(f"measuring {name}")
            run_once(argv, tree, deadline)  # warm-up: page cache, .pyc files
            walls, peaks = [], []
            for _ in range(runs):
                wall, peak = run_once(argv, tree, deadline)
                walls.append(wall)
                peaks.append(peak)
            result[name] = {
                "argv": argv,
                "wall_ms_median": round(statistics.median(walls) * 1000, 1),
                "wall_ms_min": round(min(walls) * 1000, 1),
                "peak_rss_mib_median": round(statistics.median(peaks) / 1024, 1),
                "peak_rss_mib_max": round(max(peaks) / 1024, 1),
                **heavy_loaded(argv, tree, deadline),
            }
            row = result[name]
            print(f"{name:22} {row['wall_ms_median']:7.1f} ms (min {row['wall_ms_min']:.1f})"
                  f"  peak {row['peak_rss_mib_median']:5.1f} MiB"
                  f"  modules {row['modules_imported']:4}  heavy: "
                  f"{', '.join(row['heavy_libraries']) or '-'}", file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10,
                        help="measured runs per command (10; one more warms up first)")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose controlplane is measured (default: this one)")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds the whole run may take (300)")
    add_output_flags(parser, BASELINE)
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 1000:
        print("--runs must be 1 to 1000", file=sys.stderr)
        return 2
    tree = args.tree.resolve()
    if not os.access(TIME, os.X_OK):
        print(f"{TIME} (GNU time) is needed for the peak RSS: apt-get install time",
              file=sys.stderr)
        return 2
    if not (tree / "controlplane" / "__main__.py").is_file():
        print(f"--tree {tree}: no controlplane package there", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    result: dict[str, Any] = {"tree": str(tree), "commit": commit, "runs": args.runs,
                              "python": sys.version.split()[0]}
    try:
        result["cases"] = measure(tree, args.runs, Deadline(args.deadline))
    except (BenchError, subprocess.TimeoutExpired) as exc:
        result["error"] = str(exc)
    return finish(result, args, BASELINE)


if __name__ == "__main__":
    sys.exit(main())
