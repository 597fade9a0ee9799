"""VHDS on the wire: a virtual host sent with the aliases a client asked it by, and the
answer for a Host nothing serves.

Envoy resumes a request it holds for a Host only when an answer carries the alias it
asked for (``<route config>/<Host>``), as a resource's name or in its ``aliases``. A
virtual host's prepared chunk is shared by every stream, so the aliases one stream
asked for are appended to a copy of that chunk: protobuf merges repeated fields, so an
encoded Resource followed by more ``aliases`` is the same Resource with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.cache.snapshot import Resource


def resolve(aliases: Mapping[str, str], name: str) -> str | None:
    """The resource an alias names. Envoy asks with the Host as the client sent it and
    matches domains without regard to case, so a Host in capitals finds its host too."""
    found = aliases.get(name)
    if found is None and not name.islower():
        found = aliases.get(name.lower())
    return found


# Field numbers (envoy/service/discovery/v3/discovery.proto): DeltaDiscoveryResponse
# ``resources`` = 2, Resource ``aliases`` = 4.
_RESOURCES_TAG = b"\x12"


def with_aliases(updated: list[Resource], aliases: Mapping[str, str],
                  names: Set[str]) -> list[bytes]:
    """Each resource's prepared chunk, with the subscribed aliases that name it added to
    its ``aliases`` (protobuf merges repeated fields, so appending them to the encoded
    Resource is the same as encoding it with them)."""
    wanted: dict[str, list[str]] = {}
    for name in sorted(names):
        target = resolve(aliases, name)
        if target is not None:
            wanted.setdefault(target, []).append(name)
    chunks = []
    for r in updated:
        extra = wanted.get(r.name)
        if not extra:
            chunks.append(r.delta_chunk)
            continue
        body = _body(r.delta_chunk) + discovery_pb2.Resource(aliases=extra).SerializeToString()
        chunks.append(_RESOURCES_TAG + _varint(len(body)) + body)
    return chunks


def unresolved(aliases: list[str]) -> bytes:
    """Entries for Hosts nothing serves: the alias as the name and the only alias, and no
    resource (what Envoy's VHDS takes as "cannot resolve")."""
    response = discovery_pb2.DeltaDiscoveryResponse(resources=[
        discovery_pb2.Resource(name=alias, aliases=[alias]) for alias in aliases
    ])
    return bytes(response.SerializeToString())


def _body(chunk: bytes) -> bytes:
    """The encoded Resource inside a prepared ``resources`` field."""
    assert chunk[:1] == _RESOURCES_TAG
    position, shift, length = 1, 0, 0
    while True:
        byte = chunk[position]
        length |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            break
        shift += 7
    return chunk[position:position + length]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
