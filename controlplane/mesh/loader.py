"""Turn YAML bytes or text into a validated Mesh, or a MeshError that names every bad
field. Whatever the input (any bytes, any size, any nesting), the outcome is one of the
two: never another exception."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from controlplane.errors import EmptyMeshError, MeshError
from controlplane.mesh.limits import UINT32_MAX
from controlplane.mesh.model import (
    Fallback,
    MatchRoute,
    Mesh,
    Service,
    Sidecar,
    SplitTarget,
    reference_problems,
)
from controlplane.mesh.scope import sidecar_problems

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x
# A mesh of 100,000 endpoints is ~1M values; YAML aliases could make a small file expand
# into billions ("billion laughs"), which validation would walk for hours.
MAX_VALUES: Final = 5_000_000
MAX_FILE_BYTES: Final = 64 * 2**20  # a 100,000-endpoint mesh is ~10 MiB


def too_big(size: int, origin: str) -> MeshError:
    return MeshError(origin, [
        f"the file is {size / 2**20:.0f} MiB; a mesh file is at most "
        f"{MAX_FILE_BYTES // 2**20} MiB, split the mesh or check that this is the right file"
    ])


class _MeshYamlLoader(_BaseLoader):  # type: ignore[misc]
    """YAML 1.2 booleans: only ``true``/``false``. YAML 1.1 would read the key ``on:`` of
    ``retries`` (and values such as ``yes``/``off``) as booleans. A key repeated in one
    mapping is an error naming both lines: YAML would keep the last value silently."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"key {key_node.value[:80]!r} repeats the one on line {seen[key]}; "
                        "keep one of them (YAML would silently keep the last)",
                        key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


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
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise too_big(size, str(path))
        data = path.read_bytes()
    except OSError as exc:
        raise MeshError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from exc
    return load_mesh_bytes(data, origin=str(path))


def decode_mesh(data: bytes, origin: str = "<mesh>") -> str:
    """UTF-8 (a leading byte-order mark is allowed), or a MeshError naming the line and
    the byte that is not."""
    if len(data) > MAX_FILE_BYTES:
        raise too_big(len(data), origin)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise MeshError(origin, [
            f"line {line}, byte {column} of the line (offset {exc.start}): byte "
            f"0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8"
        ]) from None


def load_mesh_bytes(data: bytes, origin: str = "<mesh>") -> Mesh:
    return load_mesh_text(decode_mesh(data, origin), origin)


def parse_mesh_yaml(text: str) -> Any:
    """YAML as mesh files mean it (YAML 1.2 booleans, no repeated keys); raises
    yaml.YAMLError."""
    return yaml.load(text, Loader=_MeshYamlLoader)


def load_mesh_text(text: str, origin: str = "<mesh>") -> Mesh:
    try:
        data = parse_mesh_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MeshError(origin, [f"{where}not valid YAML: {problem}"]) from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
        # Nesting deeper than the parser's stack, or a scalar no Python value holds.
        raise MeshError(origin, [f"not a mesh file YAML can read: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}"]) from None
    if data is None or (isinstance(data, dict) and "services" not in data):
        raise EmptyMeshError(origin, [
            "the mesh has no 'services' key"
            + (" (the file is empty)" if data is None else "")
            + "; a mesh with no services says so: services: []"
        ])
    if not isinstance(data, dict):
        raise MeshError(
            origin, [f"the top level must be a mapping with a 'services' list, not a {_kind(data)}"]
        )
    return load_mesh_data(data, origin)


def load_mesh_data(data: dict[str, Any], origin: str = "<mesh>") -> Mesh:
    if count_values(data) > MAX_VALUES:
        raise MeshError(origin, [
            f"the mesh holds more than {MAX_VALUES:,} values once YAML aliases are expanded; "
            "write it without aliases, or split it"
        ])
    if "identity" in data:
        raise MeshError(origin, [
            "identity: set by the server, not the mesh file: remove it, and run serve with "
            "--ca-dir (or --ca-cert/--ca-key) and --trust-domain to give workloads identities"
        ])
    try:
        return Mesh.model_validate(data)
    except ValidationError as exc:
        problems = [describe_error(err, data) for err in exc.errors()]
    except RecursionError:
        raise MeshError(origin, ["nested too deeply to be a mesh"]) from None
    for extra in [*_reference_problems(data), *_sidecar_problems(data)]:
        if extra not in problems:
            problems.append(extra)
    raise MeshError(origin, problems)


def _sidecar_problems(data: dict[str, Any]) -> list[str]:
    """Repeated ``sidecars`` entries among those that did validate, reported in the
    same round as the mesh's other problems."""
    items = data.get("sidecars")
    if not isinstance(items, list):
        return []
    parsed = [(index, valid) for index, item in enumerate(items)
              if isinstance(valid := _valid(Sidecar, item), Sidecar)]
    found = sidecar_problems(parsed)
    if not found:
        return []
    return [describe_error(err, data) for err in
            ValidationError.from_exception_data("Mesh", found).errors()]


