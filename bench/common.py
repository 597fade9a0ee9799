"""What the benchmarks share: reading the server's Prometheus metrics."""

from __future__ import annotations

import contextlib


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` whose label text contains ``labels``."""
    return sum(value for key, value in samples.items()
               if (key == name or key.startswith(name + "{")) and labels in key)
