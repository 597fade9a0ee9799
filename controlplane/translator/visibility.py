"""Which services a sidecar sees: the mesh's scoping rules applied to one proxy.

Interface shared by the assembly (which serves each group only its visible set) and the
scoping rules (``sidecars`` in the mesh file, ``exportTo`` on a service). Pure.
"""

from __future__ import annotations

from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity


def visible_services(mesh: Mesh, proxy: ProxyIdentity) -> frozenset[str] | None:
    """The keys (``name.namespace``) of the services ``proxy`` may reach, or None when it
    sees every service (so groups that see everything share the full layers).

    The most specific ``sidecars`` entry wins (the one selecting the proxy's service over
    the one for its whole namespace); with none, every service exported to the proxy's
    namespace. A proxy always sees its own service, and every service a visible one
    routes to (split, match, fallback). Indexed once per mesh, so a call costs about the
    size of its answer, and proxies under one entry get the same frozenset object."""
    return mesh.scope.visible(proxy.service, proxy.namespace)
