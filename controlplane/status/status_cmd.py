"""The ``controlplane status`` command: flags, the replicas' answers, exit codes.

Exit codes: 0 (answered; with --wait: every proxy synced), 1 (--wait: not synced in time;
--node: no such proxy), 2 (no replica answered, or bad flags).
"""

from __future__ import annotations

import argparse
import sys

from envoy.service.status.v3 import csds_pb2

from controlplane.status import diff, render
from controlplane.status.client import Connection, StatusError, fetch, request
from controlplane.status.model import ProxyStatus, merge, proxy_status, rows
from controlplane.status.status_flags import DEFAULT_SERVER
from controlplane.status.wait import wait


def run(args: argparse.Namespace) -> int:
    servers: list[str] = args.server or [DEFAULT_SERVER]
    if args.timeout < 0 or args.connect_timeout <= 0:
        return _fail("--timeout must be >= 0 and --connect-timeout > 0", 2)
    try:
        connection = Connection.from_files(args.ca, args.server_name, args.token_file,
                                           args.connect_timeout)
    except StatusError as exc:
        return _fail(str(exc), 2)
    if args.node:
        return _node(args.node, servers, connection)

    def look() -> tuple[list[ProxyStatus], list[str]]:
        found, problems = _ask(servers, connection, request())
        return merge(found), problems

    if args.wait:
        outcome = wait(look, args.timeout)
        proxies, problems = outcome.proxies, outcome.unreachable
    else:
        proxies, problems = look()
    for problem in problems:
        print(f"controlplane status: {problem}", file=sys.stderr)
    if len(problems) == len(servers):
        return _fail("no replica answered; check --server (each replica's xDS address), "
                     "that the servers run, and --ca/--token-file for a secured port", 2)
    text = (render.as_json(proxies, problems) if args.output == "json"
            else render.table(proxies))
    sys.stdout.write(text)
    if not args.wait:
        return 0
    if outcome.synced:
        print(f"every proxy ({len(proxies)}) is synced ({outcome.waited:.1f}s)",
              file=sys.stderr)
        return 0
    laggards = [p for p in proxies if not p.synced]
    print(f"controlplane status: not synced after {args.timeout:g}s: "
          f"{len(laggards)} of {len(proxies)} proxies"
          + (f", {len(problems)} replicas did not answer" if problems else ""),
          file=sys.stderr)
    for proxy in laggards:
        print(f"  {proxy.node_id} ({proxy.replica}): {proxy.laggard()}", file=sys.stderr)
    if laggards:
        print("a NACKed proxy keeps its last good config: fix what it rejects (see "
              "controlplane status --node ID); a STALE one has not answered: is it running?",
              file=sys.stderr)
    return 1


def _ask(servers: list[str], connection: Connection,
         asked: csds_pb2.ClientStatusRequest) -> tuple[list[ProxyStatus], list[str]]:
    found: list[ProxyStatus] = []
    problems: list[str] = []
    for server in servers:
        try:
            found += rows(fetch(server, connection, asked), server)
        except StatusError as exc:
            problems.append(str(exc))
    return found, problems


def _node(node: str, servers: list[str], connection: Connection) -> int:
    best: tuple[ProxyStatus, csds_pb2.ClientConfig, str] | None = None
    problems = []
    for server in servers:
        try:
            answer = fetch(server, connection, request(node, contents=True))
        except StatusError as exc:
            problems.append(str(exc))
            continue
        for config in answer.config:
            proxy = proxy_status(config, server)
            if best is None or proxy.connected_at > best[0].connected_at:
                best = (proxy, config, server)
    for problem in problems:
        print(f"controlplane status: {problem}", file=sys.stderr)
    if len(problems) == len(servers):
        return _fail("no replica answered; check --server, that the servers run, and "
                     "--ca/--token-file for a secured port", 2)
    if best is None:
        return _fail(f"no proxy with node id {node!r} is connected to "
                     f"{', '.join(servers)}; run controlplane status to list them", 1)
    proxy, diffs = diff.diff(best[1], best[2])
    sys.stdout.write(diff.render(proxy, diffs))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"controlplane status: {message}", file=sys.stderr)
    return code
