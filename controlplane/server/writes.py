"""Writing responses: large writes take turns, small ones never wait.

A control-plane rollout reconnects every sidecar at once, and each wants its whole
config (hundreds of KB at 1,000 services). Encoded and written all at once, those
responses fill memory with copies, and the small endpoint update that an already
connected sidecar waits for queues behind all of them. So a response of
``Limits.large_write_bytes`` or more is encoded and written only once it has one of
``max_large_writes`` turns, handed out in arrival order; its turn ends when the write
does, or after ``large_write_turn_seconds`` (a client that does not read keeps being
written to, but without a turn, so it holds nobody up). Smaller responses are written
at once, whatever is waiting.

A stream writes one push at a time and builds the next from the latest snapshot, so a
slow reader is never more than one snapshot behind: it gets the latest, not every one.
"""

from __future__ import annotations

import asyncio

import grpc

from controlplane.server.limits import Limits
from controlplane.server.stream import Push


class ClientGone(Exception):
    """The client went away while we were writing to it: a normal end of a stream."""


async def write_now(context: grpc.aio.ServicerContext, payload: bytes) -> None:
    """A write fails only when the call is over: the client cancelled or the
    connection broke (gRPC reports it as a failed batch, not as a cancellation)."""
    try:
        await context.write(payload)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        raise ClientGone(f"{type(exc).__name__}: {exc}") from exc


async def end_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                   details: str) -> None:
    """End the call with ``code`` (raises AbortError, as ``context.abort`` does). A call
    that is over already (the client left, the server is stopping) raises ClientGone."""
    try:
        await context.abort(code, details)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        raise ClientGone(f"{type(exc).__name__}: {exc}") from exc


class WriteTurns:
    """Turns for large writes, shared by every stream of one server."""

    def __init__(self, limits: Limits) -> None:
        self.large = limits.large_write_bytes
        self.turn_seconds = limits.large_write_turn_seconds
        self._turns = (asyncio.Semaphore(limits.max_large_writes)
                       if limits.max_large_writes > 0 else None)
        self.waiting = 0  # large writes waiting for a turn now
        self.held = 0  # turns held now
        self.large_writes = 0  # large writes started since the server began
        self.turns_timed_out = 0  # of those, how many outlasted their turn

    def waits(self, push: Push) -> bool:
        """Whether ``push`` is large enough to wait for a turn."""
        return self._turns is not None and push.size >= self.large

    async def write(self, context: grpc.aio.ServicerContext, push: Push) -> None:
        """Write ``push`` (encoding it only now), waiting for a turn if it is large."""
        if self._turns is None or push.size < self.large:
            await write_now(context, push.encode())
            return
        self.waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self.waiting -= 1
        self.large_writes += 1
        self.held += 1
        turns = self._turns
        held = True

        def end_turn() -> None:
            nonlocal held
            if held:
                held = False
                self.held -= 1
                turns.release()

        def turn_over() -> None:
            if held:
                self.turns_timed_out += 1
            end_turn()

        timer = asyncio.get_running_loop().call_later(self.turn_seconds, turn_over)
        try:
            await write_now(context, push.encode())
        finally:
            timer.cancel()
            end_turn()
