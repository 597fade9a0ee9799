"""Golden-file tests' scaffolding, shared so every golden suite reads, regenerates and
reports the same way: a directory of ``in/<case>.yaml`` mesh files (each with a
``proxy:`` block) and ``out/<case>.yaml`` renderings a reviewer reads like code.
``pytest --update-golden`` rewrites the outputs and deletes those without an input.
Suites with another layout (inputs and outputs side by side, other suffixes, cases
named in code) say so with ``Goldens``' fields; they check and regenerate the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.mesh.security import MeshIdentity
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources
from tests.support.envoy_validate import rejected


@dataclass(frozen=True)
class Goldens:
    """One golden directory: its cases, how a case loads, how its output is checked."""

    root: Path
    input_dir: str = "in"  # "": the inputs are in root itself
    output_dir: str = "out"
    input_suffix: str = ".yaml"  # a case's input is <case><input_suffix>
    output_suffix: str = ".yaml"

    @property
    def inputs(self) -> Path:
        return self.root / self.input_dir

    @property
    def outputs(self) -> Path:
        return self.root / self.output_dir

    @property
    def cases(self) -> list[str]:
        return sorted(path.name.removesuffix(self.input_suffix)
                      for path in self.inputs.glob(f"*{self.input_suffix}"))

    def input(self, case: str) -> Path:
        return self.inputs / f"{case}{self.input_suffix}"

    def output(self, case: str) -> Path:
        return self.outputs / f"{case}{self.output_suffix}"

    def load(self, case: str, *, kind: str | None = None) -> tuple[Mesh, ProxyIdentity]:
        """The mesh and the proxy of one case; ``kind`` overrides the proxy's kind.
        ``server_identity``, when given, is the identity the server sets when it runs a
        CA (a mesh file cannot)."""
        path = self.input(case)
        data = parse_mesh_yaml(path.read_text(encoding="utf-8"))
        proxy = ProxyIdentity(**data.pop("proxy"))
        if kind is not None:
            proxy = dataclasses.replace(proxy, kind=kind)
        identity = data.pop("server_identity", None)
        mesh = load_mesh_data(data, origin=str(path))
        if identity is not None:
            mesh = mesh.model_copy(update={"identity": MeshIdentity(**identity)})
        return mesh, proxy

    def check(self, case: str, actual: str, request: pytest.FixtureRequest,
              what: str = "translation differs from the golden file") -> None:
        """Fail with a unified diff when ``actual`` is not the case's output file; with
        ``--update-golden``, write it instead."""
        golden = self.output(case)
        shown = golden.relative_to(self.root)
        if request.config.getoption("--update-golden"):
            self.outputs.mkdir(parents=True, exist_ok=True)
            golden.write_text(actual, encoding="utf-8")
            return
        assert golden.exists(), f"{golden} is missing; run pytest --update-golden"
        expected = golden.read_text(encoding="utf-8")
        if actual != expected:
            diff = difflib.unified_diff(expected.splitlines(keepends=True),
                                        actual.splitlines(keepends=True),
                                        fromfile=f"{shown} (golden)",
                                        tofile=f"{shown} (actual)")
            pytest.fail(f"{what}:\n" + "".join(diff), False)

    def check_no_stale(self, request: pytest.FixtureRequest,
                       cases: Iterable[str] | None = None) -> None:
        """No output without an input (or among ``cases``, for suites that name their
        cases in code); ``--update-golden`` deletes such outputs."""
        known = set(self.cases if cases is None else cases)
        stale = sorted(path for path in self.outputs.glob(f"*{self.output_suffix}")
                       if path.name.removesuffix(self.output_suffix) not in known)
        if request.config.getoption("--update-golden"):
            for path in stale:
                path.unlink()
            return
        assert not stale, f"golden files without an input (run pytest --update-golden): {stale}"


def assert_envoy_accepts(translations: Mapping[str, Resources]) -> None:
    """A real ``envoy --mode validate`` takes every named translation (one Envoy run for
    all; the failure names the cases it refused, with Envoy's own error)."""
    names = list(translations)
    refused = rejected([translations[name] for name in names])
    assert not refused, {names[i]: error for i, error in refused.items()}


def to_dict(message: Message) -> Any:
    """MessageToDict, with map and Struct keys sorted: protobuf iterates maps in an
    order that changes from one process to the next."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _sort_maps(data, message.DESCRIPTOR)


def _sort_maps(data: Any, descriptor: Descriptor) -> Any:
    if isinstance(data, list):
        return [_sort_maps(item, descriptor) for item in data]
    if not isinstance(data, dict):
        return data
    if descriptor.full_name in ("google.protobuf.Struct", "google.protobuf.Value"):
        return _sort_all(data)
    if "@type" in data:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(
            data["@type"].rsplit("/", 1)[-1]
        )
    result: dict[str, Any] = {}
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None or field.type != FieldDescriptor.TYPE_MESSAGE:
            result[key] = value
        elif field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            result[key] = {
                k: _sort_maps(v, value_field.message_type)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE
                else v
                for k, v in sorted(value.items())
            }
        else:
            result[key] = _sort_maps(value, field.message_type)
    return result


def _sort_all(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _sort_all(data[key]) for key in sorted(data)}
    if isinstance(data, list):
        return [_sort_all(item) for item in data]
    return data