def _reference_problems(data: dict[str, Any]) -> list[str]:
    """The cross-service checks (splits, matches, fallbacks, repeated names) over the
    services that did validate, so that one round reports both kinds of problem."""
    items = data.get("services")
    if not isinstance(items, list):
        return []
    parsed: list[tuple[int, Service]] = []
    unparsed: set[str] = set()
    for index, item in enumerate(items):
        try:
            parsed.append((index, Service.model_validate(item)))
        except (ValidationError, RecursionError):
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                namespace = item.get("namespace", "default")
                unparsed.add(f"{item['name']}.{namespace}")
    found: list[InitErrorDetails] = reference_problems(parsed, frozenset(unparsed))
    keys = unparsed | {service.key for _, service in parsed}
    valid = {index for index, _ in parsed}
    for index, item in enumerate(items):
        if index not in valid and isinstance(item, dict):
            found += _raw_references(index, item, keys)
    if not found:
        return []
    errors = ValidationError.from_exception_data("Mesh", found).errors()
    return [describe_error(err, data) for err in errors]


def _raw_references(index: int, item: dict[str, Any], keys: set[str]) -> list[InitErrorDetails]:
    """A service that failed its own validation may still split, match or fall back to a
    service that does not exist: say so now, not after its other fields are fixed. Only
    legs that are valid themselves are looked at (an invalid one has its own error)."""
    policy = item.get("policy")
    namespace = item.get("namespace", "default")
    if not isinstance(policy, dict) or not isinstance(namespace, str):
        return []
    targets: list[tuple[tuple[str | int, ...], str, str]] = []
    for field, model in (("split", SplitTarget), ("match", MatchRoute)):
        legs = policy.get(field)
        for at, leg in enumerate(legs if isinstance(legs, list) else []):
            parsed = _valid(model, leg)
            if isinstance(parsed, SplitTarget | MatchRoute) and parsed.service is not None:
                targets.append(((field, at), parsed.service, parsed.namespace or namespace))
    fallback = _valid(Fallback, policy.get("fallback"))
    target = fallback.target(namespace) if isinstance(fallback, Fallback) else None
    if target is not None and f"{target[0]}.{target[1]}" != f"{item.get('name')}.{namespace}":
        targets.append((("fallback",), *target))
    return [
        InitErrorDetails(
            type=PydanticCustomError("value_error", "{message}", {
                "message": f"no service {name!r} in namespace {other!r}"}),
            loc=("services", index, "policy", *where, "service"), input=name)
        for where, name, other in targets if f"{name}.{other}" not in keys
    ]


def _valid(model: type[BaseModel], value: Any) -> BaseModel | None:
    try:
        return model.model_validate(value)
    except (ValidationError, RecursionError):
        return None


def count_values(data: Any) -> int:
    """How many values ``data`` holds, aliases counted each time; stops past MAX_VALUES."""
    count, stack = 0, [data]
    while stack and count <= MAX_VALUES:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


_NAMED: Final = (["services"], [".services"], ["sidecars"], [".sidecars"])
# Kubernetes-shaped entries (Gateway API objects): named namespace/name, as kubectl does.
_OBJECTS: Final = tuple([key] for key in ("http_routes", "grpc_routes", "reference_grants",
                                          "gateways", "tls_routes", "certificates",
                                          "tcp_routes"))


def describe_error(error: Any, data: Any, root: str = "") -> str:
    """``services[1] (reviews.default).endpoints[0].port: Input should be ...``: the path,
    with the name of each named object on it, and a message that says what to do.
    ``root`` prefixes the path (``spec`` for a TrafficPolicy)."""
    parts: list[str] = [root] if root else []
    node: Any = data
    for item in error["loc"]:
        if isinstance(item, int):
            in_services = parts[-1:] in _NAMED  # name those only
            in_objects = parts[-1:] in _OBJECTS
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            if (in_services or in_objects) and isinstance(node, dict) \
                    and isinstance(node.get("name"), str):
                namespace = str(node.get("namespace", "default"))[:80]
                name = str(node["name"])[:80]
                parts.append(f" ({namespace}/{name})" if in_objects else f" ({name}.{namespace})")
        else:
            text = str(item)[:80]
            parts.append(f".{text}" if parts else text)
            node = node.get(item) if isinstance(node, dict) else None
    path = "".join(parts) or "(top level)"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown field; check its spelling against the mesh file reference in the README"
    elif error["type"] in ("int_type", "float_type") and isinstance(error.get("input"), bool):
        # YAML reads `port: true` as a boolean, which Python would take for 1.
        message = f"{str(error['input']).lower()} is a boolean; give a number"
    elif error["type"] == "less_than_equal" and error.get("ctx", {}).get("le") == UINT32_MAX:
        message += " (Envoy keeps it in 32 bits)"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{path}: {message}"


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
