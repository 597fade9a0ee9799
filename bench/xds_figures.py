"""The figures of bench/xds_push.py: issue 9's targets, the server's counters over a
phase, and the progress lines that print each figure beside its target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from common import metric

LATE_JOINERS = 5  # new sidecars timed one at a time after the changes

# Issue 9's targets at 1000 streams x 1000 services x 1000 groups, on 2 cores.
TARGETS: dict[str, tuple[str, float]] = {
    "converge_all_s_p99": ("<", 0.25),
    "server_cpu_s_per_change": ("<", 0.2),
    "encoded_bytes_per_change": ("<", 10_000),
    "server_rss_after_initial_mib": ("<", 300e6 / 2**20),  # 300 MB = 286 MiB
    "server_peak_rss_mib": ("<", 300e6 / 2**20),
    "initial_configured_all_s": ("<", 3.0),
    "new_sidecar_configured_s_median": ("<", 0.1),
}


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def check_targets(result: dict[str, Any]) -> dict[str, bool]:
    """Which of issue 9's targets this scenario met (only the figures it has)."""
    return {key: (result[key] < limit) for key, (_, limit) in TARGETS.items()
            if isinstance(result.get(key), int | float)}


def metric_figures(before: dict[str, float], after: dict[str, float],
                   changes: int) -> dict[str, Any]:
    """Server counters over the change phase, per push and per change."""
    def delta(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    pushes = delta("controlplane_xds_pushes_total")
    push_bytes = delta("controlplane_xds_push_bytes_total")
    eds_pushes = delta("controlplane_xds_pushes_total", 'type="eds"')
    builds = delta("controlplane_snapshot_build_seconds_count")
    return {
        "pushes_per_change": round(pushes / changes, 1),
        "eds_pushes_per_change": round(eds_pushes / changes, 1),
        "push_bytes_per_push": round(push_bytes / pushes) if pushes else 0,
        "push_bytes_per_change": round(push_bytes / changes),
        "encoded_bytes_per_change": round(delta("controlplane_encoded_bytes_total") / changes),
        "snapshot_builds_per_change": round(builds / changes, 1),
        "snapshot_build_s_per_change": round(
            delta("controlplane_snapshot_build_seconds_sum") / changes, 4),
        "nacks": delta("controlplane_xds_nacks_total"),
        "config_bytes_all_groups": round(metric(after, "controlplane_config_bytes")),
        # The server's garbage collections over the change phase, by generation.
        "gc_collections_per_change": {
            gen: round(delta("python_gc_collections_total", f'generation="{gen}"') / changes, 1)
            for gen in "012"},
    }


def _figure(r: dict[str, Any], key: str, text: str) -> str:
    """``text`` and, for a figure issue 9 sets a target for, the target and a verdict."""
    if key not in TARGETS:
        return text
    op, limit = TARGETS[key]
    return f"{text} [target {op} {limit:.4g}: {'ok' if r['meets'].get(key) else 'MISSED'}]"


def progress(r: dict[str, Any]) -> str:
    head = (f"{r['protocol']} S={r['streams']} M={r['services']} groups={r['groups']}"
            + (f" zones={r['zones']}" if r["zones"] else "")
            + (f" scoped={r['scoped']} (affected streams {r['affected_streams']})"
               if r["scoped"] else "") + ":")
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    parts = [
        _figure(r, "initial_configured_all_s",
                f"initial convergence {r['initial_configured_all_s']:.3f} s"),
        _figure(r, "converge_all_s_p99",
                f"change reaches all: p99 {r['converge_all_s_p99']:.3f} s "
                f"(median {r['converge_all_s_median']:.3f} s)"),
        _figure(r, "server_cpu_s_per_change",
                f"server CPU {r['server_cpu_s_per_change']:.3f} s/change"),
        _figure(r, "encoded_bytes_per_change",
                f"encoded {r['encoded_bytes_per_change']} B/change"),
        _figure(r, "new_sidecar_configured_s_median",
                f"a new sidecar configured in {r['new_sidecar_configured_s_median']:.3f} s "
                f"(median of {LATE_JOINERS}, client side)"),
        _figure(r, "server_rss_after_initial_mib",
                f"RSS after initial sync {r['server_rss_after_initial_mib']:.0f} MiB"),
        _figure(r, "server_peak_rss_mib", f"peak RSS {r['server_peak_rss_mib']:.0f} MiB"),
        f"{r['clusters_per_stream_median']} clusters per stream (median), "
        f"{r['push_bytes_per_push']} B/push, {r['pushes_per_change']} pushes/change "
        f"({r['unaffected_eds_responses_per_change']} to unaffected streams)",
    ]
    if r["server_log_lines"]:
        parts.append(f"{r['server_log_lines']} server log lines")
    return head + "\n  " + "\n  ".join(parts)
