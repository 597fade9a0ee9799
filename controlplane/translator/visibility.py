"""Which services a sidecar sees: the mesh's scoping rules applied to one proxy.

Interface shared by the assembly (which serves each group only its visible set) and the
scoping rules (``sidecars`` in the mesh file, ``exportTo`` on a service). Pure.
"""

from __future__ import annotations

from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity


def visible_services(mesh: Mesh, proxy: ProxyIdentity) -> frozenset[str] | None:
    """The keys (``name.namespace``) of the services ``proxy`` may reach, or None when it
    sees every service. Being filled in (issue 9): until then every proxy sees all."""
    del mesh, proxy
    return None
