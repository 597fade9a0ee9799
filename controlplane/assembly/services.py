"""Each service's clusters and load assignments, translated and encoded once per change.

A service that did not change between two meshes keeps its EncodedService object, so
"which services changed" is an identity test, and the layers that hold it are derived
from the previous ones by replacing only those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.snapshot import Resource, encode_resource
from controlplane.mesh.model import Service
from controlplane.translator import resource_name, service_resources
from controlplane.translator.locality import prefer_zone


@dataclass(frozen=True, slots=True)
class EncodedService:
    service: Service
    clusters: tuple[Resource, ...]  # one per service port
    load_assignments: tuple[Resource, ...]  # one per EDS cluster
    routing: dict[str, Any]  # what the route tables see of it: all but its endpoints
    zoned: dict[str, tuple[Resource, ...]] = field(default_factory=dict)  # by proxy zone

    @property
    def size(self) -> int:
        return sum(r.size for r in (*self.clusters, *self.load_assignments))

    def assignments(self, zone: str) -> tuple[Resource, ...]:
        """Its load assignments as a proxy in ``zone`` gets them (own zone first),
        encoded once per zone while the service is unchanged."""
        if not zone:
            return self.load_assignments
        variant = self.zoned.get(zone)
        if variant is None:
            variant = self.zoned[zone] = tuple(_zoned(a, zone) for a in self.load_assignments)
        return variant


def encode_service(service: Service, old: EncodedService | None) -> EncodedService:
    """Translate and encode ``service``; resources equal to ``old``'s keep their objects.
    Raises whatever the translator or protobuf raise (the build isolates the service)."""
    made = service_resources(service)
    clusters = _encode(resource.CLUSTER, made.clusters, old.clusters if old else ())
    assignments = _encode(resource.ENDPOINT, made.load_assignments,
                          old.load_assignments if old else ())
    return EncodedService(service, clusters, assignments, routing(service))


def routing(service: Service) -> dict[str, Any]:
    return service.model_dump(exclude={"endpoints"})


def _encode(type_url: str, messages: Sequence[Message],
            old: tuple[Resource, ...]) -> tuple[Resource, ...]:
    """Encode each message against the old resource of the same name, if any."""
    by_name = {r.name: r for r in old}
    encoded = []
    for message in messages:
        name = resource_name(message)
        encoded.append(encode_resource(type_url, name, message, by_name.get(name)))
    return tuple(encoded)


def _zoned(assignment: Resource, zone: str) -> Resource:
    preferred = prefer_zone(assignment.message, zone)
    if preferred is None:
        return assignment
    return encode_resource(resource.ENDPOINT, assignment.name, preferred)
