"""The bytes of xDS messages as the bench's simulated sidecars read and write them,
without parsing or building whole messages: a thousand streams share the server's CPUs.

``Header``, ``Packed`` and ``Named`` read only the fields the bench needs;
``read_header`` finds a response's version, type and nonce without a parse; ``field``
encodes a string field as protobuf (and Envoy) would.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message


def _light_messages() -> dict[str, type[Message]]:
    """Messages with only the fields the bench reads. ``Header``: the scalar fields that
    DiscoveryResponse (version_info=1, type_url=4, nonce=5) and DeltaDiscoveryResponse
    (system_version_info=1, ...) share; parsing it skips the resources. ``Packed``: a
    SotW response's resources (field 2, Any: value=2) as bytes; ``Named``: field 1, the
    name of a Cluster."""
    string, repeated = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, 3
    proto = descriptor_pb2.FileDescriptorProto(
        name="bench/xds_fleet_light.proto", package="bench", syntax="proto3")
    header = proto.message_type.add(name="Header")
    for name, number in (("version", 1), ("type_url", 4), ("nonce", 5)):
        header.field.add(name=name, number=number, type=string, label=1)
    any_ = proto.message_type.add(name="AnyBytes")
    any_.field.add(name="value", number=2, label=1,
                   type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES)
    packed = proto.message_type.add(name="Packed")
    packed.field.add(name="resources", number=2, label=repeated, type_name=".bench.AnyBytes",
                     type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE)
    named = proto.message_type.add(name="Named")
    named.field.add(name="name", number=1, type=string, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"bench.{name}"))
            for name in ("Header", "Packed", "Named")}


_LIGHT = _light_messages()
Header, Packed, Named = _LIGHT["Header"], _LIGHT["Packed"], _LIGHT["Named"]


def as_bytes(data: bytes) -> bytes:
    """A response as received (the deserializer of the simulated streams)."""
    return data


_HEADER_FIELDS = {1: 0, 4: 1, 5: 2}  # version, type_url, nonce: in both response kinds


def read_header(raw: bytes) -> tuple[str, str, str]:
    """A response's version, type URL and nonce, read from the fields before its first
    resource (field 2), where this server writes them: a thousand streams each parsing
    a 300 KB response to find them cost the bench's CPU, which the server shares. When
    they are not all there, the whole message is parsed (``Header``)."""
    found: list[str | None] = [None, None, None]
    pos, end = 0, len(raw)
    while pos < end:
        tag = raw[pos]
        if tag & 7 != 2 or tag > 0x7F or tag >> 3 == 2:
            break  # a resource, or a field this shortcut does not read
        pos, size, shift = pos + 1, 0, 0
        while pos < end:
            byte = raw[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        slot = _HEADER_FIELDS.get(tag >> 3)
        if slot is not None:
            found[slot] = raw[pos:pos + size].decode()
        pos += size
    version, type_url, nonce = found
    if version is None or type_url is None or nonce is None:
        header: Any = Header.FromString(raw)
        return header.version, header.type_url, header.nonce
    return version, type_url, nonce


def field(number: int, text: str) -> bytes:
    """A string field as protobuf encodes it (left out when empty)."""
    value = text.encode()
    if not value:
        return b""
    size, prefix = len(value), bytearray((number << 3 | 2,))
    while size > 0x7F:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + value
