"""The local lab: control plane, demo services and real Envoy sidecars, each app in a
network namespace of its own with its traffic captured (as root), else on loopback.

``run_lab`` is imported on first use: the demo apps and the traffic generator
(``python -m controlplane.lab.apps``, one process per pod) need none of the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controlplane.lab.topology import NEEDS, LabError

if TYPE_CHECKING:
    from controlplane.lab.runner import run_lab

__all__ = ["NEEDS", "LabError", "run_lab"]


def __getattr__(name: str) -> Any:
    if name == "run_lab":
        from controlplane.lab.runner import run_lab
        return run_lab
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
