"""The demo apps: small aiohttp services that call the next service, as a meshed app would.

Captured (``--call URL``): a plain ``http://reviews:9080/``, the name resolving to the
service's virtual IP; the app does not know its sidecar is there. Explicit (the lab
without network namespaces): its own sidecar's egress port with a Host header."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

import aiohttp
from aiohttp import web

from controlplane.lab.topology import CALLS, Instance


def make_app(instance: Instance, session: aiohttp.ClientSession,
             call: str | None = None) -> web.Application:
    """``call``: the downstream's URL (captured); None: by Host via the egress port."""
    downstream = CALLS.get(instance.service)

    async def handle(request: web.Request) -> web.Response:
        body: dict[str, object] = {"service": instance.service, "version": instance.version}
        caller = caller_of(request.headers.get("x-forwarded-client-cert", ""))
        if caller:
            body["caller"] = caller
        status = 200
        if downstream is not None:
            url = call or f"http://127.0.0.1:{instance.egress_port}/"
            headers = {} if call else {"Host": downstream}
            try:
                async with session.get(url, headers=headers) as response:
                    text = await response.text()
                    status = 200 if response.status == 200 else 502
                    try:
                        body[downstream] = json.loads(text)
                    except json.JSONDecodeError:
                        body[downstream] = {"status": response.status, "body": text[:200]}
            except aiohttp.ClientError as exc:
                status, body[downstream] = 502, {"error": str(exc)}
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/", handle)
    return app


def caller_of(xfcc: str) -> str | None:
    """The caller's SPIFFE ID from the ``x-forwarded-client-cert`` its sidecar set (the
    mTLS peer's URI SAN, ``...;URI=spiffe://...``); None for a plaintext caller."""
    last = xfcc.rsplit(",", 1)[-1]
    for part in last.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "uri" and value:
            return value.strip().strip('"')
    return None


async def start_app(instance: Instance,
                    session: aiohttp.ClientSession) -> tuple[web.AppRunner, Instance]:
    """The app on its planned port, or on a free one when another process took that port
    meanwhile; returns the instance with the port it really has."""
    runner = web.AppRunner(make_app(instance, session), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", instance.app_port).start()
    except OSError:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        instance = dataclasses.replace(instance, app_port=port)
    return runner, instance


def ready_line(instance: Instance, host: str, call: str | None) -> str:
    """What the app prints once it listens (the captured lab waits for it)."""
    via = call or f"127.0.0.1:{instance.egress_port}"
    downstream = CALLS.get(instance.service)
    return (f"{instance.service} {instance.version} on {host}:{instance.app_port}, calling "
            + (f"{downstream} via {via}" if downstream else "nothing"))


async def _serve_forever(instance: Instance, host: str, call: str | None) -> None:
    # No proxy from the environment: the app's calls go where they say, and capture
    # (or the explicit egress port) takes them to the sidecar.
    async with aiohttp.ClientSession(trust_env=False) as session:
        runner = web.AppRunner(make_app(instance, session, call), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, instance.app_port).start()
        print(ready_line(instance, host, call), flush=True)
        await asyncio.Event().wait()


def main() -> None:
    """One demo app alone, as the compose lab runs it beside an Envoy container."""
    parser = argparse.ArgumentParser(description="Run one lab demo app.")
    parser.add_argument("--service", required=True,
                        help="its service: frontend calls reviews, reviews calls ratings, "
                        "any other calls nothing")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--port", type=int, required=True, help="the app's own port")
    parser.add_argument("--egress-port", type=int, default=15001, help="its sidecar's egress")
    parser.add_argument("--call", metavar="URL",
                        help="call the downstream at this plain URL (captured: e.g. "
                        "http://reviews:9080/) instead of via --egress-port with a Host header")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    instance = Instance(args.service, args.version, f"{args.service}-{args.version}",
                        args.port, 0, args.egress_port, 0)
    asyncio.run(_serve_forever(instance, args.host, args.call))


if __name__ == "__main__":
    main()
