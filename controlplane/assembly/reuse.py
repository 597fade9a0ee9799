"""Layers (a namespace's route table, a captured egress listener, loopback egress
listeners) made again only as new objects when their bytes changed."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

from controlplane.cache.layers import Layer
from controlplane.cache.snapshot import encode_resource
from controlplane.translator import resource_name


def one_resource_layer(type_url: str, message: Message, old: Layer | None) -> Layer:
    """A layer holding ``message`` alone; ``old`` itself when ``message`` encodes to the
    bytes ``old`` already holds, so its version stays and no group holding it is pushed."""
    name = resource_name(message)
    prior = old.resources.get(name) if old is not None else None
    made = encode_resource(type_url, name, message, prior)
    if old is not None and made is prior:
        return old
    return Layer.of(type_url, [made])


def resources_layer(type_url: str, messages: Sequence[Message], old: Layer | None) -> Layer:
    """A layer holding ``messages``, each resource reusing ``old``'s encoding when its
    bytes are the same; ``old`` itself when the whole layer is."""
    made = []
    for message in messages:
        name = resource_name(message)
        prior = old.resources.get(name) if old is not None else None
        made.append(encode_resource(type_url, name, message, prior))
    found = Layer.of(type_url, made)
    return old if old is not None and old.version == found.version else found
