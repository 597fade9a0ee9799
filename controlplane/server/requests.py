"""State-of-the-world requests, read without their names.

Envoy's ACK repeats every name it subscribes to: at 1,000 services an EDS ACK carries
1,000 cluster names (about 50 KB), and each stream sends one per change. Parsing those
into strings only to find them unchanged was most of the cost of an ACK. So the
streams parse requests as ``SotwRequest``: the same message without its
``resource_names`` field, which protobuf then keeps as raw bytes (unknown fields).
``names_key`` gives those bytes (and the type) in one piece to compare; the names
themselves are parsed only when the key differs from the stream's last one.

The comparison is a byte comparison with the stream's last key, which ``NAME_KEYS``
shares between the streams that send the same one: comparing 50 KB takes about 1 us,
hashing it 15 us (a tenth of an ACK's cost at 1,000 streams).

Most requests are not parsed at all: the streams receive the bytes, and an ACK of the
last push whose names are those of the client's last request is, byte for byte, field 1
(the version sent), the names as the client encoded them last time (the end of its
``names_key``), fields 4 (the type) and 5 (the nonce sent), in that order, as Envoy
writes it. ``SotwStream`` compares the bytes with those pieces (no copy, no parse);
anything else is parsed (``read_request``). Equal bytes say the same as the last
request did, so nothing is assumed about a client that encodes differently: its
requests take the longer way.
"""

from __future__ import annotations

import weakref
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from controlplane.server.stream import MalformedRequest, ProtocolError


def _light_class() -> Any:
    full = discovery_pb2.DiscoveryRequest.DESCRIPTOR
    source = descriptor_pb2.FileDescriptorProto()
    full.file.CopyToProto(source)
    message = descriptor_pb2.DescriptorProto()
    full.CopyToProto(message)
    kept = [f for f in message.field if f.name != "resource_names"]
    del message.field[:]
    message.field.extend(kept)
    message.name = "SotwRequest"
    light = descriptor_pb2.FileDescriptorProto(
        name="controlplane/server/sotw_request.proto", package="controlplane.internal",
        syntax=source.syntax, dependency=list(source.dependency), message_type=[message])
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(light.name)
    except KeyError:
        pool.Add(light)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("controlplane.internal.SotwRequest"))


SotwRequest: Any = _light_class()


def read_request(data: bytes) -> Any:
    """A SotwRequest from the bytes a stream received."""
    try:
        return SotwRequest.FromString(data)
    except Exception as exc:
        raise MalformedRequest.of("DiscoveryRequest", str(exc)) from exc


def names_key(request: Any) -> bytes:
    """The request's names, type and error as bytes: equal for two requests that name the
    same names in the same order. Clears the version, nonce and node, once read."""
    request.version_info = ""
    request.response_nonce = ""
    if request.HasField("node"):
        request.ClearField("node")
    return bytes(request.SerializeToString())


class NamesKey:
    """One request key, held by every stream whose last request had it."""

    __slots__ = ("__weakref__", "key")

    def __init__(self, key: bytes) -> None:
        self.key = key


class NameKeys:
    """Interns request keys: a thousand streams naming the same thousand clusters keep one
    copy (a key no stream holds any more is dropped, by weak reference)."""

    def __init__(self) -> None:
        self._keys: weakref.WeakValueDictionary[bytes, NamesKey] = (
            weakref.WeakValueDictionary())

    def intern(self, key: bytes) -> NamesKey:
        held = self._keys.get(key)
        if held is None:
            held = self._keys[key] = NamesKey(key)
        return held

    def __len__(self) -> int:
        return len(self._keys)


NAME_KEYS = NameKeys()


def names_of(key: bytes) -> list[str]:
    """The names in a key (from either request class)."""
    try:
        return list(discovery_pb2.DiscoveryRequest.FromString(key).resource_names)
    except DecodeError as exc:
        raise ProtocolError(
            f"the request's resource_names do not parse ({str(exc)[:200]}); each must be "
            "a UTF-8 string") from exc
