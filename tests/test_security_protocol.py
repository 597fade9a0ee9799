"""Zero trust at the xDS edge, with a raw gRPC client over TLS (issue 11): a stream without
a credential, with a garbled one, with another node's, or with a node id or namespace
its credential does not cover is refused with the right status and a message that says
what to fix, and leaves nothing behind; an admitted proxy's SDS answer holds its own
identity's certificate and key and the trust bundle, nothing else; SotW and delta."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.mesh.model import Mesh
from controlplane.mesh.security import MeshIdentity
from controlplane.pipeline import Pipeline
from controlplane.security import tokens
from controlplane.security.authn import LocalTokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.server.secured import Secured, secure
from controlplane.server.tls import server_names
from tests.support.xds_client import AdsClient, node

TD = "cluster.local"
SECRETS = [CERT_SECRET, ROOT_SECRET]


def now() -> datetime:
    return datetime.now(UTC)


class Client(AdsClient):
    """AdsClient with the stream's call metadata (``authorization: Bearer <token>``)."""

    def __init__(self, channel: grpc.aio.Channel, delta: bool = False,
                 token: str | None = None, raw: str | None = None) -> None:
        metadata = [("authorization", raw if raw is not None else f"Bearer {token}")] \
            if token is not None or raw is not None else None
        self.remake = lambda: Client(channel, delta, token, raw)  # the same call, again
        original = channel.stream_stream

        def with_metadata(*args: Any, **kwargs: Any) -> Any:
            method = original(*args, **kwargs)
            return lambda: method(metadata=metadata)
        channel.stream_stream = with_metadata
        try:
            super().__init__(channel, delta)
        finally:
            channel.stream_stream = original


CORE_RACE = "Internal error from Core"
"""What a client's gRPC core says when its write races the server's end of the call."""


@dataclass
class World:
    ca: CertificateAuthority
    cache: SnapshotCache
    pipeline: Pipeline
    registry: StreamRegistry
    secured: Secured
    channel: grpc.aio.Channel
    port: int

    def token(self, account: str, node_id: str | None, namespace: str = "default",
              ttl: timedelta = timedelta(hours=1)) -> str:
        return tokens.mint(self.ca, SpiffeId(TD, namespace, account), node_id, now(), ttl)


def mesh() -> Mesh:
    return Mesh.model_validate({"services": [
        {"name": "frontend", "port": 8000, "service_accounts": ["frontend"],
         "endpoints": [{"address": "10.0.1.1", "port": 8080}]},
        {"name": "ratings", "port": 9080, "service_accounts": ["ratings"],
         "endpoints": [{"address": "10.0.2.1", "port": 8080}]},
    ]}).model_copy(update={"identity": MeshIdentity()})  # cluster.local


@pytest.fixture
async def world() -> AsyncIterator[World]:
    ca = CertificateAuthority.create(TD, now())
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    registry = StreamRegistry()
    secured = secure(cache, ca, lambda: ca, "test CA", TD, LocalTokens(lambda: ca, TD),
                     timedelta(hours=1), *server_names("controlplane-system"))
    xds = XdsServer(secured.watcher, registry, admission=secured.admission)
    assert secured.tls is not None
    server, port = await create_server("127.0.0.1:0", xds, secured.tls.credentials())
    secured.start(30.0)
    pipeline.set_mesh(mesh())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                      grpc.ssl_channel_credentials(ca.bundle_pem))
    yield World(ca, cache, pipeline, registry, secured, channel, port)
    await channel.close()
    await server.stop(0)
    await secured.stop()
    pipeline.close()


@dataclass
class Refusal:
    status: grpc.StatusCode
    text: str

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.text


async def refused(client: Client, again: bool = True, **request: Any) -> Refusal:
    """The status the server ended the call with (a write may fail first, locally, when
    the call is over already: the call's own status is what the server said). Rarely,
    the client's gRPC core loses that race outright and reports its own INTERNAL
    ("Internal error from Core"), which is not the server's answer: the call is made
    again, at most twice (unless ``again`` is false: a test counting the server's
    refusals)."""
    for attempt in range(3 if again else 1):
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await client.send(**request)
        try:
            status = await asyncio.wait_for(client.call.code(), 10)
            details = await client.call.details()
        finally:
            await client.close()
        if status == grpc.StatusCode.INTERNAL and details == CORE_RACE and attempt < 2 \
                and again:
            client = client.remake()
            continue
        break
    return Refusal(status, details or "")


def sds_request(client: Client, node_id: str, service: str, **meta: Any) -> dict[str, Any]:
    names = ({"resource_names_subscribe": SECRETS} if client.delta
             else {"resource_names": SECRETS})
    return {"node": node(node_id, service, **meta), "type_url": resource.SECRET, **names}


