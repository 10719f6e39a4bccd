"""Run the router (core + gRPC server + OpenAI-compatible HTTP server) in front of a launched
cluster.

Two ways, same parts:

* ``serve_forever(cluster, on_ready)``: on the calling thread's event loop until SIGINT/SIGTERM
  (``tessera serve``), gRPC and HTTP.
* ``BackgroundRouter(cluster, serve_http=...).start()``: on an event loop in a daemon thread, for
  tests and ``tessera demo`` (the caller keeps its thread for a client); HTTP only when asked.

The router runs in the Ray driver process (the one that launched the cluster): it holds the
actor handles, so no extra hop sits between it and the workers.
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import threading

import grpc.aio
from collections.abc import Callable

from cluster.launch import Cluster
from router.core import RouterCore
from router.grpc_server import GrpcServer
from router.http_server import HttpServer


async def start_router(cluster: Cluster, serve_http: bool = True) -> tuple[RouterCore, GrpcServer, HttpServer | None]:
    core = RouterCore(cluster.config, cluster.controller, str(cluster.model_dir))
    server = GrpcServer(core, cluster.config.router)
    await server.start()
    http = None
    if serve_http:
        http = HttpServer(core, cluster.config.router)
        try:
            await http.start()
        except BaseException:
            await server.stop(0)
            raise
    await cluster.start_control(core.latency)  # reconcile, health checks, autoscaler: on this loop
    return core, server, http


async def stop_router(server: GrpcServer, http: HttpServer | None, grace_s: float) -> None:
    """Both front doors stop taking requests; the core aborts what runs (open streams end)."""
    http_stopping = asyncio.ensure_future(http.stop(grace_s)) if http is not None else None
    await server.stop(grace_s)
    if http_stopping is not None:
        await http_stopping


async def serve_forever(cluster: Cluster, on_ready: Callable[[str, str], None] | None = None,
                        grace_s: float = 5.0) -> None:
    """Serve until SIGINT or SIGTERM, then stop taking calls, abort what runs, and return (the
    caller shuts the cluster down). ``on_ready(grpc_address, http_address)``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    core, server, http = await start_router(cluster)
    try:
        if on_ready is not None:
            on_ready(server.address, http.address)
        await stop.wait()
    finally:
        await cluster.stop_control()
        await stop_router(server, http, grace_s)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def new_router_loop() -> asyncio.AbstractEventLoop:
    """The router's event loop: uvloop's (a faster loop for the many small writes of token
    streaming) where it is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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
            loop = new_router_loop()
            thread = threading.Thread(target=loop.run_forever, name="tessera-router", daemon=True)
            thread.start()
            # NOTE: grpc.aio refcounts its runtime; when the last server on this loop is gone it shuts
            # its poller down while the loop still watches its fd ("Bad file descriptor" callback
            # tracebacks). One reference held for the life of the loop keeps it up between routers.
            asyncio.run_coroutine_threadsafe(_hold_grpc_aio(), loop).result(30)
            atexit.register(_stop_loop, loop, thread)
            _shared_loop = loop
        return _shared_loop


async def _hold_grpc_aio() -> None:
    grpc.aio.init_grpc_aio()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


class BackgroundRouter:
    """The router on a background event-loop thread. ``address`` (gRPC) and, with ``serve_http``,
    ``http_address`` are set once ``start`` returns."""

    def __init__(self, cluster: Cluster, serve_http: bool = False):
        self.cluster = cluster
        self.serve_http = serve_http
        self.loop = _router_loop()
        self.core: RouterCore | None = None
        self.server: GrpcServer | None = None
        self.http: HttpServer | None = None
        self.address = ""
        self.http_address = ""

    def start(self) -> "BackgroundRouter":
        self.core, self.server, self.http = self.run(start_router(self.cluster, self.serve_http))
        self.address = self.server.address
        self.http_address = self.http.address if self.http is not None else ""
        return self

    def run(self, coro, timeout_s: float | None = 300.0):
        """Run a coroutine on the router's loop and return its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            server, http, self.server, self.http = self.server, self.http, None, None
            self.run(self.cluster.stop_control(), timeout_s=30)
            self.run(stop_router(server, http, grace_s), timeout_s=grace_s + 30)

    def __enter__(self) -> "BackgroundRouter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
