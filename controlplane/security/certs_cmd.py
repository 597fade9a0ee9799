"""``controlplane certs``: keep a proxyless gRPC workload's mesh certificate in files.

Exit codes: 0 (``--once``: written; or stopped by SIGTERM/SIGINT), 1 (refused by the
server, or no certificate in time), 2 (the bootstrap cannot drive it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from controlplane import logs


def run(args: argparse.Namespace) -> int:
    from controlplane.security.certs_agent import Agent, CertsFailed
    from controlplane.security.certs_plan import PlanError, read_plan

    logs.configure(args.log_level, args.log_format)
    if not args.bootstrap:
        return _fail("give the client's bootstrap: --bootstrap FILE (or set "
                     "GRPC_XDS_BOOTSTRAP), made by `controlplane bootstrap --grpc "
                     "--cert-dir DIR`", 2)
    if not args.timeout > 0:
        return _fail("--timeout must be positive", 2)
    try:
        plan = read_plan(args.bootstrap)
    except PlanError as exc:
        return _fail(str(exc), 2)
    agent = Agent(plan, once=args.once, first_within=args.timeout)
    try:
        asyncio.run(_until_signal(agent.run()))
    except CertsFailed as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        pass
    return 0


async def _until_signal(work: Any) -> None:
    """``work``, cancelled (a clean exit) by SIGTERM or SIGINT."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _fail(message: str, code: int) -> int:
    print(f"controlplane certs: {message}", file=sys.stderr)
    return code
