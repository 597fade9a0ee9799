"""The benchmarks run end to end at a tiny scale and report what they promise to report.

Figures are never asserted here (they are the benches' job); what is asserted is that
each bench simulates what it says: one snapshot group per simulated sidecar, a scoped
sidecar that subscribes to what it was given, the change reaching exactly the sidecars
that see the changed service, a storm that reconnects every stream, and real Envoys
that answer real calls (on demand: on first use, with nothing held before the call).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import pods

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, tmp_path: Path, *args: str, timeout: float = 150) -> Any:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_xds_push_gives_each_stream_its_own_group(tmp_path: Path) -> None:
    [result] = run_bench("xds_push.py", tmp_path, "--streams", "12", "--services", "20",
                         "--changes", "2")
    assert result["groups"] == 12 and result["server_groups"] == 12
    assert result["affected_streams"] == 12
    assert result["new_port_seen"] and result["eds_responses_per_stream_per_change"] == 1
    assert result["clusters_per_stream_median"] == 20
    assert set(result["meets"]) == set(result["targets"])
    for key in ("converge_all_s_p99", "server_cpu_s_per_change", "encoded_bytes_per_change",
                "server_rss_after_initial_mib", "server_peak_rss_mib",
                "initial_configured_all_s"):
        assert isinstance(result[key], int | float), key


def test_xds_push_old_grouping_and_zones(tmp_path: Path) -> None:
    [result] = run_bench("xds_push.py", tmp_path, "--streams", "8", "--services", "20",
                         "--changes", "1", "--groups", "2", "--zones", "2")
    # streams i % 2 services and i % 2 zones: (svc-0, zone-0) and (svc-1, zone-1)
    assert result["groups"] == 2 and result["server_groups"] == 2
    assert result["new_port_seen"]


def test_xds_push_scoped_reaches_only_the_callers(tmp_path: Path) -> None:
    [result] = run_bench("xds_push.py", tmp_path, "--streams", "12", "--services", "30",
                         "--changes", "2", "--scoped", "3", "--delta")
    # sidecar i reaches i-1..i-3 and itself: svc-0000 is seen by streams 0..3
    assert result["affected_streams"] == 4
    assert result["clusters_per_stream_median"] == 4
    assert result["unaffected_eds_responses_per_change"] == 0
    assert result["new_port_seen"]


def test_reconnect_storm_reconnects_every_stream(tmp_path: Path) -> None:
    result = run_bench("reconnect_storm.py", tmp_path, "--streams", "20", "--services",
                       "20", "--residents", "3")
    assert result["mode"] == "restart" and result["restart_ready_s"] > 0
    assert result["storm_configured_all_s"] > 0 and "storm_meets_target" in result
    for phase in ("quiet_change_to_residents", "storm_change_to_residents"):
        assert result[phase]["all"] > 0


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_envoy_memory_on_demand_fetches_on_first_use(tmp_path: Path) -> None:
    result = run_bench("envoy_memory.py", tmp_path, "--services", "12", "--sidecars", "1",
                       "--modes", "scoped,on-demand", timeout=180)
    scoped, on_demand = result["cases"]
    for case in (scoped, on_demand):
        [sidecar] = case["per_sidecar"]
        assert sidecar["calls"] == 10 and sidecar["calls_ok"] == 10, sidecar
        assert not sidecar["wrong_backend"]
        assert case["rss_after_calls_mib_median"] > 0
    assert scoped["per_sidecar"][0]["called_clusters_held_before_call"] == 10
    assert on_demand["per_sidecar"][0]["called_clusters_held_before_call"] == 0


@pytest.mark.e2e
@pytest.mark.timeout(200)
@pytest.mark.skipif(pods.capture_available() is not None, reason=str(pods.capture_available()))
def test_envoy_memory_captured_sidecar_is_called_through_the_capture(tmp_path: Path) -> None:
    result = run_bench("envoy_memory.py", tmp_path, "--services", "12", "--sidecars", "1",
                       "--modes", "full,captured", timeout=180)
    full, captured = result["cases"]
    assert captured["mode"] == "captured" and "skipped" not in captured
    [sidecar] = captured["per_sidecar"]
    # Each call by name went to a cluster IP nobody owns: only the capture reaches it
    assert sidecar["calls"] == 10 and sidecar["calls_ok"] == 10, sidecar
    assert not sidecar["wrong_backend"] and sidecar["called_clusters_upstream_rq"] == 10
    assert sidecar["active_clusters_idle"] > 12  # the whole mesh, as in full
    assert captured["rss_after_calls_mib_median"] > 0 and full["rss_after_calls_mib_median"] > 0
    assert "captured_minus_full_12_after_calls_mb" in result["targets"]


def test_convergence_puts_the_server_figure_beside_the_outside_one(tmp_path: Path) -> None:
    [result] = run_bench("convergence.py", tmp_path, "--streams", "6", "--services", "10",
                         "--changes", "2")
    assert "error" not in result, result.get("error")
    assert result["streams"] == result["affected_streams"] == 6
    for key in ("server_p50_s", "server_p99_s", "outside_p50_s", "outside_p99_s",
                "difference_p50_ms", "difference_p99_ms", "server_histogram_mean_s",
                "observed_after_write_ms_median", "load_avg_1m_start"):
        assert isinstance(result[key], int | float), key
    assert len(result["per_change"]) == 2
    for change in result["per_change"]:
        # the server saw every stream ACK the change: in /debug/changes and the histogram
        assert change["server_affected"] == change["server_acked"] == 6, change
        assert change["server_histogram"]["count"] == 6, change
        assert change["server"]["p99"] > 0 and change["outside"]["p99"] > 0, change
        assert change["laggards"] == []
