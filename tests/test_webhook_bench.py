"""bench/inject.py end to end at a tiny scale: it drives a real ``controlplane serve``'s
webhook over HTTPS and reports the figures it promises (never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "inject.py"


def test_inject_bench_reports_latency_from_real_reviews(tmp_path: Path) -> None:
    out = tmp_path / "inject.json"
    done = subprocess.run([sys.executable, str(BENCH), "--reviews", "30", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reviews"] == 30
    assert result["server_injected_total"] == 50  # 20 warm-up reviews, then 30 measured
    assert result["patch_bytes"] > 0
    for key in ("round_trip_ms_p50", "round_trip_ms_p99", "server_decision_ms_p50",
                "server_decision_ms_p99", "server_rss_mib"):
        assert isinstance(result[key], int | float) and result[key] > 0, key
