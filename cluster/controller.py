"""``Controller``: who is in each pool, in which state, and how loaded.

The controller owns pool membership; it does not route (that is the router's policy) and it does
not create actors (that is ``cluster.launch``). A worker's life in a pool::

    add_worker ──▶ STARTING ──ready()──▶ READY ──drain──▶ DRAINING ──remove_worker──▶ (gone)
                       │                   │                  │
                       └───────────────────┴── actor died ────┴──▶ DEAD

Only READY workers are routed to. Two kinds of load are kept per worker:

* **router accounting** (``inflight_*``, ``reserved_blocks``): what this router has dispatched to
  the worker and not yet seen finish. Exact while one router drives the cluster, cheap (no RPC),
  and what the routing policies read.
* **reported load** (``load``): the worker's own ``load()`` dict, refreshed by
  ``refresh_loads`` (status calls, periodic polling). The source of truth for status output and
  for capacities that only the worker knows (``kv_blocks_total``).

Runtime scaling (a later issue) fits here: ``add_worker`` / ``drain_worker`` / ``remove_worker``
are the primitives a ScaleCluster handler or an autoscaler loop would call.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.config import POOL_NAMES
from cluster.contracts import WorkerInfo


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class PoolWorker:
    """One worker actor of a pool, with its state and load."""

    worker_id: str
    pool: str  # "encoder" | "prefill" | "decode"
    actor: Any  # ray.actor.ActorHandle
    state: WorkerState = WorkerState.STARTING
    info: WorkerInfo | None = None  # set once ready() answered
    load: dict[str, Any] = field(default_factory=dict)  # last load() report
    load_time: float = 0.0  # time.monotonic() of that report
    error: str = ""  # why the worker is DEAD
    # -- router accounting (see the module docstring) -----------------------------------------
    inflight_requests: int = 0  # requests dispatched here and not finished
    inflight_tokens: int = 0  # prefill: prompt tokens not yet prefilled; encoder: media items queued
    reserved_blocks: int = 0  # decode: KV blocks held by this router's reservations
    kv_blocks_total: int = 0  # decode/prefill: cache size reported by the worker

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.reserved_blocks

    def describe(self) -> dict[str, Any]:
        """The status entry: {"id", "state", node/pid, ...load}."""
        out: dict[str, Any] = {"id": self.worker_id, "state": self.state.value}
        if self.info is not None:
            out.update(node_id=self.info.node_id, pid=self.info.pid, address=self.info.address or "")
        if self.error:
            out["error"] = self.error
        out.update(self.load)
        return out


class Controller:
    def __init__(self, desired_sizes: dict[str, int] | None = None):
        self.pools: dict[str, dict[str, PoolWorker]] = {name: {} for name in POOL_NAMES}
        self.desired_sizes: dict[str, int] = dict(desired_sizes or {name: 0 for name in POOL_NAMES})

    # -- membership -----------------------------------------------------------------------------
    def add_worker(self, pool: str, worker_id: str, actor) -> PoolWorker:
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r}; expected one of {POOL_NAMES}")
        if self.find(worker_id) is not None:
            raise ValueError(f"duplicate worker id {worker_id!r}")
        worker = PoolWorker(worker_id, pool, actor)
        self.pools[pool][worker_id] = worker
        return worker

    def mark_ready(self, worker_id: str, info: WorkerInfo, load: dict[str, Any] | None = None) -> None:
        worker = self.get(worker_id)
        worker.info = info
        worker.state = WorkerState.READY
        if load is not None:
            self._set_load(worker, load)

    def drain_worker(self, worker_id: str) -> None:
        """Stop routing new requests to the worker; what it holds finishes normally."""
        worker = self.get(worker_id)
        if worker.state in (WorkerState.STARTING, WorkerState.READY):
            worker.state = WorkerState.DRAINING

    def mark_dead(self, worker_id: str, error: str) -> None:
        worker = self.find(worker_id)
        if worker is not None and worker.state != WorkerState.DEAD:
            worker.state = WorkerState.DEAD
            worker.error = error

    def remove_worker(self, worker_id: str) -> PoolWorker:
        worker = self.get(worker_id)
        del self.pools[worker.pool][worker_id]
        return worker

    def find(self, worker_id: str) -> PoolWorker | None:
        for members in self.pools.values():
            if worker_id in members:
                return members[worker_id]
        return None

    def get(self, worker_id: str) -> PoolWorker:
        worker = self.find(worker_id)
        if worker is None:
            raise KeyError(f"no worker {worker_id!r}")
        return worker

    def workers(self, pool: str | None = None) -> list[PoolWorker]:
        pools = [pool] if pool else list(self.pools)
        return [w for p in pools for w in self.pools[p].values()]

    def ready_workers(self, pool: str) -> list[PoolWorker]:
        return [w for w in self.pools[pool].values() if w.state == WorkerState.READY]

    # -- load -----------------------------------------------------------------------------------
    def _set_load(self, worker: PoolWorker, load: dict[str, Any]) -> None:
        worker.load = dict(load)
        worker.load_time = time.monotonic()
        total = load.get("kv_blocks_total")
        if total is not None:
            worker.kv_blocks_total = int(total)

    async def refresh_loads(self, timeout_s: float = 5.0) -> None:
        """Ask every live worker for ``load()`` concurrently; a worker that fails is marked DEAD,
        one that is merely slow keeps its previous report."""
        live = [w for w in self.workers() if w.state in (WorkerState.READY, WorkerState.DRAINING)]

        async def one(worker: PoolWorker) -> None:
            try:
                self._set_load(worker, await asyncio.wait_for(_await_ref(worker.actor.load.remote()), timeout_s))
            except asyncio.TimeoutError:
                pass
            except Exception as exc:  # noqa: BLE001 - any actor failure
                if _is_actor_death(exc):
                    self.mark_dead(worker.worker_id, f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(w) for w in live))

    def kv_transfer_totals(self) -> dict[str, int]:
        """Bytes/transfers summed over decode workers' reports (the receiving side counts each
        transfer once), falling back to the prefill side's counters."""
        totals = {"bytes": 0, "transfers_completed": 0, "transfers_failed": 0}
        for pool, prefix in (("decode", "kv_bytes_received"), ("prefill", "kv_bytes_sent")):
            reports = [w.load for w in self.workers(pool)]
            num_bytes = sum(int(r.get(prefix, 0)) for r in reports)
            if num_bytes or pool == "prefill":
                totals["bytes"] = num_bytes
                totals["transfers_completed"] = sum(int(r.get("kv_transfers_ok", 0)) for r in reports)
                totals["transfers_failed"] = sum(int(r.get("kv_transfers_failed", 0)) for r in reports)
                break
        return totals

    def status(self, transport: str) -> dict[str, Any]:
        """The cluster snapshot (after ``refresh_loads``), in the shape `tessera status --json`
        prints: {"pools": {name: {"desired_size", "workers": [...]}}, "kv_transfer": {...}}."""
        return {
            "pools": {
                name: {"desired_size": self.desired_sizes.get(name, len(members)),
                       "workers": [w.describe() for w in members.values()]}
                for name, members in self.pools.items()
            },
            "kv_transfer": {"transport": transport, **self.kv_transfer_totals()},
        }


async def _await_ref(ref):
    return await ref


def _is_actor_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))
