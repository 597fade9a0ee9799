"""Re-read a big mesh file by parsing only the services whose text changed.

A mesh file of thousands of services is mostly one block list, ``services:`` at column 0
and one ``- name: ...`` item per service (the ``sidecars`` entries around it are read
again only when their text changes). ``MeshLoader`` cuts the text at those items,
keeps each item's validated Service by its exact text, and on the next load parses and
validates only items it has not seen: a one-endpoint edit of a 5 MB file re-parses one
service, not 5 MB. Each item is a small call, so the thread doing it gives the event
loop the GIL back often (one big parse would hold it for seconds).

This is only a fast path to the same answer. Whenever the text does not have that plain
shape, or anything fails (an item that is not one service, an invalid field, a reference
to a missing service, YAML anchors shared between items), the whole text goes through
``load_mesh_text``, which gives the result or the complete list of problems.
"""

from __future__ import annotations

import re
from typing import Any, Final

from controlplane.mesh.loader import (
    MAX_VALUES,
    count_values,
    decode_mesh,
    load_mesh_text,
    parse_mesh_yaml,
)
from controlplane.mesh.model import Mesh, Service, Sidecar

# The sidecars, and the other top-level keys as written (validated with the mesh).
_Frame = tuple[list[Sidecar], dict[str, Any]]

_SERVICES: Final = re.compile(r"services:[ \t]*(#.*)?\r?\n?")
_ITEM: Final = re.compile(r"( *)-( |\r?\n|$)")
_TOP: Final = frozenset({"services", "sidecars", "outbound_traffic_policy", "security",
                        "telemetry", "http_routes", "grpc_routes", "reference_grants",
                        "gateways", "tls_routes", "certificates",
                        "tcp_routes"})


def split_services(text: str) -> tuple[str, list[tuple[int, str]]] | None:
    """(the text without the list's items, [(first line, item text)]), or None when the
    text is not a block list under a column-0 ``services:`` line."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _SERVICES.fullmatch(line)), None)
    if start is None:
        return None
    items: list[tuple[int, list[str]]] = []
    indent: int | None = None
    end = len(lines)
    for number in range(start + 1, len(lines)):
        line = lines[number]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if items:
                items[-1][1].append(line)
            continue
        item = _ITEM.match(line)
        if indent is None:
            if item is None:
                return None
            indent = len(item.group(1))
        spaces = len(line) - len(line.lstrip(" "))
        if item is not None and spaces == indent:
            items.append((number, [line]))
        elif spaces > indent and items:
            items[-1][1].append(line)
        else:
            end = number
            break
    if not items:
        return None
    rest = [*lines[:start], "services: []\n", *lines[end:]]
    return "".join(rest), [(number, "".join(chunk)) for number, chunk in items]


class MeshLoader:
    """Loads a mesh file's bytes again and again, reusing the services it validated."""

    def __init__(self) -> None:
        self._known: dict[str, Service] = {}
        self._rest: tuple[str, _Frame] | None = None
        self.parsed = 0
        """How many items the last load had to parse (0 when all were known)."""

    def load(self, data: bytes, origin: str = "<mesh>") -> Mesh:
        text = decode_mesh(data, origin)
        try:
            mesh = self._fast(text)
        except Exception:  # any surprise on the fast path: the full load has the answer
            mesh = None
        if mesh is None:
            self._known, self._rest = {}, None
            self.parsed = -1  # the whole text
            return load_mesh_text(text, origin)
        return mesh

    def _fast(self, text: str) -> Mesh | None:
        split = split_services(text)
        if split is None:
            return None
        rest, items = split
        frame = self._frame(rest)
        if frame is None:
            return None
        sidecars, others = frame
        known: dict[str, Service] = {}
        services: list[Service] = []
        values, parsed = 0, 0
        for _, item in items:
            service = self._known.get(item) or known.get(item)
            if service is None:
                service, size = _service(item)
                if service is None:
                    return None
                values += size
                parsed += 1
                if values > MAX_VALUES:
                    return None
            known[item] = service
            services.append(service)
        mesh = Mesh(services=services, sidecars=sidecars, **others)
        self._known, self.parsed = known, parsed
        return mesh

    def _frame(self, rest: str) -> _Frame | None:
        """The ``sidecars`` entries and the ``outbound_traffic_policy`` of the text around
        the services (validated again only when that text changed), or None when it
        holds anything else."""
        if self._rest is not None and self._rest[0] == rest:
            return self._rest[1]
        top = parse_mesh_yaml(rest)
        if not isinstance(top, dict) or top.get("services") != [] or set(top) - _TOP:
            return None
        raw = top.get("sidecars", [])
        if not isinstance(raw, list) or count_values(raw) > MAX_VALUES:
            return None
        sidecars = [Sidecar.model_validate(item) for item in raw]
        others = {k: v for k, v in top.items() if k not in ("services", "sidecars")}
        self._rest = (rest, (sidecars, others))
        return self._rest[1]


def _service(item: str) -> tuple[Service | None, int]:
    """One list item as a validated Service (and how many values it held), or None."""
    # Errors are reported by the full load, with the file's line numbers; not from here.
    data: Any = parse_mesh_yaml(item)
    if not isinstance(data, list) or len(data) != 1:
        return None, 0
    size = count_values(data)
    if size > MAX_VALUES:
        return None, size
    return Service.model_validate(data[0]), size
