"""A raw xDS client over gRPC for protocol tests: writes requests, queues responses."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2


def node(node_id: str = "proxy-1", service: str = "frontend", **metadata: Any) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return base_pb2.Node(id=node_id, cluster=service, metadata=meta)


class AdsClient:
    """One ADS stream (SotW or delta) with a background reader."""

    def __init__(self, channel: grpc.aio.Channel, delta: bool = False) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.delta = delta
        self.call: Any = (stub.DeltaAggregatedResources() if delta
                          else stub.StreamAggregatedResources())
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.error: grpc.aio.AioRpcError | None = None
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                await self.responses.put(message)
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def send(self, **fields: Any) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        await self.call.write(cls(**fields))

    async def ack(self, response: Any, **fields: Any) -> None:
        """ACK ``response`` (SotW: with its version and the names given)."""
        if self.delta:
            await self.send(type_url=response.type_url, response_nonce=response.nonce, **fields)
        else:
            await self.send(type_url=response.type_url, version_info=response.version_info,
                            response_nonce=response.nonce, **fields)

    async def nack(self, response: Any, message: str = "rejected", **fields: Any) -> None:
        status = status_pb2.Status(code=3, message=message)
        if self.delta:
            await self.send(type_url=response.type_url, response_nonce=response.nonce,
                            error_detail=status, **fields)
        else:
            await self.send(type_url=response.type_url, response_nonce=response.nonce,
                            error_detail=status, **fields)

    async def recv(self, timeout: float = 3.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing(self, wait: float = 0.4) -> bool:
        """True if no response arrives within ``wait`` seconds."""
        try:
            message = await asyncio.wait_for(self.responses.get(), wait)
        except TimeoutError:
            return True
        raise AssertionError(f"expected no response, got one for {message.type_url}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
