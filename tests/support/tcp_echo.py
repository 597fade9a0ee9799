"""A TCP server for capture tests: ``tcp_echo.py ADDRESS PORT [NAME]``.

Without NAME, a plain echo: every byte received is sent back. With NAME, each connection
first gets one line ``NAME <original destination> <local address>\\n`` and then the echo.
The original destination is the address the client dialled before an iptables REDIRECT
(``SO_ORIGINAL_DST``), or ``-`` when the connection was not redirected: a listener on
15001 or 15006 in a captured pod reports where the app's traffic was really going.
Run inside a test pod (tests/support/pods.py).
"""

import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_dst(conn: socket.socket) -> str:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return "-"  # no conntrack NAT entry: not redirected
    port = struct.unpack("!H", raw[2:4])[0]
    return f"{socket.inet_ntoa(raw[4:8])}:{port}"


def serve(conn: socket.socket, name: str | None) -> None:
    with conn:
        if name is not None:
            local = "{}:{}".format(*conn.getsockname())
            conn.sendall(f"{name} {original_dst(conn)} {local}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


def main() -> None:
    address, port = sys.argv[1], int(sys.argv[2])
    name = sys.argv[3] if len(sys.argv) > 3 else None
    listener = socket.create_server((address, port), backlog=128, reuse_port=False)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    main()
