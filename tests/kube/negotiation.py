"""Content negotiation by the Accept header: whole objects or PartialObjectMetadata,
and the real server's mismatches.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from controlplane.sources.kubernetes.kinds import (
    Kind,
)
from tests.kube.constants import (
    _BUILTIN,
    Obj,
)
from tests.kube.errors import (
    StatusError,
    _error,
)

# --- Content negotiation: whole objects or metadata only --------------------------------
# The server answers in the first Accept clause (by q, then the client's order) that it can
# serve; a clause may ask for a meta.k8s.io kind instead of the object (``as=``), which is
# how client-go's metadata client gets PartialObjectMetadata(List).

_META_GROUP: Final = "meta.k8s.io"
_META_VERSIONS: Final = ("v1", "v1beta1")
_JSON: Final = "application/json"
_YAML: Final = "application/yaml"
_PROTOBUF: Final = "application/vnd.kubernetes.protobuf"
_MEDIA_TYPES: Final = (_JSON, _YAML, _PROTOBUF)  # kube-apiserver's, in its order (no CBOR)
_STREAMED: Final = (_JSON, _PROTOBUF)  # those with a watch framing; YAML has none
_CUSTOM_MEDIA_TYPES: Final = (_JSON, _YAML)  # custom resources, when not converted


@dataclass(frozen=True)
class _Clause:
    """One media range of an Accept header, as goautoneg parses it."""

    type: str
    subtype: str
    params: Mapping[str, str]
    q: float

    def specificity(self, media_type: str) -> int:
        """2 for an exact match, 1 for type/*, 0 for */*, -1 for none (q aside)."""
        type_, _, subtype = media_type.partition("/")
        if (self.type, self.subtype) == (type_, subtype):
            return 2
        if self.type == type_ and self.subtype == "*":
            return 1
        return 0 if (self.type, self.subtype) == ("*", "*") else -1


def _parse_accept(header: str) -> list[_Clause]:
    """The clauses, highest q first, concrete types before wildcards, else in order."""
    clauses = []
    for part in header.split(","):
        media_range, *params = part.split(";")
        type_, _, subtype = (p.strip() for p in media_range.partition("/"))
        if not subtype:
            if type_ != "*":
                continue  # goautoneg skips what is not a media range
            subtype = "*"
        q, options = 1.0, {}
        for param in params:
            key, equals, value = (p.strip() for p in param.partition("="))
            if not equals:
                continue
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # Go's ParseFloat error leaves zero
            else:
                options[key] = value
        clauses.append(_Clause(type_, subtype, options, q))
    return sorted(clauses, key=lambda c: (-c.q, c.type == "*", c.subtype == "*"))


@dataclass(frozen=True)
class _Output:
    """What responses carry: the objects themselves (``convert`` None), or a meta.k8s.io
    kind made from them, in ``version``."""

    convert: str | None = None  # PartialObjectMetadata | PartialObjectMetadataList | Table
    version: str = "v1"

    @property
    def api_version(self) -> str:
        return f"{_META_GROUP}/{self.version}"


def _conversion(clause: _Clause, media_type: str, kind: Kind) -> _Output | None:
    """acceptMediaTypeOptions with the endpoint's restrictions: what this clause asks of
    this media type, or None when the server skips the pair."""
    params = clause.params
    stream = params.get("stream")
    if stream and (stream != "watch" or media_type not in _STREAMED):
        return None
    if params.get("sv") and params["sv"] != "v1":
        return None
    if not {"as", "g", "v"} & params.keys():
        if kind not in _BUILTIN and media_type not in _CUSTOM_MEDIA_TYPES:
            return None
        return _Output()
    target, group, version = params.get("as", ""), params.get("g", ""), params.get("v", "")
    if group != _META_GROUP or version not in _META_VERSIONS:
        return None
    if target == "Table" and media_type in (_JSON, _YAML):
        return _Output(target, version)
    if target in ("PartialObjectMetadata", "PartialObjectMetadataList"):
        return _Output(target, version)  # list or not is only checked later, as there
    return None


def _not_acceptable(accepted: Iterable[str], note: str = "") -> StatusError:
    return _error(406, "only the following media types are accepted: "
                  + ", ".join(accepted) + note)


def _rejected(media_type: str, clauses: list[_Clause]) -> bool:
    """q=0 on the most specific clause naming a media type refuses it, even where a
    wildcard would accept it."""
    best = max(clauses, key=lambda c: c.specificity(media_type), default=None)
    return best is not None and best.specificity(media_type) >= 0 and best.q <= 0


def _negotiate(header: str, kind: Kind, watch: bool) -> _Output:
    """NegotiateOutputMediaType. Where the real server would answer in YAML, protobuf or
    as a Table, the double cannot, and says so with a 406 rather than send JSON."""
    if not header:
        return _Output()
    clauses = _parse_accept(header)
    for clause in (c for c in clauses if c.q > 0):
        for media_type in _MEDIA_TYPES:
            if clause.specificity(media_type) < 0 or _rejected(media_type, clauses):
                continue
            output = _conversion(clause, media_type, kind)
            if output is None:
                continue
            if watch and media_type not in _STREAMED:
                raise _not_acceptable(f"{m};stream=watch" for m in _STREAMED)
            if media_type != _JSON or output.convert == "Table":
                unserved = "as=Table" if output.convert == "Table" else media_type
                raise _not_acceptable(_MEDIA_TYPES, " (the API server double writes only "
                                      f"application/json, not {unserved})")
            if watch and output.convert == "PartialObjectMetadataList":
                # Converting each event fails, and the real server then sends the object.
                return _Output()
            return output
    raise _not_acceptable(_MEDIA_TYPES)


def _go_type(kind: Kind, is_list: bool) -> str:
    """The %T in the real server's messages: its internal type, or unstructured."""
    name = (f"{kind.group.split('.')[0] or 'core'}.{kind.kind}" if kind in _BUILTIN
            else "unstructured.Unstructured")
    return f"*{name}List" if is_list else f"*{name}"


def _partial(obj: Obj, output: _Output) -> Obj:
    return {"kind": "PartialObjectMetadata", "apiVersion": output.api_version,
            "metadata": copy.deepcopy(obj.get("metadata", {}))}


def _represent(kind: Kind, obj: Obj, output: _Output) -> Obj:
    """One object (or event object) as negotiated; a Status is always sent as it is."""
    if output.convert is None or obj.get("kind") == "Status":
        return obj
    if output.convert == "PartialObjectMetadataList":
        raise _error(406, "you requested PartialObjectMetadataList, but the requested object "
                     f"is not a list ({_go_type(kind, False)})")
    return _partial(obj, output)


def _represent_list(kind: Kind, body: Obj, output: _Output) -> Obj:
    """A list as negotiated. An empty PartialObjectMetadataList has ``"items": null``:
    Go's nil slice, which the real server sends as it is."""
    if output.convert is None:
        return body
    if output.convert == "PartialObjectMetadata":
        raise _error(406, "you requested PartialObjectMetadata, but the requested object is "
                     f"a list ({_go_type(kind, True)})")
    items = [_partial(item, output) for item in body["items"]]
    return {"kind": "PartialObjectMetadataList", "apiVersion": output.api_version,
            "metadata": body["metadata"], "items": items or None}


