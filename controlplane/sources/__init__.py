"""Sources turn the outside world into validated meshes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane.errors import SourceError
from controlplane.sources.base import Source
from controlplane.sources.file import FileSource

if TYPE_CHECKING:
    from controlplane.settings import ServeSettings

__all__ = ["FileSource", "Source", "open_source"]


def open_source(settings: ServeSettings) -> Source:
    """``file:PATH`` or ``kubernetes``, configured from the serve settings."""
    spec = settings.source
    if spec.startswith("file:"):
        path = spec.removeprefix("file:")
        if not path:
            raise SourceError("--source file: needs a path, e.g. --source file:mesh.yaml")
        return FileSource(path, settings.poll_interval)
    if spec == "kubernetes":
        from controlplane.sources.kubernetes import (
            Debounce,
            KubernetesSource,
            WatchTiming,
            api_client,
        )
        from controlplane.sources.kubernetes.gateway_controller import gateway_controller
        from controlplane.sources.kubernetes.kinds import WATCHED

        # A connection per watch (each kind per namespace), and some for status writes.
        api = api_client(settings.kubeconfig,
                         pool_size=8 + len(WATCHED) * max(1, len(settings.namespace)))
        timing = WatchTiming(server_timeout=settings.watch_timeout,
                             inactivity=settings.watch_inactivity)
        return KubernetesSource(
            api,
            namespaces=settings.namespace,
            timing=timing,
            debounce=Debounce(settings.debounce_quiet, settings.debounce_max),
            write_status=settings.write_status,
            pod_labels=settings.pod_labels,
            outbound_traffic_policy=settings.outbound_traffic_policy,
            # The server's own namespace: a SecurityPolicy without target there is
            # mesh-wide (Istio's root namespace).
            root_namespace=settings.webhook_namespace,
            replica=settings.identifier,  # named in the Programmed conditions it writes
            # Gateways of our class get an Envoy each, its proxy as injection's sidecar.
            gateways=gateway_controller(api, settings, timing),
        )
    raise SourceError(f"unknown source {spec!r}; use file:PATH or kubernetes")
