"""Backends for the promise tests, each bound to port 0 so no other test can take its
port between choosing and binding: a scripted HTTP app (status, delay, or a connection
reset per call), a TCP echo, a gRPC echo, and a port where nothing listens."""

from __future__ import annotations

import http.server
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from tests.support.threaded import QuietHttpServer, Served

# What the n-th call (from 1) gets: (status, seconds before answering); status 0 resets
# the connection instead of answering.
Behaviour = Callable[[int], tuple[int, float]]
RESET = 0


def always(status: int, delay: float = 0.0) -> Behaviour:
    return lambda n: (status, delay)


def first(count: int, status: int) -> Behaviour:
    """``status`` for the first ``count`` calls, 200 after."""
    return lambda n: (status, 0.0) if n <= count else (200, 0.0)


class ScriptedHttp(Served):
    """An HTTP app on 127.0.0.1 answering per ``behave``; it counts calls, the most it
    held at once, and the time of each call."""

    def __init__(self, name: str, behave: Behaviour | None = None) -> None:
        script = behave or always(200)
        self.name = name
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.times: list[float] = []
        lock = threading.Lock()
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with lock:
                    backend.calls += 1
                    backend.active += 1
                    backend.peak = max(backend.peak, backend.active)
                    backend.times.append(time.monotonic())
                    call = backend.calls
                try:
                    status, delay = script(call)
                    time.sleep(delay)
                    if status == RESET:  # SO_LINGER 0: close() sends a TCP RST
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    body = backend.name.encode()
                    self.send_response(status)
                    self.send_header("x-backend", backend.name)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with lock:
                        backend.active -= 1

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(QuietHttpServer(("127.0.0.1", 0), Handler))


class TcpEcho(Served):
    """A raw TCP server that sends back what it receives, prefixed with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        echo = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                echo.connections += 1
                while data := self.request.recv(65536):
                    self.request.sendall(echo.name.encode() + b":" + data)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        super().__init__(Server(("127.0.0.1", 0), Handler))


ECHO_UNARY = "/promises.Echo/Say"
ECHO_STREAM = "/promises.Echo/Count"


class GrpcEcho:
    """A real grpcio server (HTTP/2, no TLS) with two raw-bytes methods: ``Say`` answers
    ``name:request`` (and fails with NOT_FOUND on ``missing``), ``Count`` streams the
    request's number of messages. Bytes in, bytes out: no generated code needed. The
    first ``unavailable`` calls of ``Say`` fail with UNAVAILABLE."""

    def __init__(self, name: str, unavailable: int = 0) -> None:
        self.name = name
        self.calls = 0

        def say(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            if self.calls <= unavailable:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is starting")
            if request == b"missing":
                context.abort(grpc.StatusCode.NOT_FOUND, f"{name} has no 'missing'")
            return name.encode() + b":" + request

        def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self.calls += 1
            for i in range(int(request)):
                yield f"{name}:{i}".encode()

        handler = grpc.method_handlers_generic_handler("promises.Echo", {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


class DeadPort:
    """A port where nothing listens, held (bound, never listening) so that nothing else
    can start listening there during the test: connecting to it is refused."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self.sock.close()
