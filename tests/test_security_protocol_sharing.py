"""Per-identity secrets cost what they must and no more (cache/secrets.py, no gRPC): a
proxy without an identity gets its group's snapshot object itself (issue 9's sharing); the
streams of one identity in one group share one derived snapshot; a change of the group
makes one new derived snapshot per (group, identity), with the group's other types as they
are; an identity idle for the TTL is forgotten with its key."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.cache.secrets import REDACTED, SecretWatcher
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.security.ca import CertificateAuthority
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET, Issuer
from tests.test_security_protocol import TD, mesh

FRONTEND = f"spiffe://{TD}/ns/default/sa/frontend"
RATINGS = f"spiffe://{TD}/ns/default/sa/ratings"


def world() -> tuple[SnapshotCache, Pipeline, SecretWatcher]:
    ca = CertificateAuthority.create(TD, datetime.now(UTC))
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    watcher = SecretWatcher(cache, Issuer(lambda: ca, timedelta(hours=1)), lambda: ca)
    return cache, pipeline, watcher


def proxy(node_id: str, workload: str = "") -> ProxyIdentity:
    return ProxyIdentity(node_id=node_id, service="frontend", workload=workload)


def test_sharing_holds() -> None:
    cache, pipeline, watcher = world()
    plain, one, two = proxy("p-1"), proxy("f-1", FRONTEND), proxy("f-2", FRONTEND)
    other = proxy("r-1", RATINGS)  # another identity in the same group
    try:
        for each in (plain, one, two, other):
            watcher.connect(each)
        pipeline.set_mesh(mesh())
        pipeline.build(plain)
        base = cache.current(plain)
        assert base is not None
        assert watcher.current(plain) is base  # no identity: the group's own object
        first = watcher.current(one)
        assert first is not None and first is watcher.current(two)  # shared by the pair
        theirs = watcher.current(other)
        assert theirs is not None and theirs is not first
        for derived in (first, theirs):
            for type_url, typed in base.types.items():
                if type_url != resource.SECRET:
                    assert derived.types[type_url] is typed  # the group's, not a copy
            assert set(derived.types[resource.SECRET].resources) == {CERT_SECRET, ROOT_SECRET}
        shown = first.types[resource.SECRET].resources[CERT_SECRET].message
        assert shown.tls_certificate.private_key.inline_string == REDACTED
        # A new mesh: one new derived snapshot per pair, still shared.
        changed = mesh()
        changed.services[1].endpoints[0] = changed.services[1].endpoints[0].model_copy(
            update={"port": 8081})
        pipeline.set_mesh(changed)
        pipeline.build(plain)
        again = watcher.current(one)
        assert again is not None and again is not first and again is watcher.current(two)
        assert again.types[resource.SECRET] is first.types[resource.SECRET]  # same secrets
    finally:
        pipeline.close()


def test_an_idle_identity_is_forgotten_with_its_key() -> None:
    _, pipeline, watcher = world()
    one = proxy("f-1", FRONTEND)
    try:
        watcher.connect(one)
        assert len(watcher) == 1 and len(watcher.issuer) == 1
        assert watcher.expire(ttl=0.0) == []  # a stream is open: kept
        watcher.disconnect(one)
        moved = dataclasses.replace(one, zone="zone-b")  # another group, same identity
        watcher.connect(moved)
        watcher.disconnect(moved)
        assert watcher.expire(ttl=3600.0) == []  # idle, not for long yet
        assert watcher.expire(ttl=0.0) == [FRONTEND]
        assert len(watcher) == 0 and len(watcher.issuer) == 0
    finally:
        pipeline.close()
