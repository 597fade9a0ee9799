#!/usr/bin/env python3
"""Chaos benchmark: what failures cost the data plane, and how fast it recovers.

Runs the chaos suite's scenarios (tests/chaos/) against real processes:
``controlplane serve`` on a mesh file, Envoy sidecars from ``controlplane bootstrap``,
HTTP backends on 127.0.0.1, and 20 requests/s through the sidecar. It prints, per
scenario, what it simulated and its figures, and writes them as JSON:

- ``kill_restart``: SIGKILL the server under traffic, keep it down ~1 s, restart it on
  the same port: failed requests, the server's start time, the sidecar's reconnect time
  once the server is ready, and how long a following change takes to arrive;
- ``rollout``: the same with SIGTERM, which must end the server cleanly (exit 0, no
  error logged);
- ``failover``: two replicas on one mesh file, the sidecar's xDS cluster lists both; the
  one it is connected to is killed: failed requests, seconds until it is on the other,
  and whether its config changed (it must not: versions are content hashes);
- ``invented_identities``: N ADS streams (half SotW, half delta) with invented node ids,
  services and namespaces, each answered, then all gone: seconds to connect them, the
  groups at the peak, seconds until they are forgotten (group TTL 2 s), and server RSS
  before, at the peak and after;
- ``abusive_clients``: a 1 MB node id, and 2000 unknown type URLs on one stream: the
  gRPC status each gets, and the bytes of log they cost;
- ``stalled_clients``: 20 clients on a 1000-service mesh ask for clusters, listeners and
  routes and never read (the server's writes block on flow control), then vanish: how
  many interrupted writes were logged (at info, never as errors), and the push time to
  the real sidecar afterwards;
- ``debug_storm``: a mesh of M services; the time an endpoint change takes to reach the
  sidecar (R changes, median and each) without, then during, C concurrent clients asking
  /debug/config_dump in a loop;
  the worst /healthz latency during the storm; the debug responses by status;
- ``big_mesh``: a mesh file of B services x E endpoints saved over a 2-service one, then
  the 2-service one again: seconds until the sidecar has the big one, the worst /healthz
  latency meanwhile, and server RSS before, with the big mesh and after;
- ``api_outage``: ``serve --source kubernetes`` against the API server double, which
  goes down for T seconds (45 by default) while an EndpointSlice changes: seconds from
  its return until the sidecar holds the new endpoint;
- ``bad_inputs``: every bad mesh file of tests/chaos/bad_inputs.py written into a running
  server: failed requests and whether the server stayed up (one line per input).

    .venv/bin/python bench/chaos.py [--identities 1000] [--services 1000]
        [--concurrency 200] [--changes 5] [--big-services 5000] [--big-endpoints 10]
        [--outage 45] [--skip bad_inputs] [--out FILE] [--update-baseline]

A run writes bench/results/runs/chaos-<UTC time>.json; the committed baseline
bench/results/chaos.json is written only with --update-baseline. Bounded: each scenario
has its own waits, and no scenario starts after --deadline seconds (default 420).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the scenarios and the process helpers live in tests/
    sys.path.insert(0, str(ROOT))

from common import Deadline, add_output_flags, results_path, write_results  # noqa: E402

from tests.chaos.bad_inputs import BAD_INPUTS, SEQUENCES, bad_input  # noqa: E402
from tests.chaos.clients import (  # noqa: E402
    abusive_clients,
    invented_identities,
    stalled_clients,
)
from tests.chaos.harness import Stack  # noqa: E402
from tests.chaos.kube import Kube, api_outage  # noqa: E402
from tests.chaos.load import big_mesh, debug_storm  # noqa: E402
from tests.chaos.scenarios import failover, kill_and_restart  # noqa: E402

BASELINE = "chaos.json"
SCENARIOS = ("kill_restart", "rollout", "failover", "invented_identities", "abusive_clients",
             "stalled_clients", "debug_storm", "big_mesh", "api_outage", "bad_inputs")


def _bad_inputs(root: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for case in [*BAD_INPUTS, *SEQUENCES]:
        results[case] = _in_stack(root / case, lambda stack, c=case: bad_input(stack, c))
        print(f"  {case}: {_line(results[case])}", file=sys.stderr)
    broken = [case for case, r in results.items() if "error" in r]
    summary: dict[str, Any] = {
        "inputs": len(results), "survived": len(results) - len(broken),
        "failed_requests": sum(r.get("traffic", {}).get("failed", 0)
                               for r in results.values()),
        "cases": results}
    if broken:
        summary["error"] = f"{len(broken)} inputs broke a promise: {', '.join(broken)}"
    return summary


def _in_stack(workdir: Path, scenario: Callable[[Stack], dict[str, Any]]) -> dict[str, Any]:
    """Run one scenario in its own processes; a broken promise is reported, not raised."""
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir)
    try:
        return scenario(stack)
    except Exception as exc:  # an AssertionError is the promise broken: report it
        return {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    finally:
        stack.close()


def _in_kube(workdir: Path, scenario: Callable[[Kube], dict[str, Any]]) -> dict[str, Any]:
    """Like _in_stack, with the Kubernetes API server double."""
    workdir.mkdir(parents=True, exist_ok=True)
    kube = Kube(workdir)
    try:
        return scenario(kube)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    finally:
        kube.close()


def _line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"FAILED: {result['error'][:300]}"
    return ", ".join(f"{k}={v}" for k, v in result.items()
                     if k not in ("cases", "first_failures"))


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    plan: dict[str, Callable[[], dict[str, Any]]] = {
        "kill_restart": lambda: _in_stack(root / "kill", kill_and_restart),
        "rollout": lambda: _in_stack(root / "rollout",
                                     lambda s: kill_and_restart(s, graceful=True)),
        "failover": lambda: _in_stack(root / "failover", failover),
        "invented_identities": lambda: _in_stack(
            root / "identities",
            lambda s: invented_identities(s, args.identities,
                                          {"CONTROLPLANE_GROUP_TTL": "2"}, 2.0)),
        "abusive_clients": lambda: _in_stack(root / "abuse", abusive_clients),
        "stalled_clients": lambda: _in_stack(
            root / "stalled", lambda s: stalled_clients(s, 1000, 20)),
        "debug_storm": lambda: _in_stack(
            root / "storm",
            lambda s: debug_storm(s, args.services, args.concurrency, bound_seconds=60.0,
                                  changes=args.changes)),
        "big_mesh": lambda: _in_stack(
            root / "big", lambda s: big_mesh(s, args.big_services, args.big_endpoints)),
        "api_outage": lambda: _in_kube(root / "outage",
                                       lambda k: api_outage(k, args.outage)),
        "bad_inputs": lambda: _bad_inputs(root / "bad"),
    }
    results: dict[str, Any] = {"simulated": __doc__.split("\n\n")[1].replace("\n", " ")}
    for name in SCENARIOS:
        if name in args.skip:
            continue
        if deadline.left() == 0:
            results[name] = {"error": f"not run: the deadline of {args.deadline:.0f} s "
                             "had passed"}
            continue
        print(f"{name} ...", file=sys.stderr)
        started = time.monotonic()
        results[name] = plan[name]()
        results[name]["scenario_seconds"] = round(time.monotonic() - started, 1)
        print(f"{name}: {_line(results[name])}", file=sys.stderr)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=1000,
                        help="invented identities to connect (default 1000)")
    parser.add_argument("--services", type=int, default=1000,
                        help="services in the debug storm's mesh (default 1000)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="concurrent /debug/config_dump clients (default 200)")
    parser.add_argument("--changes", type=int, default=5,
                        help="endpoint changes timed without and with the storm (default 5)")
    parser.add_argument("--big-services", type=int, default=5000,
                        help="services in the big mesh file (default 5000)")
    parser.add_argument("--big-endpoints", type=int, default=10,
                        help="endpoints per service in the big mesh file (default 10)")
    parser.add_argument("--outage", type=float, default=45.0,
                        help="seconds the Kubernetes API server is down (default 45)")
    parser.add_argument("--skip", action="append", default=[], choices=SCENARIOS,
                        help="leave a scenario out (repeatable)")
    parser.add_argument("--deadline", type=float, default=420.0,
                        help="no scenario starts after this many seconds (default 420)")
    add_output_flags(parser, BASELINE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = results_path(BASELINE, args.out, args.update_baseline)
    with tempfile.TemporaryDirectory(prefix="chaos-bench-") as tmp:
        try:
            results = run(args, Path(tmp))
        except KeyboardInterrupt:  # each scenario's stack has ended its processes
            print("interrupted", file=sys.stderr)
            return 130
    text = json.dumps(results, indent=2)
    print(text)
    write_results(out, text, BASELINE)
    broken = [name for name, r in results.items() if isinstance(r, dict) and "error" in r]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
