"""Each service's clusters and load assignments, translated and encoded once per change.

A service that did not change between two meshes keeps its EncodedService object, so
"which services changed" is an identity test, and the layers that hold it are derived
from the previous ones by replacing only those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.snapshot import Resource, encode_resource
from controlplane.mesh.model import Mesh, Service
from controlplane.translator import resource_name, service_resources
from controlplane.translator.capture import headless_targets
from controlplane.translator.locality import prefer_zone
from controlplane.translator.security import Upstream, upstream


@dataclass(frozen=True, slots=True)
class EncodedService:
    service: Service
    clusters: tuple[Resource, ...]  # one per service port
    load_assignments: tuple[Resource, ...]  # one per EDS cluster
    routing: dict[str, Any]  # what the route tables see of it: all but its endpoints
    listening: Any = ()  # what captured listeners see of its endpoints (headless addresses)
    zoned: dict[str, tuple[Resource, ...]] = field(default_factory=dict)  # by proxy zone
    security: Upstream | None = None  # how callers use mTLS to it (from the mesh's frame)

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


@dataclass(slots=True)
class Encoded:
    """A mesh's services, encoded against the previous build's."""

    services: dict[str, EncodedService] = field(default_factory=dict)
    served: list[Service] = field(default_factory=list)  # rejected ones at last good
    rerouted: set[str] = field(default_factory=set)  # routing changed, added or removed
    relistened: set[str] = field(default_factory=set)  # so did its captured chains
    encoded_bytes: int = 0


def encode_services(mesh: Mesh, before: Mapping[str, EncodedService],
                    rejected: dict[str, str]) -> Encoded:
    """Every service of ``mesh``, reusing ``before``'s for those unchanged. A service
    whose translation fails is added to ``rejected`` (which may already name services
    known to break the route tables) and kept at its old version, if any."""
    done = Encoded()
    for service in mesh.services:
        key = service.key
        old = before.get(key)
        security = upstream(mesh, service)
        if old is not None and (old.service is service or old.service == service) \
                and old.security == security:
            done.services[key] = old
            done.served.append(old.service)
            continue
        try:
            if key in rejected:
                raise _Replaced(rejected[key])
            encoded = encode_service(service, old, security)
        except Exception as exc:
            if not isinstance(exc, _Replaced):
                rejected[key] = f"{type(exc).__name__}: {exc}"
            if old is not None:  # its last good version stays
                done.services[key] = old
                done.served.append(old.service)
            continue
        if old is None or old.routing != encoded.routing:
            done.rerouted.add(key)
            done.relistened.add(key)
        elif old.listening != encoded.listening:
            done.relistened.add(key)
        # all serialized, even those that come out equal to the old ones
        done.encoded_bytes += encoded.size
        done.services[key] = encoded
        done.served.append(service)
    done.rerouted.update(k for k in before if k not in done.services)
    done.relistened.update(k for k in before if k not in done.services)
    return done


class _Replaced(Exception):
    """A service already found to break the route tables."""


def encode_service(service: Service, old: EncodedService | None,
                   security: Upstream | None = None) -> EncodedService:
    """Translate and encode ``service``; resources equal to ``old``'s keep their objects.
    ``security``: how callers use mTLS to it (its mode and the mesh identity live outside
    the service, so a change there re-encodes it too). Raises whatever the translator or
    protobuf raise (the build isolates the service)."""
    made = service_resources(service) if security is None else service_resources(service,
                                                                                  security)
    clusters = _encode(resource.CLUSTER, made.clusters, old.clusters if old else ())
    assignments = _encode(resource.ENDPOINT, made.load_assignments,
                          old.load_assignments if old else ())
    return EncodedService(service, clusters, assignments, routing(service),
                          headless_targets(service), security=security)


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
