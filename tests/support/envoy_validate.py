"""Does a real Envoy accept what the translator makes? ``envoy --mode validate`` on one
bootstrap that holds many translations at once, so hundreds of meshes cost one Envoy run.

Each translation (a mesh, for one proxy) becomes static resources under a prefix of its
own: clusters renamed ``m<i>|...`` (EDS clusters become STATIC ones carrying their
ClusterLoadAssignment, so endpoints are validated too, addresses included), listeners
given their own port, and the egress route table inlined into its listener. Envoy
stops at the first bad resource, so a failed batch is split in halves until the one
translation it rejects is found: its error is Envoy's own message.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane import resource
from controlplane.lab.envoy import find_envoy
from controlplane.translator import Resources, resource_name

_FIRST_PORT = 20000
_CAPTURE_CLUSTERS = frozenset({"passthrough", "blackhole", "inbound-passthrough"})


def _json(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


def _rename(data: Any, prefix: str) -> Any:
    """Every cluster name (``outbound|...``, ``inbound|...``, a captured sidecar's
    ``passthrough`` and the like) gets ``prefix``."""
    if isinstance(data, dict):
        return {key: _rename(value, prefix) for key, value in data.items()}
    if isinstance(data, list):
        return [_rename(item, prefix) for item in data]
    if isinstance(data, str) and (data.startswith(("outbound|", "inbound|"))
                                  or data in _CAPTURE_CLUSTERS):
        return prefix + data
    return data


def static_resources(index: int, resources: Resources) -> tuple[list[Any], list[Any]]:
    """(clusters, listeners) of one translation, renamed so that batches do not collide."""
    prefix = f"m{index}|"
    assignments = {resource_name(a): a for a in resources[resource.ENDPOINT]}
    clusters: list[Any] = []
    for cluster in resources[resource.CLUSTER]:
        data = _json(cluster)
        if "eds_cluster_config" in data:
            del data["eds_cluster_config"]
            data["type"] = "STATIC"
            assignment = assignments.get(resource_name(cluster))
            assert assignment is not None, f"EDS cluster {cluster.name} has no assignment"
            data["load_assignment"] = _json(assignment)
        clusters.append(_rename(data, prefix))
    routes = {resource_name(r): _json(r) for r in resources[resource.ROUTE]}
    listeners: list[Any] = []
    for offset, listener in enumerate(resources[resource.LISTENER]):
        data = _json(listener)
        data["name"] = f"{prefix}{data['name']}"
        data["address"]["socket_address"]["port_value"] = _FIRST_PORT + 2 * index + offset
        for chain in data.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                config = network_filter.get("typed_config", {})
                rds = config.pop("rds", None)
                if rds is not None:
                    config["route_config"] = routes[rds["route_config_name"]]
        listeners.append(_rename(data, prefix))
    return clusters, listeners


def _run(batch: list[tuple[int, Resources]]) -> str | None:
    """None when Envoy accepts the batch, else its error output."""
    clusters: list[Any] = []
    listeners: list[Any] = []
    for index, resources in batch:
        more_clusters, more_listeners = static_resources(index, resources)
        clusters += more_clusters
        listeners += more_listeners
    bootstrap = {
        "node": {"id": "validate", "cluster": "validate"},
        "static_resources": {"clusters": clusters, "listeners": listeners},
    }
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        config = Path(tmp) / "bootstrap.json"
        config.write_text(json.dumps(bootstrap), encoding="utf-8")
        run = subprocess.run(
            [find_envoy(), "--mode", "validate", "-c", str(config), "--log-level", "error",
             "--use-dynamic-base-id", "--concurrency", "1"],
            capture_output=True, text=True, timeout=120,
        )
    if run.returncode == 0:
        return None
    return (run.stderr + run.stdout).strip()[-2000:]


def rejected(translations: list[Resources]) -> dict[int, str]:
    """Envoy's error for each translation it rejects (index -> message); {} when all pass."""
    found: dict[int, str] = {}
    pending = [list(enumerate(translations))]
    while pending:
        batch = pending.pop()
        if not batch:
            continue
        error = _run(batch)
        if error is None:
            continue
        if len(batch) == 1:
            found[batch[0][0]] = error
            continue
        half = len(batch) // 2
        pending += [batch[:half], batch[half:]]
    return found
