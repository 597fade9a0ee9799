"""Offline injection of a manifest (``controlplane inject -f``), as ``istioctl kube-inject``.

Every document of a multi-document YAML is read, injected when it holds pods, and
written back in the same order; documents of other kinds come back unchanged (comments
and key order within a document are not kept: YAML is re-emitted). The sidecar's inline
bootstrap is written as a literal block, so the output stays readable and diffable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from controlplane.inject.config import InjectConfig, InjectError
from controlplane.inject.workloads import Outcome, describe, inject_object


class ManifestError(ValueError):
    """A manifest that cannot be injected: the message names the document and field."""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, no anchors or aliases (kubectl users read
    every value where it is); everything else as PyYAML's safe dumper."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def dump_documents(documents: list[Any]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False,
                         default_flow_style=False, width=100)


def inject_manifest(text: str, config: InjectConfig, namespace: str = "default",
                    source: str = "-") -> tuple[str, list[Outcome]]:
    """The manifest with every pod (template) injected, and what happened to each one.
    ``namespace`` is for objects that do not name theirs (as ``kubectl -n``)."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None
    out: list[Any] = []
    outcomes: list[Outcome] = []
    for index, document in enumerate(documents, start=1):
        if not isinstance(document, Mapping):
            raise ManifestError(f"{source}: document {index} is not a Kubernetes object "
                                "(a mapping with apiVersion and kind)")
        try:
            injected, done = inject_object(document, namespace, config)
        except InjectError as exc:
            raise ManifestError(f"{source}: document {index} "
                                f"({describe(document, namespace)}): {exc}") from None
        out.append(injected)
        outcomes += done
    return dump_documents(out), outcomes
