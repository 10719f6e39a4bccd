"""Plumbing shared by the three worker actors (encoder, prefill, decode).

Each worker is a Ray *async* actor: its methods are coroutines on one event loop, and its engine
runs as one background task on that loop (``BaseWorker._engine_loop``), started lazily by the
first call. Blocking work (a model forward, a KV send/receive) runs in a worker thread through
``run_blocking`` so the loop keeps accepting requests and streaming tokens meanwhile.

What lives here: thread setup (torch intra-op threads, 1 by default: the CPU machines this runs on
in tests have 2 cores and oversubscription makes a tiny model ~30x slower), ``ready()`` /
``load()`` / ``health_probe()`` / ``shutdown()``, the background-loop lifecycle, failed steps, fault
injection (``cluster.faults``), and the Ray actor options a ``PoolConfig`` turns into
(``actor_options`` / ``start_worker``).

A model step that raises (a bug, a bad input that slipped through, a device error) fails only the
requests in that step; the worker goes on with the next one. ``MAX_CONSECUTIVE_STEP_FAILURES``
failed steps in a row mean the worker itself is broken (a sticky device error): it then reports
unhealthy and the controller's health checks replace it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

from cluster.contracts import WorkerInfo
from cluster.faults import FaultInjector
from cluster.kv_transfer.layer_gate import LayerGate

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CONSECUTIVE_STEP_FAILURES = 3
# Upper bounds (seconds) of the model-step time histogram each worker keeps (``load()["step_seconds"]``).
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                        2.5, 10.0)


class StepTimes:
    """Histogram of one worker's model-step wall times (model thread hand-off included): what a
    decode step costs on this worker, read beside client-side TPOT to see where latency goes."""

    def __init__(self):
        self.counts = [0] * (len(STEP_SECONDS_BUCKETS) + 1)  # per bucket, not cumulative; last: +Inf
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(STEP_SECONDS_BUCKETS, seconds)] += 1
        self.total_s += seconds

    def report(self) -> dict[str, Any]:
        return {"buckets": list(self.counts), "sum": round(self.total_s, 6), "count": sum(self.counts)}


def set_torch_threads(num_threads: int) -> None:
    """Intra-op threads for this process (and interop where still settable)."""
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        torch.set_num_interop_threads(max(1, int(num_threads)))
    except RuntimeError:  # already set, or parallel work already started: harmless
        pass


class BaseWorker:
    """Identity, lifecycle and the background-loop scaffolding of a worker actor."""

    pool: str = ""  # "encoder" | "prefill" | "decode"

    def __init__(self, worker_id: str, torch_threads: int = 1):
        set_torch_threads(torch_threads)
        self.worker_id = worker_id
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix=f"{worker_id}-model")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self.faults = FaultInjector(worker_id)
        self._num_step_failures = 0
        self._num_failed_in_a_row = 0
        self._step_times = StepTimes()
        self._model_busy_since: float | None = None  # time.monotonic() the model thread's job began; None: idle
        self._loop: asyncio.AbstractEventLoop | None = None  # the actor's event loop, once a call ran on it
        self.streams = None  # cluster.step_stream.StepStreamServer of workers that stream tokens (decode, colocated)

    # -- the background loop ---------------------------------------------------------------
    def _ensure_loop(self) -> None:
        """Start the engine loop on the actor's event loop (the constructor has no loop)."""
        if self._closed:
            raise RuntimeError(f"worker {self.worker_id} is shut down")
        if self._loop_task is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._loop_task = self._loop.create_task(self._run_engine_loop())

    def _notify(self) -> None:
        """Tell the engine loop there is something to do."""
        if self._wake is not None:
            self._wake.set()

    async def _wait_for_work(self, timeout_s: float | None = None) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _run_engine_loop(self) -> None:
        try:
            await self._engine_loop()
        except asyncio.CancelledError:
            raise
        except BaseException:  # a bug: make it loud, and fail whatever waits on the loop
            logger.exception("%s: engine loop crashed", self.worker_id)
            self._on_loop_crash()
            raise

    async def _engine_loop(self) -> None:  # receive -> schedule -> execute -> post-process -> send
        raise NotImplementedError

    def _on_loop_crash(self) -> None:
        """Fail every waiter (subclasses); the worker is unusable afterwards."""

    def _step_failed(self, exc: BaseException, num_requests: int) -> None:
        """Book a failed model step (its requests were failed by the caller)."""
        self._num_step_failures += 1
        self._num_failed_in_a_row += 1
        logger.error("%s: a model step failed (%d requests failed, %d failures in a row): %s: %s", self.worker_id,
                     num_requests, self._num_failed_in_a_row, type(exc).__name__, exc)

    def _step_ok(self) -> None:
        self._num_failed_in_a_row = 0

    @property
    def is_broken(self) -> bool:
        """The engine loop died, or model steps keep failing: only a replacement helps."""
        crashed = self._loop_task is not None and self._loop_task.done()
        return crashed or self._num_failed_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES

    async def inject_fault(self, point: str, action: str = "raise", count: int = 1, seconds: float = 0.0,
                           skip: int = 0) -> None:
        """Arm a fault point (``cluster.faults``); refused unless fault injection is enabled."""
        self.faults.arm(point, action, count=count, seconds=seconds, skip=skip)

    async def clear_faults(self) -> None:
        self.faults.disarm()

    async def run_step(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one model step in the model thread, timed into ``load()["step_seconds"]``."""
        start = time.perf_counter()
        try:
            return await self.run_blocking(fn, *args)
        finally:
            self._step_times.observe(time.perf_counter() - start)

    async def run_lm_step(self, batch, gate: LayerGate | None = None) -> None:
        """One step of a language-model worker (prefill, decode): ``self.runner`` executes
        ``batch`` in the model thread, behind the ``forward`` fault point, and ``_postprocess``
        hands out the tokens. A step that raises fails only its own requests (``_fail_batch``);
        the worker goes on. ``gate`` learns of each layer written (and of a failure), for the
        KV transfers this step feeds."""
        try:
            tokens = await self.run_step(self._forward, batch, gate)
        except BaseException as exc:  # noqa: BLE001 — fail this step's requests, keep serving
            if gate is not None:
                gate.fail(exc)
            if not isinstance(exc, Exception):  # (cancelled: the worker is stopping)
                raise
            self._fail_batch(batch, exc)
            return
        self._step_ok()
        self._postprocess(batch, tokens)

    def _forward(self, batch, gate: LayerGate | None = None) -> list[int | None]:
        self.faults.hit("forward")
        return self.runner.execute(batch, None if gate is None else gate.layer_done)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, executor: ThreadPoolExecutor | None = None) -> T:
        """Run ``fn(*args)`` in a thread (the model thread by default) without blocking the loop."""
        loop = asyncio.get_running_loop()
        if executor is not None:
            return await loop.run_in_executor(executor, fn, *args)
        return await loop.run_in_executor(self._model_executor, self._on_model_thread, fn, *args)

    def _on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Model thread: one job, with its start time kept for ``health_probe``."""
        self._model_busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._model_busy_since = None

    # -- what every worker answers -----------------------------------------------------------
    async def ready(self) -> WorkerInfo:
        """Returns once the model is loaded (the constructor did that); starts the engine loop."""
        self._ensure_loop()
        return WorkerInfo(self.worker_id, self.pool, _node_id(), os.getpid(), _node_ip())

    async def load(self) -> dict[str, Any]:
        """Counters for routing and cluster status; ``healthy`` is False once the loop died."""
        return {"worker_id": self.worker_id, "pool": self.pool, "healthy": not (self.is_broken or self._closed),
                "num_step_failures": self._num_step_failures, "step_seconds": self._step_times.report(),
                **self._load()}

    def _load(self) -> dict[str, Any]:
        raise NotImplementedError

    async def health_probe(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The serving path, not just liveness: this call went through the actor's event loop; the
        engine loop must be alive; the model thread must make progress. An idle model thread runs a
        tiny device op, which must come back within ``timeout_s``. A busy one is judged by the age
        of the step it runs, which must be under ``timeout_s`` (a wedged forward or a hung device
        fails that): the probe is not queued behind the step, because under a burst of long
        prefill or encoder steps the wait for the step to end, on top of a loaded event loop and
        RPC path, made probes of healthy workers time out (and enough of them in a row get a
        worker replaced, failing everything it held). Returns ``load()``; raises otherwise
        (``cluster.health`` counts the failures)."""
        if self._closed:
            raise RuntimeError(f"worker {self.worker_id} is shut down")
        if self.is_broken:
            raise RuntimeError(f"worker {self.worker_id}: engine loop stopped or {self._num_failed_in_a_row} model "
                               f"steps in a row failed")
        since = self._model_busy_since
        if since is None:
            await asyncio.wait_for(self.run_blocking(self._probe_device), timeout_s)
        elif time.monotonic() - since > timeout_s:
            raise RuntimeError(f"worker {self.worker_id}: one model step has run for {time.monotonic() - since:.1f} s "
                               f"(> {timeout_s:g} s): a wedged forward or a hung device")
        return await self.load()

    def _probe_device(self) -> None:
        """Model thread: a round trip through the worker's device (a hung GPU never returns)."""
        device = getattr(getattr(self, "config", None), "device", "cpu")
        x = torch.arange(4, dtype=torch.float32, device=device)
        if float((x * 2).sum()) != 12.0:
            raise RuntimeError(f"worker {self.worker_id}: device {device} computes wrong results")

    async def pin_cpus(self, cores: list[int]) -> list[int]:
        """Pin every thread of this worker's process (torch's pools included) to ``cores``."""
        cores_set = set(cores)
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores_set)
            except OSError:  # a thread that just ended
                pass
        return sorted(os.sched_getaffinity(0))

    async def shutdown(self) -> None:
        """Stop the engine loop and fail/free what is in flight; the actor can then be killed."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except BaseException:  # noqa: BLE001 — cancelled or crashed: either way it stopped
                pass
        self._on_shutdown()
        if self.streams is not None:
            self.streams.close()
        self._model_executor.shutdown(wait=False, cancel_futures=True)

    def _on_shutdown(self) -> None:
        pass

    # -- the token stream (decode and colocated workers) -----------------------------------------
    def _start_step_streams(self, interface: str) -> None:
        """Listen for routers' token streams on ``interface`` (``auto``: this node's IP)."""
        from cluster.step_stream import StepStreamServer

        self.streams = StepStreamServer(self.worker_id, resolve_interface(interface), self._stream_lost_threadsafe)

    async def open_step_stream(self, stream_id: str) -> dict[str, Any]:
        """A one-time ticket for router stream ``stream_id`` to connect with (``cluster.step_stream``)."""
        self._ensure_loop()
        if self.streams is None:
            raise RuntimeError(f"{self.pool} worker {self.worker_id} streams no tokens")
        return self.streams.issue(stream_id)

    def _stream_lost_threadsafe(self, stream_id: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_stream_lost, stream_id)

    def _on_stream_lost(self, stream_id: str) -> None:
        """A router's token stream ended (it died, or gave up on us): abort its requests."""

    def _check_stream(self, stream_id: str) -> None:
        if self.streams is None or not self.streams.is_open(stream_id):
            raise ValueError(f"{self.worker_id} has no open token stream {stream_id!r} (call open_step_stream "
                             f"and connect first)")


