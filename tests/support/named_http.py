"""An HTTP server that answers every GET with its name: ``named_http.py ADDRESS PORT NAME``.
Run inside a test host's network namespace."""

import http.server
import sys

address, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)

    def log_message(self, *args: object) -> None:
        pass


http.server.ThreadingHTTPServer((address, port), Handler).serve_forever()
