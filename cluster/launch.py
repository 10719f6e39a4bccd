"""Bring a cluster up and down: Ray (start a local instance or join one), the pools' worker actors,
and the controller that tracks them.

    cluster = Cluster(config, address=None).start()   # ray.init, actors, wait for ready()
    await cluster.start_control(latency)              # on the router's loop: reconcile, health, autoscaler
    ...                                               # cluster.controller.scale({"decode": 4})
    cluster.shutdown()                                # loops, actors' shutdown(), kill, ray.shutdown

Placement: each worker asks Ray for its pool's ``num_cpus`` / ``num_gpus`` / custom
``resources`` (``PoolConfig``), so a pool lands only on nodes offering them; a pool that cannot
be placed fails the start after ``startup_timeout_s`` with the resources it asked for and those
the cluster has, instead of hanging.

Worker classes are looked up by name (``WORKER_CLASSES``) and imported only here, at start: the
``cluster`` package does not import the worker packages at module level (they depend on it).

At runtime (``start_control``, on the router's event loop) three loops keep the pools in shape:
the controller's reconcile loop (start / drain / replace workers, ``cluster.controller``), the
health monitor (``cluster.health``) and, if a pool has autoscaling on, the autoscaler
(``cluster.autoscaler``). ``RayWorkerLauncher`` is how they (and ``start``) create and kill actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig, PoolConfig
from cluster.controller import Controller, PoolWorker, WorkerState

log = logging.getLogger(__name__)

WORKER_CLASSES = {
    "encoder": "encoder_pool.worker:EncoderWorker",
    "prefill": "prefill_workers.worker:PrefillWorker",
    "decode": "decode_workers.worker:DecodeWorker",
    "colocated": "cluster.colocated_worker:ColocatedWorker",
}
# Environment forwarded to the workers when this process starts Ray (or joins a cluster).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TESSERA_TINY_MODEL_DIR", "XDG_CACHE_HOME", "TESSERA_NCCL_LIB")


class LaunchError(RuntimeError):
    """The cluster could not be started (nothing is left running when this is raised)."""


def worker_class(pool: str) -> type:
    module, _, name = WORKER_CLASSES[pool].partition(":")
    return getattr(importlib.import_module(module), name)


def resolve_model_dir(config: ClusterConfig) -> Path:
    """The model folder the router reads (tokenizer, processor, config): the engine's model, or
    the built-in tiny one (built and cached on first use)."""
    from cluster.engine.setup import resolve_engine_model

    return Path(resolve_engine_model(config.engine))


def init_ray(address: str | None = None, num_cpus: float | None = None) -> bool:
    """Start a local Ray instance (``address`` None) or join ``address``; returns True if this
    call initialised Ray (so ``shutdown`` should also end it). An initialised Ray is reused."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        # Workers on other nodes do not inherit this process's environment: send what matters.
        # (Locally they do; a runtime_env there would only add ~10 s of worker setup.)
        env = {k: os.environ[k] for k in FORWARDED_ENV + ("TOKENIZERS_PARALLELISM",) if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


class RayWorkerLauncher:
    """Execution for the controller: one worker actor of a pool, as the pool's config asks Ray."""

    def __init__(self, config: ClusterConfig):
        self.config = config

    def start(self, pool: str, worker_id: str):
        from cluster.worker_base import start_worker

        return start_worker(worker_class(pool), getattr(self.config.pools, pool), self.config.engine, worker_id,
                            **self._worker_kwargs(pool))

    def kill(self, actor) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(actor)

    def describe_starting(self, pool: str, actor) -> str:
        """Placed (its process loads the model) or still waiting for a node with the resources."""
        import ray

        try:  # NOTE: Ray's private actor table (no public API without the dashboard); best effort
            from ray._private.state import state

            pid = int(state.actor_table(actor._actor_id.hex()).get("Pid") or 0)
            free = ray.available_resources()
        except Exception:  # noqa: BLE001
            return ""
        if pid:
            return f"loading the model (pid {pid})"
        return (f"waiting for Ray to place it: asks {_resource_ask(getattr(self.config.pools, pool))}, the cluster "
                f"has {_fmt_resources(free)} free (Ray's autoscaler, if configured, adds a node)")

    def _worker_kwargs(self, pool: str) -> dict[str, Any]:
        """Pool-specific constructor options (besides the engine config, id and torch threads)."""
        if pool == "encoder":
            enc = self.config.pools.encoder
            return {"max_batch_size": enc.max_batch_size, "batch_wait_ms": enc.batch_wait_ms,
                    "cache_max_bytes": int(enc.cache_mb * 2**20)}
        if pool == "colocated":
            return {"stream_interface": self.config.kv_transfer.interface}
        return {"kv_transfer": self.config.kv_transfer}


class Cluster:
    def __init__(self, config: ClusterConfig, address: str | None = None, *, num_cpus: float | None = None):
        self.config = config
        self.address = address
        self.num_cpus = num_cpus
        pools = config.active_pools()
        self.controller = Controller({name: pool.num_workers for name, pool in pools},
                                     bounds={name: (pool.min_workers, pool.max_workers) for name, pool in pools},
                                     autoscaled=[name for name, pool in pools if pool.autoscaling.enabled])
        self.launcher = RayWorkerLauncher(config)
        self.model_dir: Path | None = None
        self._owns_ray = False
        self._control_tasks: list[asyncio.Task] = []
        self._control_loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def adopt_ray(self, owns_ray: bool) -> None:
        """Ray was initialised by the caller (``init_ray``); ``owns_ray``: end it on shutdown."""
        self._owns_ray = self._owns_ray or owns_ray

    def start(self) -> "Cluster":
        self.model_dir = resolve_model_dir(self.config)  # builds the tiny default here, once
        self._owns_ray = init_ray(self.address, self.num_cpus) or self._owns_ray
        try:
            started = [self._create_worker(name, pool) for name, pool in self.config.active_pools()
                       for _ in range(pool.num_workers)]
            self._wait_ready(started, self.config.startup_timeout_s)
            self._check_pools()
        except BaseException:
            self.shutdown()
            raise
        return self

    # -- runtime control: reconcile, health, autoscaling -----------------------------------------
    async def start_control(self, latency=None) -> None:
        """Start the control loops on the running event loop (the router's: they share the
        controller's records with it). ``latency``: the router's ``LatencyWindow``."""
        from cluster.autoscaler import Autoscaler
        from cluster.health import HealthMonitor

        if self._control_tasks:
            return
        ctl = self.config.controller
        loops = [
            self.controller.run(self.launcher, startup_timeout_s=self.config.startup_timeout_s,
                                drain_timeout_s=self.config.drain_timeout_s),
            HealthMonitor(self.controller, period_s=ctl.health_check_period_s, timeout_s=ctl.health_check_timeout_s,
                          failure_threshold=ctl.health_check_failures).run(),
        ]
        autoscaler = Autoscaler(self.controller, self.config, latency)
        if autoscaler.policies:
            loops.append(autoscaler.run())
        self._control_loop = asyncio.get_running_loop()
        self._control_tasks = [asyncio.create_task(c, name=f"tessera-control-{i}") for i, c in enumerate(loops)]

    async def stop_control(self) -> None:
        """Cancel the control loops (workers starting or draining stay members: ``shutdown``
        stops them)."""
        tasks, self._control_tasks = self._control_tasks, []
        self._control_loop = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_control_from_outside(self, timeout_s: float) -> None:
        loop = self._control_loop
        if not self._control_tasks or loop is None:
            return
        if loop.is_closed() or not loop.is_running():
            self._control_tasks, self._control_loop = [], None
            return
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:  # called on the loop itself: cancel, cannot wait
                for task in self._control_tasks:
                    task.cancel()
                self._control_tasks, self._control_loop = [], None
                return
        try:
            asyncio.run_coroutine_threadsafe(self.stop_control(), loop).result(timeout_s)
        except Exception:  # noqa: BLE001 - best effort: shutdown goes on
            log.warning("control loops did not stop within %.0f s", timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the control loops, shut every worker down (in parallel), kill them, and end Ray if
        this cluster started it."""
        import ray

        self._stop_control_from_outside(timeout_s)
        workers = self.controller.workers()
        for w in workers:
            self.controller.drain_worker(w.worker_id)
        if workers and ray.is_initialized():
            refs = []
            for w in workers:
                try:
                    refs.append(w.actor.shutdown.remote())
                except Exception:  # noqa: BLE001 - already dead
                    pass
            try:
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            except Exception:  # noqa: BLE001
                pass
            for w in workers:
                try:
                    ray.kill(w.actor)
                except Exception:  # noqa: BLE001
                    pass
        for w in workers:
            self.controller.remove_worker(w.worker_id)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- helpers --------------------------------------------------------------------------------
    def _create_worker(self, pool: str, pool_config: PoolConfig) -> PoolWorker:
        worker_id = self.controller.new_worker_id(pool)
        return self.controller.add_worker(pool, worker_id, self.launcher.start(pool, worker_id))

    def _wait_ready(self, workers: list[PoolWorker], timeout_s: float) -> None:
        import ray

        refs = {w.actor.ready.remote(): w for w in workers}
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(self._not_ready_message([refs[r] for r in pending], timeout_s))
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(remaining, 1.0))
            for ref in done:
                worker = refs[ref]
                try:
                    info = ray.get(ref)
                    load = ray.get(worker.actor.load.remote(), timeout=30)
                except Exception as exc:  # noqa: BLE001 - the constructor failed
                    raise LaunchError(f"worker {worker.worker_id} failed to start: {_first_line(exc)}") from exc
                self.controller.mark_ready(worker.worker_id, info, load)
                log.info("%s ready on node %s (pid %s)", worker.worker_id, info.node_id[:8], info.pid)

    def _not_ready_message(self, workers: list[PoolWorker], timeout_s: float) -> str:
        import ray

        names = ", ".join(w.worker_id for w in workers)
        asks = {w.pool: _resource_ask(getattr(self.config.pools, w.pool)) for w in workers}
        try:
            available = ray.available_resources()
            total = ray.cluster_resources()
        except Exception:  # noqa: BLE001
            available, total = {}, {}
        return (f"workers not ready after {timeout_s:.0f} s: {names}. Each asks Ray for {asks}; the cluster has "
                f"{_fmt_resources(total)} in total, {_fmt_resources(available)} free. Lower the pools' "
                f"num_cpus/num_gpus/resources, add nodes, or raise startup_timeout_s if loading is slow.")

    def _check_pools(self) -> None:
        for name in self.controller.pools:
            if not self.controller.ready_workers(name):
                raise LaunchError(f"pool {name!r} has no workers: set pools.{name}.num_workers >= 1")


def _resource_ask(pool: PoolConfig) -> dict[str, float]:
    ask = {"CPU": pool.num_cpus}
    if pool.num_gpus:
        ask["GPU"] = pool.num_gpus
    ask.update(pool.resources)
    return ask


def _fmt_resources(res: dict[str, float]) -> str:
    keep = {k: round(v, 2) for k, v in res.items() if not k.startswith(("node:", "memory", "object_store"))}
    return str(keep)


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def worker_state_counts(controller: Controller) -> dict[str, dict[str, int]]:
    """{pool: {state: count}}, for logs."""
    out: dict[str, dict[str, int]] = {}
    for w in controller.workers():
        out.setdefault(w.pool, {s.value: 0 for s in WorkerState})[w.state.value] += 1
    return out