def _node_id() -> str:
    try:
        import ray

        if not ray.is_initialized():  # (get_runtime_context() would start a local Ray instance)
            return "local"
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 — not in Ray (unit tests)
        return "local"


def _node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------
# Starting workers from a PoolConfig
# ------------------------------------------------------------------------------------------------

def actor_options(pool_config, *, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    """Ray ``.options(...)`` for one worker of a pool (``cluster.config.PoolConfig``)."""
    opts: dict[str, Any] = {
        "num_cpus": pool_config.num_cpus,
        "num_gpus": pool_config.num_gpus,
        "max_concurrency": 1000,  # async actor: concurrent requests, streams and KV receives
    }
    if pool_config.resources:
        opts["resources"] = dict(pool_config.resources)
    strategy = getattr(pool_config, "scheduling_strategy", "DEFAULT")
    if strategy != "DEFAULT":
        opts["scheduling_strategy"] = strategy
    if name is not None:
        opts["name"] = name
        if namespace is not None:
            opts["namespace"] = namespace
    return opts


def start_worker(worker_cls: type, pool_config, engine_config, worker_id: str, *, name: str | None = None,
                 namespace: str | None = None, **worker_kwargs: Any):
    """Create one worker actor; ``await handle.ready.remote()`` (or ray.get) waits for its model."""
    import ray

    remote_cls = ray.remote(worker_cls)
    kwargs = {"torch_threads": getattr(pool_config, "torch_threads", 1), **worker_kwargs}
    handle = remote_cls.options(**actor_options(pool_config, name=name, namespace=namespace)).remote(
        engine_config, worker_id, **kwargs)
    if getattr(pool_config, "cpu_affinity", None):
        handle.pin_cpus.remote(list(pool_config.cpu_affinity))  # right after the constructor (model load)
    return handle


def resolve_interface(host: str) -> str:
    """A configured bind address; ``auto``: this node's IP as Ray sees it."""
    return (_node_ip() or "127.0.0.1") if host == "auto" else host


def make_kv_endpoint(role: str, transport: str, endpoint_id: str, *, timeout_s: float, host: str, device: str,
                     lanes: int = 4):
    """A KV sender (``role="sender"``) or receiver of ``transport`` with the options it takes:
    every transport a deadline; gloo/auto/nccl receivers bind their rendezvous store (and gloo
    its sockets) to ``host``; nccl runs on ``device``; rendezvous senders open up to ``lanes``
    communicators per receiver."""
    from cluster.kv_transfer import make_kv_receiver, make_kv_sender

    opts: dict[str, Any] = {"timeout_s": timeout_s}
    if role == "sender" and transport in ("gloo", "shm", "auto", "nccl"):
        opts["max_lanes"] = lanes
    if transport in ("gloo", "auto") or (transport == "nccl" and role == "receiver"):
        opts["host"] = resolve_interface(host)
    if transport == "nccl":
        opts["device"] = device
    make = make_kv_sender if role == "sender" else make_kv_receiver
    return make(transport, **{("sender_id" if role == "sender" else "receiver_id"): endpoint_id}, **opts)
