"""An HTTP app that answers every request with what it received (its name, the method,
path, Host and headers, as JSON), as the Gateway API conformance suite's echo backend
does, and remembers each request (a mirror's copy is seen here, never by the caller).
Bound to port 0 on 127.0.0.1, so no other test can take its port."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from dataclasses import dataclass
from typing import Any

from tests.support.threaded import QuietHttpServer, Served


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


class EchoHttp(Served):
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[Seen] = []
        lock = threading.Lock()
        echo = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(min(length, 1 << 20))
                # A header sent twice (an appended value) reads as one, comma-joined.
                seen = Seen(self.command, self.path, {
                    k.lower(): ",".join(self.headers.get_all(k) or ())
                    for k in dict.fromkeys(self.headers.keys())})
                with lock:
                    echo.requests.append(seen)
                body = json.dumps({"name": echo.name, "method": seen.method,
                                   "path": seen.path, "host": seen.headers.get("host", ""),
                                   "headers": seen.headers}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer
            do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(QuietHttpServer(("127.0.0.1", 0), Handler))


def echoed(status_body_headers: tuple[int, str, dict[str, str]]) -> dict[str, Any]:
    """The echo's JSON answer (fails the test with the status when it is not one)."""
    status, body, _ = status_body_headers
    assert status == 200, (status, body[:300])
    answer: dict[str, Any] = json.loads(body)
    return answer


def call(port: int, host: str, path: str = "/", method: str = "GET",
         headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, str, dict[str, str]]:
    """One request to 127.0.0.1:``port`` (a sidecar's egress listener) with ``Host:
    host``; redirects are answers here, never followed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
