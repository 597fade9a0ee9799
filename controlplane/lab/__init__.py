"""The local lab: control plane, demo services and real Envoy sidecars, each app in a
network namespace of its own with its traffic captured (as root), else on loopback."""

from controlplane.lab.runner import run_lab
from controlplane.lab.topology import NEEDS, LabError

__all__ = ["NEEDS", "LabError", "run_lab"]
