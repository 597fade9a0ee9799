"""What a secured server keeps, and shows, with ``serve --ca-dir`` run in-process (issue 11).

- A proxy's private key goes to that proxy's stream and nowhere else: not in a log line,
  not in ``/debug/*`` (config_dump shows ``[redacted]``, as Envoy's does), not in the
  snapshot store's files, not in a metric.
- 1000 streams with distinct invented identities (each a valid token for a made-up
  ServiceAccount and service) leave no group, no stored snapshot, no identity, no
  certificate and no metric series behind once they closed and the TTL passed; 1000
  refused ones keep nothing at all.
"""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from controlplane import app, resource
from controlplane.security import tokens
from controlplane.security.identity import SpiffeId
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET
from controlplane.settings import ServeSettings
from tests.test_security_protocol import TD, Client, refused, sds_request, secrets

MESH = """
services:
  - name: frontend
    port: 8000
    service_accounts: [frontend]
    endpoints: [{address: 10.0.1.1, port: 8080}]
"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[app.Running]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    settings = ServeSettings(xds_address="127.0.0.1:0", admin_address="127.0.0.1:0",
                             source=f"file:{tmp_path / 'mesh.yaml'}",
                             snapshot_dir=tmp_path / "snapshots", group_ttl=0.5,
                             ca_dir=tmp_path / "ca")
    started = await app.start(settings)
    for _ in range(200):
        if started.pipeline.current is not None:
            break
        await asyncio.sleep(0.05)
    yield started
    await started.stop(0)


def channel_to(running: app.Running) -> grpc.aio.Channel:
    assert running.secured is not None
    bundle = running.secured.trust.current().bundle_pem
    return grpc.aio.secure_channel(f"127.0.0.1:{running.xds_port}",
                                   grpc.ssl_channel_credentials(bundle))


def token(running: app.Running, account: str, node_id: str) -> str:
    assert running.secured is not None
    return tokens.mint(running.secured.trust.current(), SpiffeId(TD, "default", account),
                       node_id, datetime.now(UTC), timedelta(hours=1))


async def admin(running: app.Running, path: str) -> str:
    url = f"http://127.0.0.1:{running.admin_port}{path}"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())
    return await asyncio.to_thread(get)


def key_forms(key_pem: bytes) -> list[str]:
    """How a key could show up in text: its PEM header, its body lines, the PEM as base64
    (protobuf JSON renders bytes so)."""
    body = [line for line in key_pem.decode().splitlines() if "-----" not in line]
    return ["PRIVATE KEY", *body, base64.b64encode(key_pem).decode()[:40]]


def metric_text() -> str:
    lines = []
    for family in REGISTRY.collect():
        for sample in family.samples:
            lines.append(f"{sample.name}{sample.labels} {sample.value}")
    return "\n".join(lines)


async def test_private_keys_never_leave_the_stream(running: app.Running,
                                                   tmp_path: Path) -> None:
    channel = channel_to(running)
    with capture_logs() as logs:
        client = Client(channel, token=token(running, "frontend", "frontend-1"))
        await client.send(**sds_request(client, "frontend-1", "frontend"))
        got = await secrets(client)
        key_pem = got[CERT_SECRET].tls_certificate.private_key.inline_bytes
        assert b"PRIVATE KEY" in key_pem
        forms = key_forms(key_pem)
        await client.send(node=sds_request(client, "frontend-1", "frontend")["node"],
                          type_url=resource.CLUSTER)
        await client.recv(10)
        dump = await admin(running, "/debug/config_dump?node=frontend-1")
        shown = {path: await admin(running, path)
                 for path in ("/debug/proxies", "/debug/snapshots", "/metrics")}
        await client.close()
    assert running.store is not None
    stored = [p for p in (tmp_path / "snapshots").rglob("*") if p.is_file()]
    assert stored, "the store wrote nothing: the test would prove nothing"
    # The dump does show this proxy's secrets, with the key redacted.
    assert CERT_SECRET in dump and ROOT_SECRET in dump and "[redacted]" in dump
    assert "certificate_chain" in dump and "trusted_ca" in dump
    shown["/debug/config_dump"] = dump
    shown["logs"] = "\n".join(repr(line) for line in logs)
    shown["metrics (registry)"] = metric_text()
    shown.update({str(path): path.read_bytes().decode("latin-1") for path in stored})
    assert logs, "no log line captured: the test would prove nothing"
    for where, text in shown.items():
        for form in forms:
            assert form not in text, f"{where} shows the key ({form[:20]}...)"
    assert "spiffe://cluster.local/ns/default/sa/frontend" in shown["/debug/proxies"]
    await channel.close()


async def test_invented_identities_leave_nothing_behind(running: app.Running,
                                                        tmp_path: Path) -> None:
    assert running.secured is not None
    watcher, issuer = running.secured.watcher, running.secured.watcher.issuer
    channel = channel_to(running)
    opened = 0
    for batch in range(10):
        clients = []
        for i in range(100):
            account, node_id = f"made-up-{batch}-{i}", f"x-{batch}-{i}"
            client = Client(channel, token=token(running, account, node_id))
            await client.send(**sds_request(client, node_id, f"bounds-svc-{batch}-{i}"))
            clients.append(client)
        for client in clients:
            got = await secrets(client)
            assert set(got) == {CERT_SECRET, ROOT_SECRET}
            opened += 1
        assert len(watcher) >= 100 and len(issuer) >= 100
        for client in clients:
            await client.close()
    assert opened == 1000
    def folders() -> list[Path]:  # the store removes a forgotten group's folder in its writer
        return [p for p in (tmp_path / "snapshots").iterdir() if p.name.startswith("bounds-svc-")]

    for _ in range(600):
        if (not running.cache.groups() and len(watcher) == 0 and not len(running.registry)
                and not folders()):
            break
        await asyncio.sleep(0.05)
    assert running.cache.groups() == {}
    assert running.cache.snapshots() == {}
    assert len(watcher) == 0 and len(issuer) == 0
    assert len(running.registry) == 0
    assert folders() == []
    text = metric_text()
    assert "made-up-" not in text and "bounds-svc-" not in text and "x-9-" not in text
    await channel.close()


# grpc's asyncio client: a request written as the server ends the call may fail locally,
# and that failure can then stand as the call's status in place of the server's.
LOCAL_WRITE_RACE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def refused_unauthenticated() -> float:
    return REGISTRY.get_sample_value("controlplane_xds_streams_refused_total",
                                     {"reason": "unauthenticated"}) or 0.0


async def test_refused_streams_keep_nothing(running: app.Running) -> None:
    assert running.secured is not None
    before = metric_text().count("\n")
    counted = refused_unauthenticated()
    channel = channel_to(running)
    for batch in range(10):
        clients = [Client(channel, raw=f"Bearer invented-{batch}-{i}") for i in range(100)]
        refusals = await asyncio.gather(*(
            refused(client, again=False, **sds_request(client, f"x-{i}", f"bounds-svc-{i}"))
            for i, client in enumerate(clients)))
        seen = [r for r in refusals if (r.code(), r.details()) != LOCAL_WRITE_RACE]
        assert {r.code() for r in seen} == {grpc.StatusCode.UNAUTHENTICATED}
        assert len(seen) >= 90, [(r.code(), r.details()) for r in refusals][:3]
    # What the server did, whatever the client saw: every stream refused as unauthenticated.
    assert refused_unauthenticated() - counted == 1000
    assert running.cache.groups() == {}
    assert len(running.secured.watcher) == 0 and len(running.registry) == 0
    text = metric_text()
    assert "invented" not in text and "bounds-svc-" not in text
    assert text.count("\n") <= before + 2  # at most the refusal reason's series
    await channel.close()
