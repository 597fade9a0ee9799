"""The local lab: control plane, demo services and real Envoy sidecars on loopback."""

from controlplane.lab.runner import run_lab
from controlplane.lab.topology import NEEDS, LabError

__all__ = ["NEEDS", "LabError", "run_lab"]
