"""Kubernetes credentials at the xDS edge (issue 11): a sidecar's projected ServiceAccount
token, reviewed with TokenReview by the official client against the API server double (the
real wire format, the shipped RBAC). The identity comes from the token, never from the
node; a pod's token serves only node id ``<pod>.<namespace>``; answers are cached by token
hash for a bounded time and number; a token of a deleted pod stops working."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from kubernetes import client

from controlplane.cache import SnapshotCache
from controlplane.pipeline import Pipeline
from controlplane.security.authn import AuthError
from controlplane.security.ca import CertificateAuthority
from controlplane.security.sds import CERT_SECRET
from controlplane.security.tokenreview import TokenReviewAuthenticator
from controlplane.server import StreamRegistry, XdsServer, create_server
from controlplane.server.secured import Secured, secure
from controlplane.server.tls import server_names
from controlplane.sources.kubernetes import api_client
from tests.kube.apiserver import ApiServerDouble
from tests.test_kube_double_tokens import request_token, running_pod
from tests.test_security_protocol import (
    TD,
    Client,
    identity_of,
    mesh,
    refused,
    sds_request,
    secrets,
)


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(crd_installed=False).start()
    yield double
    double.stop()
    assert not double.server_errors


@pytest.fixture
def admin(api: ApiServerDouble, tmp_path: Path) -> Iterator[client.ApiClient]:
    with api_client(api.kubeconfig(tmp_path / "admin", admin=True)) as found:
        yield found


@pytest.fixture
def server(api: ApiServerDouble, tmp_path: Path) -> Iterator[client.ApiClient]:
    """The control plane's own ServiceAccount: the shipped RBAC applies."""
    with api_client(api.kubeconfig(tmp_path / "server")) as found:
        yield found


def pod_token(api: ApiServerDouble, admin: client.ApiClient, pod: str, account: str,
              namespace: str = "shop", audiences: list[str] | None = None,
              bound: bool = True) -> str:
    running_pod(api, pod, account, namespace)
    issued = request_token(admin, account, pod if bound else None, namespace=namespace,
                           audiences=audiences, seconds=900)
    assert issued.status is not None
    return str(issued.status.token)


async def test_a_pod_token_proves_its_service_account_and_pod(
        api: ApiServerDouble, admin: client.ApiClient, server: client.ApiClient) -> None:
    reviewer = TokenReviewAuthenticator(server, "controlplane", TD)
    token = pod_token(api, admin, "ratings-v1-abc", "ratings")
    caller = await reviewer.authenticate(token)
    assert str(caller.identity) == "spiffe://cluster.local/ns/shop/sa/ratings"
    assert caller.pod == "ratings-v1-abc" and caller.node_id is None
    assert caller.expires is not None and caller.expires > datetime.now(UTC)
    assert reviewer.reviews == 1
    again = await reviewer.authenticate(token)  # cached: no second review
    assert again == caller and reviewer.reviews == 1


async def test_refusals_say_what_to_fix(api: ApiServerDouble, admin: client.ApiClient,
                                        server: client.ApiClient) -> None:
    reviewer = TokenReviewAuthenticator(server, "controlplane", TD)
    with pytest.raises(AuthError) as none:
        await reviewer.authenticate(None)
    assert none.value.status == "UNAUTHENTICATED" and "no credential" in str(none.value)
    with pytest.raises(AuthError) as garbage:
        await reviewer.authenticate("not-a-token")
    assert garbage.value.status == "UNAUTHENTICATED"
    assert "/var/run/secrets/controlplane/token" in str(garbage.value)
    other = pod_token(api, admin, "reviews-1", "reviews", audiences=["someone-else"])
    with pytest.raises(AuthError) as audience:
        await reviewer.authenticate(other)
    assert audience.value.status == "UNAUTHENTICATED"
    unbound = pod_token(api, admin, "reviews-2", "reviews", bound=False)
    with pytest.raises(AuthError) as loose:
        await reviewer.authenticate(unbound)
    assert loose.value.status == "PERMISSION_DENIED"
    assert "not bound to a pod" in str(loose.value)
    assert len(reviewer) == 0  # failures are never kept


async def test_a_deleted_pods_token_stops_working(api: ApiServerDouble,
                                                  admin: client.ApiClient,
                                                  server: client.ApiClient) -> None:
    """Kept for ``ttl`` at most (0 here): the next review sees the pod is gone."""
    reviewer = TokenReviewAuthenticator(server, "controlplane", TD, ttl=0.0)
    token = pod_token(api, admin, "ratings-v1-abc", "ratings")
    await reviewer.authenticate(token)
    api.delete("pods", "shop", "ratings-v1-abc")
    with pytest.raises(AuthError) as gone:
        await reviewer.authenticate(token)
    assert gone.value.status == "UNAUTHENTICATED"


async def test_the_cache_is_bounded(api: ApiServerDouble, admin: client.ApiClient,
                                    server: client.ApiClient) -> None:
    reviewer = TokenReviewAuthenticator(server, "controlplane", TD, max_entries=2)
    for i in range(4):
        await reviewer.authenticate(pod_token(api, admin, f"ratings-{i}", "ratings"))
    assert len(reviewer) == 2


