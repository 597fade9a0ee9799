"""The local lab: control plane, demo services and real Envoy sidecars on loopback."""

from controlplane.lab.runner import run_lab

__all__ = ["run_lab"]
