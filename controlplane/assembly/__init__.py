"""One mesh translated and encoded once, then assembled into a snapshot per proxy group.

``build``: the MeshBuild (shared layers by visible set, zone and namespace; each group's
own resources); ``services``: each service's resources, encoded once per change;
``ondemand`` (when present): the snapshot of a sidecar that fetches config on first use.
"""

from controlplane.assembly.build import MeshBuild

__all__ = ["MeshBuild"]
