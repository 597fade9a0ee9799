"""The official Kubernetes client, configured the usual way."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client, config

from controlplane.errors import SourceError


def api_client(kubeconfig: Path | None = None, pool_size: int = 16) -> client.ApiClient:
    """``--kubeconfig`` if given; in a pod, the service account; else KUBECONFIG or
    ~/.kube/config (as kubectl does)."""
    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise SourceError(
            f"cannot configure the Kubernetes client: {exc}; pass --kubeconfig PATH, set "
            "KUBECONFIG, or run inside a pod with a service account"
        ) from exc
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)
