"""controlplane: an xDS control plane for Envoy sidecars, driven by a mesh file or Kubernetes.

The pipeline runs one way: sources -> mesh model -> translator -> snapshot cache -> xDS
server. Each stage is a subpackage; see DESIGN.md and the README.
"""

__version__ = "0.1.0"
