"""Shared fixtures: the golden-file switch, and an in-process xDS server for protocol tests;
at start, test hosts and pods that a crashed run left behind are deleted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest
import structlog

from controlplane.cache import SnapshotCache
from controlplane.server import StreamRegistry, XdsServer, create_server
from tests.support import netns, pods
from tests.support.xds_client import AdsClient


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite golden files from the current output instead of comparing",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """Each worker sweeps; only hosts no live process holds go, so this is safe in
    parallel and beside a concurrent run. Test pods (network namespaces on a bridge) the
    same way."""
    netns.sweep()
    pods.sweep()


@dataclass
class Env:
    cache: SnapshotCache
    registry: StreamRegistry
    channel: grpc.aio.Channel

    def client(self, delta: bool = False) -> AdsClient:
        return AdsClient(self.channel, delta=delta)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    cache = SnapshotCache()
    registry = StreamRegistry()
    server, port = await create_server("127.0.0.1:0", XdsServer(cache, registry))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Env(cache, registry, channel)
    await channel.close()
    await server.stop(0)


@pytest.fixture(autouse=True)
def _structlog_as_it_was() -> Iterator[None]:
    """A command run in-process (``controlplane ca``, ``capture``...) configures structlog
    with ``cache_logger_on_first_use``; left so, every logger first used after it in this
    worker would be cached and ``structlog.testing.capture_logs`` would see nothing."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
