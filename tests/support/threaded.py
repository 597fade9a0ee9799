"""What the tests' threaded servers share: bound before they are handed out (port 0
unless told, so no other test can take the port between choosing and binding), served
on a daemon thread until ``stop``, with a backlog that takes a burst of callers and
without a traceback each time Envoy hangs up on a request it gave up on."""

from __future__ import annotations

import http.server
import socketserver
import threading
from typing import Any


class QuietHttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: a burst of callers on a loaded machine would
    # overflow it, and a dropped SYN turns into a connect failure that never counts a call.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Envoy hangs up on requests it gave up on; expected, not news."""


class Served:
    """A socketserver (bound already) served on a daemon thread until ``stop``."""

    def __init__(self, server: socketserver.BaseServer) -> None:
        self.server = server
        self.port = int(server.server_address[1])  # type: ignore[index]
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
