"""Run the router (core + gRPC server) in front of a launched cluster.

Two ways, same parts:

* ``serve_forever(cluster, on_ready)``: on the calling thread's event loop until SIGINT/SIGTERM
  (``tessera serve``).
* ``BackgroundRouter(cluster).start()``: on an event loop in a daemon thread, for tests and
  ``tessera demo`` (the caller keeps its thread for a gRPC client).

The router runs in the Ray driver process (the one that launched the cluster): it holds the
actor handles, so no extra hop sits between it and the workers.
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import threading
from collections.abc import Callable

from cluster.launch import Cluster
from router.core import RouterCore
from router.grpc_server import GrpcServer


async def start_router(cluster: Cluster) -> tuple[RouterCore, GrpcServer]:
    core = RouterCore(cluster.config, cluster.controller, str(cluster.model_dir))
    server = GrpcServer(core, cluster.config.router)
    await server.start()
    return core, server


async def serve_forever(cluster: Cluster, on_ready: Callable[[str], None] | None = None,
                        grace_s: float = 5.0) -> None:
    """Serve until SIGINT or SIGTERM, then stop taking calls, abort what runs, and return (the
    caller shuts the cluster down)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    core, server = await start_router(cluster)
    try:
        if on_ready is not None:
            on_ready(server.address)
        await stop.wait()
    finally:
        await server.stop(grace_s)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


_shared_loop: asyncio.AbstractEventLoop | None = None
_shared_loop_lock = threading.Lock()


def _router_loop() -> asyncio.AbstractEventLoop:
    """One event-loop thread per process for every background router. grpc.aio binds process-wide
    state to the loops it runs on; a loop that is closed under it makes its poller fail (EBADF), so
    the loop lives as long as the process (a daemon thread) and routers come and go on it. It is
    stopped at exit, before grpc's own exit hook tears its completion queue down."""
    global _shared_loop
    with _shared_loop_lock:
        if _shared_loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="tessera-router", daemon=True)
            thread.start()
            atexit.register(_stop_loop, loop, thread)
            _shared_loop = loop
        return _shared_loop


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


class BackgroundRouter:
    """The router on a background event-loop thread. ``address`` is set once ``start`` returns."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.loop = _router_loop()
        self.core: RouterCore | None = None
        self.server: GrpcServer | None = None
        self.address = ""

    def start(self) -> "BackgroundRouter":
        self.core, self.server = self.run(start_router(self.cluster))
        self.address = self.server.address
        return self

    def run(self, coro, timeout_s: float | None = 300.0):
        """Run a coroutine on the router's loop and return its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self.run(server.stop(grace_s), timeout_s=grace_s + 30)

    def __enter__(self) -> "BackgroundRouter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