async def test_cache_never_outlives_the_token(api: ApiServerDouble, admin: client.ApiClient,
                                              server: client.ApiClient) -> None:
    token = pod_token(api, admin, "ratings-1", "ratings")
    later = datetime.now(UTC) + timedelta(seconds=880)  # 20 s before the token expires
    reviewer = TokenReviewAuthenticator(server, "controlplane", TD, ttl=60.0,
                                        clock=lambda: later)
    await reviewer.authenticate(token)
    await reviewer.authenticate(token)
    assert len(reviewer) == 1 and reviewer.reviews == 1  # kept until its exp ...
    reviewer._clock = lambda: later + timedelta(seconds=25)
    await reviewer.authenticate(token)
    assert reviewer.reviews == 2  # ... and not a moment past it: asked again


@dataclass
class World:
    api: ApiServerDouble
    admin: client.ApiClient
    secured: Secured
    channel: grpc.aio.Channel
    cache: SnapshotCache


@pytest.fixture
async def world(api: ApiServerDouble, admin: client.ApiClient,
                server: client.ApiClient) -> AsyncIterator[World]:
    ca = CertificateAuthority.create(TD, datetime.now(UTC))
    cache = SnapshotCache()
    pipeline = Pipeline(cache)
    secured = secure(cache, ca, lambda: ca, "test CA", TD,
                     TokenReviewAuthenticator(server, "controlplane", TD),
                     timedelta(hours=1), *server_names("controlplane-system"))
    assert secured.tls is not None
    xds = XdsServer(secured.watcher, StreamRegistry(), admission=secured.admission)
    grpc_server, port = await create_server("127.0.0.1:0", xds, secured.tls.credentials())
    pipeline.set_mesh(mesh())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                      grpc.ssl_channel_credentials(ca.bundle_pem))
    yield World(api, admin, secured, channel, cache)
    await channel.close()
    await grpc_server.stop(0)
    pipeline.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_identity_comes_from_the_token_not_the_node(world: World, delta: bool) -> None:
    token = pod_token(world.api, world.admin, "ratings-v1-abc", "ratings")
    stream = Client(world.channel, delta, token=token)
    # It claims another service account in its metadata: ignored.
    await stream.send(**sds_request(stream, "ratings-v1-abc.shop", "ratings",
                                    namespace="shop", service_account="admin"))
    got = await secrets(stream)
    assert identity_of(got[CERT_SECRET])[0] == ["spiffe://cluster.local/ns/shop/sa/ratings"]
    await stream.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_another_pods_token_is_permission_denied(world: World, delta: bool) -> None:
    token = pod_token(world.api, world.admin, "ratings-v1-abc", "ratings")
    stream = Client(world.channel, delta, token=token)
    error = await refused(stream, **sds_request(stream, "frontend-1.shop", "frontend",
                                                namespace="shop"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.details() or ""
    assert "'frontend-1.shop'" in details and "ratings-v1-abc.shop" in details
    assert world.cache.groups() == {} and len(world.secured.watcher) == 0


async def test_a_token_of_another_namespace_is_permission_denied(world: World) -> None:
    token = pod_token(world.api, world.admin, "ratings-v1-abc", "ratings")
    stream = Client(world.channel, token=token)
    error = await refused(stream, **sds_request(stream, "ratings-v1-abc.shop", "ratings",
                                                namespace="default"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "namespace 'default'" in (error.details() or "")


async def test_serve_source_kubernetes_is_secured_by_default(api: ApiServerDouble,
                                                             admin: client.ApiClient,
                                                             tmp_path: Path) -> None:
    """``serve --source kubernetes``: the CA made in its Secret (shared by replicas), xDS
    over TLS, sidecars authenticated by TokenReview; no flag needed."""
    from controlplane import app, deploy
    from controlplane.settings import ServeSettings

    settings = ServeSettings(source="kubernetes", kubeconfig=api.kubeconfig(tmp_path / "kc"),
                             xds_address="127.0.0.1:0", admin_address="127.0.0.1:0",
                             snapshot_keep=0, webhook_namespace=deploy.NAMESPACE)
    running = await app.start(settings)
    try:
        assert running.secured is not None and running.secured.tls is not None
        secret = api.get("secrets", deploy.NAMESPACE, "controlplane-ca")
        assert {"tls.crt", "tls.key", "ca.crt"} <= set(secret["data"])
        bundle = running.secured.trust.current().bundle_pem
        channel = grpc.aio.secure_channel(f"127.0.0.1:{running.xds_port}",
                                          grpc.ssl_channel_credentials(bundle))
        token = pod_token(api, admin, "ratings-v1-abc", "ratings")
        stream = Client(channel, token=token)
        await stream.send(**sds_request(stream, "ratings-v1-abc.shop", "ratings",
                                        namespace="shop"))
        got = await secrets(stream)
        assert identity_of(got[CERT_SECRET])[0] == ["spiffe://cluster.local/ns/shop/sa/ratings"]
        await stream.close()
        anonymous = Client(channel)
        error = await refused(anonymous, **sds_request(anonymous, "x.shop", "ratings",
                                                       namespace="shop"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        await channel.close()
    finally:
        await running.stop(0)
