"""The admin server on a thread and event loop of its own, so the xDS loop comes first.

On the xDS loop, every admin request (parsing, answering, sending megabytes of a config
dump) was one more callback that xDS work queued behind: 200 debug clients made a push
wait its turn 200 times per loop pass. On its own loop, admin work only shares the CPU
through the GIL, which hands it to a waiting thread every few milliseconds, and admin
I/O waits for the GIL behind the xDS loop's CPU work rather than the other way round.

What the admin server shows lives on the xDS loop (streams, the cache, readiness) and
is changed there without locks, so every read of it runs there (``on_main``): a short
function, called through ``call_soon_threadsafe``. /healthz does such a call too: it
answers only when the xDS loop does, so a liveness probe still sees a stuck loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


async def on_main(main: asyncio.AbstractEventLoop | None, fn: Callable[[], T]) -> T:
    """``fn()`` run on the xDS loop ``main`` (directly when that is this loop or None)."""
    if main is None or main is asyncio.get_running_loop():
        return fn()
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def call() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the admin thread, raised there
                future.set_exception(exc)

    main.call_soon_threadsafe(call)
    return await asyncio.wrap_future(future)


class AdminThread:
    """An aiohttp application served on its own thread and loop; ``cleanup()`` (from the
    loop that started it) stops it, as ``AppRunner.cleanup()`` would."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._bound: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="admin-http", daemon=True)

    async def start(self) -> int:
        """Bind and serve; the port bound, or the bind error (e.g. OSError: in use)."""
        self._thread.start()
        return await asyncio.wrap_future(self._bound)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        # No access log: Prometheus scrapes and probes would drown the server's own logs.
        runner = web.AppRunner(self.app, access_log=None)
        try:
            self.loop.run_until_complete(runner.setup())
            try:
                site = web.TCPSite(runner, self.host, self.port)
                self.loop.run_until_complete(site.start())
            except BaseException:
                self.loop.run_until_complete(runner.cleanup())
                raise
        except BaseException as exc:
            self._bound.set_exception(exc)
            self.loop.close()
            return
        self._bound.set_result(int(runner.addresses[0][1]))
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(runner.cleanup())
            self.loop.close()

    async def cleanup(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            await asyncio.to_thread(self._thread.join, 30)
