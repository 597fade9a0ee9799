"""Turn YAML text into a validated Mesh, or a MeshError that names every bad field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controlplane.errors import MeshError
from controlplane.mesh.model import Mesh

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x


class _MeshYamlLoader(_BaseLoader):  # type: ignore[misc]
    """YAML 1.2 booleans: only ``true``/``false``. YAML 1.1 would read the key ``on:`` of
    ``retries`` (and values such as ``yes``/``off``) as booleans."""


_MeshYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_MeshYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_mesh_file(path: str | Path) -> Mesh:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MeshError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from exc
    return load_mesh_text(text, origin=str(path))


def parse_mesh_yaml(text: str) -> Any:
    """YAML as mesh files mean it (YAML 1.2 booleans); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_MeshYamlLoader)


def load_mesh_text(text: str, origin: str = "<mesh>") -> Mesh:
    try:
        data = parse_mesh_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MeshError(origin, [f"{where}not valid YAML: {problem}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MeshError(
            origin, [f"the top level must be a mapping with a 'services' list, not a {_kind(data)}"]
        )
    return load_mesh_data(data, origin)


def load_mesh_data(data: dict[str, Any], origin: str = "<mesh>") -> Mesh:
    try:
        return Mesh.model_validate(data)
    except ValidationError as exc:
        raise MeshError(origin, [describe_error(err, data) for err in exc.errors()]) from exc


def describe_error(error: Any, data: Any, root: str = "") -> str:
    """``services[1] (reviews.default).endpoints[0].port: Input should be ...``: the path,
    with the name of each named object on it, and a message that says what to do.
    ``root`` prefixes the path (``spec`` for a TrafficPolicy)."""
    parts: list[str] = [root] if root else []
    node: Any = data
    for item in error["loc"]:
        if isinstance(item, int):
            in_services = parts[-1:] in (["services"], [".services"])  # name those only
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            if in_services and isinstance(node, dict) and isinstance(node.get("name"), str):
                namespace = node.get("namespace", "default")
                parts.append(f" ({node['name']}.{namespace})")
        else:
            parts.append(f".{item}" if parts else str(item))
            node = node.get(item) if isinstance(node, dict) else None
    path = "".join(parts) or "(top level)"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown field; check its spelling against the mesh file reference in the README"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{path}: {message}"


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
