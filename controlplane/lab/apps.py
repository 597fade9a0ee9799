"""The demo apps: small aiohttp services that call the next service through their own
sidecar's egress listener, by Host header, as a meshed app would."""

from __future__ import annotations

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


async def start_app(instance: Instance, session: aiohttp.ClientSession) -> web.AppRunner:
    runner = web.AppRunner(make_app(instance, session), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", instance.app_port).start()
    return runner
