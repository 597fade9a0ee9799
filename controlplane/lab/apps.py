"""The demo apps: small aiohttp services that call the next service through their own
sidecar's egress listener, by Host header, as a meshed app would."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

import aiohttp
from aiohttp import web

from controlplane.lab.topology import CALLS, Instance


def make_app(instance: Instance, session: aiohttp.ClientSession) -> web.Application:
    downstream = CALLS.get(instance.service)

    async def handle(_: web.Request) -> web.Response:
        body: dict[str, object] = {"service": instance.service, "version": instance.version}
        status = 200
        if downstream is not None:
            url = f"http://127.0.0.1:{instance.egress_port}/"
            try:
                async with session.get(url, headers={"Host": downstream}) as response:
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


async def _serve_forever(instance: Instance, host: str) -> None:
    async with aiohttp.ClientSession() as session:
        runner = web.AppRunner(make_app(instance, session), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, instance.app_port).start()
        print(f"{instance.service} {instance.version} on {host}:{instance.app_port}, calling "
              f"{CALLS.get(instance.service, 'nothing')} via 127.0.0.1:{instance.egress_port}",
              flush=True)
        await asyncio.Event().wait()


def main() -> None:
    """One demo app alone, as the compose lab runs it beside an Envoy container."""
    parser = argparse.ArgumentParser(description="Run one lab demo app.")
    parser.add_argument("--service", required=True, choices=["frontend", "reviews", "ratings"])
    parser.add_argument("--version", default="v1")
    parser.add_argument("--port", type=int, required=True, help="the app's own port")
    parser.add_argument("--egress-port", type=int, default=15001, help="its sidecar's egress")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    instance = Instance(args.service, args.version, f"{args.service}-{args.version}",
                        args.port, 0, args.egress_port, 0)
    asyncio.run(_serve_forever(instance, args.host))


if __name__ == "__main__":
    main()