def secrets_of(response: Any) -> dict[str, secret_pb2.Secret]:
    found = {}
    for item in response.resources:
        raw = item.resource if hasattr(item, "resource") and item.HasField("resource") else item
        secret = secret_pb2.Secret()
        raw.Unpack(secret)
        found[secret.name] = secret
    return found


async def secrets(client: Client) -> dict[str, secret_pb2.Secret]:
    response = await client.recv(10.0)
    assert response.type_url == resource.SECRET
    await client.ack(response, **({} if client.delta else {"resource_names": SECRETS}))
    return secrets_of(response)


def identity_of(secret: secret_pb2.Secret) -> tuple[list[str], x509.Certificate]:
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier), chain[0]


def key_matches(secret: secret_pb2.Secret, cert: x509.Certificate) -> bool:
    key = serialization.load_pem_private_key(
        secret.tls_certificate.private_key.inline_bytes, password=None)
    return key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


async def nothing_kept(world: World) -> None:
    for _ in range(100):  # the client has its status; the server's handler may be ending
        if not len(world.registry):
            break
        await asyncio.sleep(0.05)
    assert len(world.registry) == 0
    assert world.cache.groups() == {}
    assert len(world.secured.watcher) == 0
    assert len(world.secured.watcher.issuer) == 0


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_no_credential_is_unauthenticated(world: World, delta: bool) -> None:
    client = Client(world.channel, delta)
    error = await refused(client, **sds_request(client, "frontend-1", "frontend"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no credential" in (error.details() or "")
    assert "--token-file" in (error.details() or "")
    await nothing_kept(world)


@pytest.mark.parametrize("raw", ["Bearer not-a-jwt", "Basic dXNlcjpwYXNz", "Bearer "])
async def test_garbled_credential_is_unauthenticated(world: World, raw: str) -> None:
    client = Client(world.channel, raw=raw)
    error = await refused(client, **sds_request(client, "frontend-1", "frontend"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details()
    await nothing_kept(world)


async def test_token_of_another_ca_is_unauthenticated(world: World) -> None:
    other = CertificateAuthority.create(TD, now())
    token = tokens.mint(other, SpiffeId(TD, "default", "frontend"), "frontend-1", now(),
                        timedelta(hours=1))
    client = Client(world.channel, token=token)
    error = await refused(client, **sds_request(client, "frontend-1", "frontend"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    await nothing_kept(world)


async def test_expired_token_is_unauthenticated(world: World) -> None:
    token = tokens.mint(world.ca, SpiffeId(TD, "default", "frontend"), "frontend-1",
                        now() - timedelta(hours=2), timedelta(hours=1))
    client = Client(world.channel, token=token)
    error = await refused(client, **sds_request(client, "frontend-1", "frontend"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    await nothing_kept(world)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_another_nodes_credential_is_permission_denied(world: World,
                                                            delta: bool) -> None:
    """ratings' token, bound to node ratings-1, used by a stream claiming frontend-1."""
    client = Client(world.channel, delta, token=world.token("ratings", "ratings-1"))
    error = await refused(client, **sds_request(client, "frontend-1", "frontend"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.details() or ""
    assert "'frontend-1'" in details and "'ratings-1'" in details
    assert "mint the token for this node" in details
    await nothing_kept(world)


async def test_namespace_not_the_credentials_is_permission_denied(world: World) -> None:
    client = Client(world.channel, token=world.token("frontend", "frontend-1"))
    error = await refused(client, **sds_request(client, "frontend-1", "frontend",
                                                namespace="prod"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "namespace 'prod'" in (error.details() or "")
    await nothing_kept(world)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_sds_answers_only_the_proxys_own_identity(world: World, delta: bool) -> None:
    frontend = Client(world.channel, delta, token=world.token("frontend", "frontend-1"))
    ratings = Client(world.channel, delta, token=world.token("ratings", "ratings-1"))
    await frontend.send(**sds_request(frontend, "frontend-1", "frontend"))
    await ratings.send(**sds_request(ratings, "ratings-1", "ratings"))
    mine, theirs = await secrets(frontend), await secrets(ratings)
    for got, account in ((mine, "frontend"), (theirs, "ratings")):
        assert set(got) == set(SECRETS)
        uris, cert = identity_of(got[CERT_SECRET])
        assert uris == [f"spiffe://{TD}/ns/default/sa/{account}"]
        assert key_matches(got[CERT_SECRET], cert)
        assert got[ROOT_SECRET].validation_context.trusted_ca.inline_bytes == world.ca.bundle_pem
        assert not got[ROOT_SECRET].HasField("tls_certificate")
    assert (mine[CERT_SECRET].tls_certificate.private_key.inline_bytes
            != theirs[CERT_SECRET].tls_certificate.private_key.inline_bytes)
    # The group snapshot (what the store and /debug/snapshots see) holds no key.
    for snapshot in world.cache.snapshots().values():
        typed = snapshot.get(resource.SECRET)
        assert typed is None or not typed.resources
    await frontend.close()
    await ratings.close()


async def test_a_proxy_cannot_name_another_identitys_secret(world: World) -> None:
    """Asking for more names than its own two gets nothing more (there is nothing more)."""
    client = Client(world.channel, token=world.token("frontend", "frontend-1"))
    await client.send(node=node("frontend-1", "frontend"), type_url=resource.SECRET,
                      resource_names=[*SECRETS, "spiffe://cluster.local/ns/default/sa/ratings",
                                      "ratings"])
    got = await secrets(client)
    assert set(got) == set(SECRETS)
    assert identity_of(got[CERT_SECRET])[0] == [f"spiffe://{TD}/ns/default/sa/frontend"]
    await client.close()


async def test_plaintext_client_cannot_connect(world: World) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{world.port}") as plain:
        client = Client(plain, token=world.token("frontend", "frontend-1"))
        error = await refused(client, **sds_request(client, "frontend-1", "frontend"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    await nothing_kept(world)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_rotation_pushes_a_new_certificate_on_the_open_stream(delta: bool) -> None:
    """Workload certificates of 3 s (renewed at half): the open stream gets a new one."""
    ca = CertificateAuthority.create(TD, now())
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    secured = secure(cache, ca, lambda: ca, "test CA", TD, LocalTokens(lambda: ca, TD),
                     timedelta(seconds=3), *server_names("controlplane-system"))
    xds = XdsServer(secured.watcher, StreamRegistry(), admission=secured.admission)
    assert secured.tls is not None
    server, port = await create_server("127.0.0.1:0", xds, secured.tls.credentials())
    secured.start(30.0)
    pipeline.set_mesh(mesh())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                      grpc.ssl_channel_credentials(ca.bundle_pem))
    try:
        token = tokens.mint(ca, SpiffeId(TD, "default", "frontend"), "frontend-1", now(),
                            timedelta(hours=1))
        client = Client(channel, delta, token=token)
        await client.send(**sds_request(client, "frontend-1", "frontend"))
        first = identity_of((await secrets(client))[CERT_SECRET])[1]
        second_secrets = await secrets(client)  # pushed by the rotation timer
        uris, second = identity_of(second_secrets[CERT_SECRET])
        assert second.serial_number != first.serial_number
        assert uris == [f"spiffe://{TD}/ns/default/sa/frontend"]
        assert key_matches(second_secrets[CERT_SECRET], second)
        await client.close()
    finally:
        await channel.close()
        await server.stop(0)
        await secured.stop()
        pipeline.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_stream_ends_when_its_credential_expires(world: World, delta: bool) -> None:
    """A revoked or expired credential is not served past its lifetime: the stream ends
    with UNAVAILABLE, and Envoy reconnects with the token file it has now."""
    client = Client(world.channel, delta,
                    token=world.token("frontend", "frontend-1", ttl=timedelta(seconds=3)))
    await client.send(**sds_request(client, "frontend-1", "frontend"))
    await secrets(client)
    for _ in range(100):
        if client.error is not None:
            break
        await asyncio.sleep(0.1)
    assert client.error is not None, "the stream outlived its credential"
    assert client.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "expired" in (client.error.details() or "")
    await client.close()


async def test_fetch_secrets_is_authenticated_too(world: World) -> None:
    """The unary FetchSecrets answers the caller's own identity, and nobody else."""
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(world.channel)
    request = discovery_pb2.DiscoveryRequest(node=node("frontend-1", "frontend"),
                                             type_url=resource.SECRET, resource_names=SECRETS)
    token = world.token("frontend", "frontend-1")
    answer = await stub.FetchSecrets(request, metadata=(("authorization", f"Bearer {token}"),))
    got = secrets_of(answer)
    assert set(got) == set(SECRETS)
    assert identity_of(got[CERT_SECRET])[0] == [f"spiffe://{TD}/ns/default/sa/frontend"]
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.FetchSecrets(request)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    other = world.token("ratings", "ratings-1")
    with pytest.raises(grpc.aio.AioRpcError) as stolen:
        await stub.FetchSecrets(request, metadata=(("authorization", f"Bearer {other}"),))
    assert stolen.value.code() == grpc.StatusCode.PERMISSION_DENIED
