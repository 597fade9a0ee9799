"""The translator: pure functions from mesh state and a proxy's identity to Envoy v3
resources. No I/O, so it is tested with golden files and reused by every consumer."""

from controlplane.translator.translate import Resources, resource_name, translate

__all__ = ["Resources", "resource_name", "translate"]
