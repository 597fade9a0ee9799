"""Checking a mesh: translate it, build its route tables, assemble it for a neutral
proxy, and find the services that break it. ``controlplane validate`` runs it strictly;
the pipeline runs it before each publish and serves around the services it rejects."""

from __future__ import annotations

from collections.abc import Collection

from controlplane.assembly import MeshBuild
from controlplane.errors import TranslationError
from controlplane.mesh.model import Mesh
from controlplane.proxy import DEFAULT_NAMESPACE
from controlplane.translator import egress_route

_ATTEMPTS = 3  # isolate route-table culprits at most this many times, then reject whole


def check_mesh(mesh: Mesh, previous: MeshBuild | None = None,
               namespaces: Collection[str] = (DEFAULT_NAMESPACE,),
               strict: bool = True) -> MeshBuild:
    """Translate ``mesh``, build the route tables of ``namespaces`` and assemble it for a
    neutral proxy; TranslationError if that fails or is not consistent. Services whose
    translation fails are an error too when ``strict`` (``controlplane validate``); the
    server is not strict: it lists them in the build's ``rejected`` and serves the rest.
    The build is then shared by every group."""
    culprits: dict[str, str] = {}
    for _ in range(_ATTEMPTS):
        try:
            build = MeshBuild(mesh, previous, culprits)
            for namespace in sorted({DEFAULT_NAMESPACE, *namespaces}):
                build.route(namespace)
            snapshot = build.probe()
        except Exception as exc:  # a translator bug: find the services that cause it
            found = _route_culprits(mesh, {DEFAULT_NAMESPACE, *namespaces})
            if not found or found.keys() <= culprits.keys():
                raise TranslationError(f"{type(exc).__name__}: {exc}") from exc
            culprits.update(found)
            continue
        problems = snapshot.problems()
        if problems:
            raise TranslationError("inconsistent snapshot: " + "; ".join(problems))
        if strict and build.rejected:
            raise TranslationError("; ".join(f"service {key}: {error}" for key, error
                                             in sorted(build.rejected.items())))
        return build
    raise TranslationError("translation keeps failing after leaving out "
                           + ", ".join(sorted(culprits)))


def _route_culprits(mesh: Mesh, namespaces: Collection[str]) -> dict[str, str]:
    """The services whose own virtual hosts fail to build, each with its error."""
    found: dict[str, str] = {}
    for service in mesh.services:
        alone = mesh.model_copy(update={"services": [service]})
        for namespace in namespaces:
            try:
                egress_route(alone, namespace)
            except Exception as exc:
                found[service.key] = f"{type(exc).__name__}: {exc}"
                break
    return found
