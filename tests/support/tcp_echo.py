"""A TCP server for capture tests: ``tcp_echo.py ADDRESS PORT [NAME]``; and its client,
``tcp_echo.py connect HOST PORT [--bind SOURCE] [--send TEXT]``.

Without NAME, a plain echo: every byte received is sent back. With NAME, each connection
first gets one line ``NAME <original destination> <local address> <peer address>\\n``
and then the echo.
The original destination (``SO_ORIGINAL_DST``) is, for a connection an iptables REDIRECT
sent here, the address the client dialled (else the local address itself, or ``-``
without connection tracking): a listener on 15001 or 15006 in a captured pod reports
where the app's traffic was really going.
Run inside a test pod (tests/support/pods.py).

The client connects (from SOURCE when given), sends TEXT when given, and prints the
first line it gets back (exit 1 with the error when it cannot connect or nothing comes
back within 5 s).
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
            peer = "{}:{}".format(*conn.getpeername())
            conn.sendall(f"{name} {original_dst(conn)} {local} {peer}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


def connect(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    source = (options["--bind"], 0) if "--bind" in options else None
    try:
        with socket.create_connection((host, port), timeout=5, source_address=source) as conn:
            if "--send" in options:
                conn.sendall(options["--send"].encode() + b"\n")
            received = b""
            while not received.endswith(b"\n") and (chunk := conn.recv(4096)):
                received += chunk
    except OSError as exc:
        print(f"connect {host}:{port}: {exc}", file=sys.stderr)
        return 1
    if not received:
        print(f"connect {host}:{port}: closed with no reply", file=sys.stderr)
        return 1
    print(received.decode().strip())
    return 0


def main() -> None:
    if sys.argv[1] == "connect":
        sys.exit(connect(sys.argv[2:]))
    address, port = sys.argv[1], int(sys.argv[2])
    name = sys.argv[3] if len(sys.argv) > 3 else None
    listener = socket.create_server((address, port), backlog=128, reuse_port=False)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    main()
