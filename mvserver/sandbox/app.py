"""The provider simulator: an aiohttp app that speaks the parts of Gemini's, Vertex's and Replicate's HTTP APIs we use.

It backs offline sandbox mode and the tests, which point the real SDK clients at it. This is the one module of the
sandbox the server imports (the simulator's state is :class:`~mvserver.sandbox.state.Simulator`, re-exported here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from aiohttp import web

from mvserver.sandbox import gemini_api, replicate_api, webhooks
from mvserver.sandbox.state import RENDER_SLOTS, SENDER, SIMULATOR, Fault, Simulator

__all__ = ["Fault", "Simulator", "create_simulator_app", "start_simulator"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply a pending transport-level fault for this route before the real handler runs."""
    sim = request.app[SIMULATOR]
    route = request.match_info.route.name or ""
    sim.requests.append((route, request.path))
    fault = sim.take_fault(route, ("status", "reset", "hang", "truncate", "invalid_json"))
    if fault is None:
        return await handler(request)
    sim.applied.append({"route": route, "kind": fault.kind, "path": request.path})
    if fault.kind == "status":
        headers = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else None
        body = fault.body if fault.body is not None else {"detail": f"simulated {fault.status}", "status": fault.status}
        return web.json_response(body, status=fault.status, headers=headers)
    if fault.kind == "reset":
        request.transport.close()  # type: ignore[union-attr]
        raise asyncio.CancelledError()
    if fault.kind == "hang":
        await asyncio.sleep(3600)
    if fault.kind == "invalid_json":
        return web.Response(text="{not json", content_type="application/json")
    # truncate: promise a body, send half, close.
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "2000"})
    await response.prepare(request)
    await response.write(b'{"truncated": "' + b"x" * 900)
    request.transport.close()  # type: ignore[union-attr]
    return response


async def add_fault_endpoint(request: web.Request) -> web.Response:
    """``POST /_sim/faults`` with a :class:`Fault` as JSON."""
    fault = request.app[SIMULATOR].add_fault(**await request.json())
    return web.json_response(asdict(fault))


async def list_faults_endpoint(request: web.Request) -> web.Response:
    """``GET /_sim/faults``: the faults still pending and those that took effect, oldest first."""
    sim = request.app[SIMULATOR]
    return web.json_response({"faults": [asdict(fault) for fault in sim.faults], "applied": list(sim.applied)})


async def clear_faults_endpoint(request: web.Request) -> web.Response:
    request.app[SIMULATOR].faults.clear()
    return web.json_response({"faults": []})


def create_simulator_app(sim: Simulator) -> web.Application:
    """The simulator app: ``/gemini`` (Developer API), ``/vertex`` (Veo) and ``/replicate`` (Replicate API)."""
    app = web.Application(middlewares=[fault_middleware], client_max_size=64 * 1024 * 1024)
    app[SIMULATOR] = sim
    app[RENDER_SLOTS] = slots = asyncio.Semaphore(sim.max_concurrent_renders)
    app[SENDER] = sender = webhooks.WebhookSender(sim)
    app.cleanup_ctx.append(sender.context)
    app.router.add_post("/_sim/faults", add_fault_endpoint, name="sim.faults")
    app.router.add_get("/_sim/faults", list_faults_endpoint, name="sim.faults.list")
    app.router.add_delete("/_sim/faults", clear_faults_endpoint, name="sim.faults.clear")
    gemini_api.add_routes(app.router, slots)
    replicate_api.add_routes(app.router, slots)
    return app


async def start_simulator(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the simulator on a loopback port; return the runner (to clean up) and its base URL."""
    runner = web.AppRunner(create_simulator_app(sim), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{host}:{bound}"
