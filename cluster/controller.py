"""``Controller``: who is in each pool, in which state, how loaded, and how many each pool should have.

The controller owns pool membership. It does not route (that is the router's policy), it does not
decide sizes (``scale`` is called by the ScaleCluster RPC and by the autoscaler,
``cluster.autoscaler``), and it does not create or kill actors itself (a ``WorkerLauncher`` does:
``cluster.launch.RayWorkerLauncher``). Its loop (``run``) converges each pool to its desired size.

A worker's life in a pool::

    scale up ─▶ STARTING ──ready()──▶ READY ──scale down──▶ DRAINING ──idle / drain timeout──▶ stopped
                  │ (scaled down: killed)  │                      │
                  └────────────────────────┴── died / unhealthy ──┴──▶ DEAD ──▶ reaped, shown 60 s

* **Only READY workers are routed to.** DRAINING and DEAD leave routing at once (the router reads
  ``ready_workers`` for every pick).
* **Adding** (``_start``): the launcher creates the actor (STARTING; it loads the model in its
  constructor), ``ready()`` answers, the first ``load()`` is read, then READY. KV pairing is lazy
  per (prefill, decode) pair, so a new decode worker pairs on the first request it gets.
* **Removing** (``_drain``): DRAINING, then wait until the router holds nothing on the worker
  and the worker reports nothing in flight (twice in a row), bounded by the drain timeout; then
  the peers forget their KV pairs with it (``kv_forget_peer``), ``shutdown()``, kill, gone.
  Which workers go (``pick_victims``): STARTING ones first (killed at once), then the least busy,
  newest first.
* **Dead** (the router saw an actor error, or ``cluster.health`` gave up on it): out of routing at
  once; the loop kills the actor (it may be wedged rather than gone), releases its KV pairs, and
  starts a replacement: a pool is kept at its desired size, which is never below ``min_workers``.
  Starts that fail back off (1, 2, 4 ... 60 s) per pool.

Two kinds of load are kept per worker:

* **router accounting** (``inflight_*``, ``reserved_blocks``): what this router has dispatched to
  the worker and not yet seen finish. Exact while one router drives the cluster, cheap (no RPC),
  and what the routing policies read.
* **reported load** (``load``): the worker's own ``load()`` dict, refreshed by ``refresh_loads``
  (status calls, the autoscaler), health probes and drains. The source of truth for status output
  and for capacities that only the worker knows (``kv_blocks_total``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.config import POOL_NAMES
from cluster.contracts import WorkerInfo

log = logging.getLogger(__name__)

DEAD_RETENTION_S = 60.0  # a DEAD worker stays in the status this long after it was reaped
DRAIN_POLL_S = 0.2  # how often a draining worker's load is read
MAX_START_BACKOFF_S = 60.0
STARTING_NOTE_S = 5.0  # how often a STARTING worker's note (what it waits for) is refreshed
# The load() keys that must all be 0 for a worker to hold nothing (besides router accounting).
BUSY_KEYS = {
    "encoder": ("num_queued_items", "num_encoding_items"),
    "prefill": ("num_queued_requests", "num_shipping"),
    "decode": ("num_running", "num_reserved"),
    "colocated": ("num_queued_requests", "num_running"),
}
# load() counters of the KV transport, kept after their worker leaves so cluster totals never drop
KV_COUNTERS = ("kv_bytes_received", "kv_bytes_sent", "kv_transfers_ok", "kv_transfers_failed",
               "kv_transfers_streamed")


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class ScaleError(ValueError):
    """A scale request the controller rejects (unknown pool, size out of range); nothing changed."""


class WorkerLauncher(Protocol):
    """Execution: creates and kills worker actors (``cluster.launch.RayWorkerLauncher``)."""

    def start(self, pool: str, worker_id: str) -> Any:
        """Create the actor (it loads its model in its constructor); return its handle at once."""

    def kill(self, actor: Any) -> None:
        """Force-stop the actor; idempotent, never raises."""

    def describe_starting(self, pool: str, actor: Any) -> str:
        """What a STARTING actor waits for (placement, model load), for the status; "" if unknown."""


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
    error: str = ""  # why the worker is DEAD, or what a STARTING one waits for
    created: float = field(default_factory=time.monotonic)  # when it was added (STARTING)
    state_since: float = field(default_factory=time.monotonic)  # when it entered its current state
    health_failures: int = 0  # consecutive failed health probes (cluster.health)
    is_reaped: bool = False  # DEAD and already killed, its KV pairs released
    # -- router accounting (see the module docstring) -----------------------------------------
    inflight_requests: int = 0  # requests dispatched here and not finished
    inflight_tokens: int = 0  # prefill: prompt tokens not yet prefilled; encoder: media items queued
    reserved_blocks: int = 0  # decode: KV blocks held by this router's reservations
    kv_blocks_total: int = 0  # decode/prefill: cache size reported by the worker

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.reserved_blocks

    @property
    def is_live(self) -> bool:
        """Counts towards the pool's size: STARTING or READY."""
        return self.state in (WorkerState.STARTING, WorkerState.READY)

    def set_state(self, state: WorkerState, now: float) -> None:
        if state != self.state:
            self.state, self.state_since = state, now

    def holds_nothing(self) -> bool:
        """No router accounting and (per its last report) nothing in flight on the worker."""
        if self.inflight_requests or self.inflight_tokens or self.reserved_blocks:
            return False
        return all(not self.load.get(key, 0) for key in BUSY_KEYS.get(self.pool, ()))

    def describe(self) -> dict[str, Any]:
        """The status entry: {"id", "state", node/pid, ...load}."""
        out: dict[str, Any] = {"id": self.worker_id, "state": self.state.value}
        if self.info is not None:
            out.update(node_id=self.info.node_id, pid=self.info.pid, address=self.info.address or "")
        if self.error:
            out["error"] = self.error
        out.update(self.load)
        return out


def pick_victims(workers: Sequence[PoolWorker], num: int) -> list[PoolWorker]:
    """The ``num`` live workers to remove: STARTING ones first (nothing runs on them yet), then the
    least busy READY ones, newest first among equals (older ones have warm caches)."""
    def key(w: PoolWorker):
        return (w.state != WorkerState.STARTING, w.inflight_requests + w.inflight_tokens, -w.created)

    return sorted((w for w in workers if w.is_live), key=key)[:max(0, num)]


class Controller:
    def __init__(self, desired_sizes: dict[str, int] | None = None, *,
                 bounds: dict[str, tuple[int, int]] | None = None, autoscaled: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic):
        names = tuple(desired_sizes) if desired_sizes else POOL_NAMES  # the pools of this deployment's mode
        self.pools: dict[str, dict[str, PoolWorker]] = {name: {} for name in names}
        self.desired_sizes: dict[str, int] = dict(desired_sizes or {name: 0 for name in names})
        self.bounds: dict[str, tuple[int, int]] = {name: (bounds or {}).get(name, (0, 1024)) for name in names}
        self.autoscaled: set[str] = set(autoscaled)  # pools whose size the autoscaler sets
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)  # scaling events
        self.clock = clock  # monotonic seconds: backoff, drain and startup deadlines, state ages (tests inject one)
        self._counters = {name: 0 for name in names}
        self._retired_kv: dict[str, dict[str, int]] = {}  # pool -> KV counters of removed workers
        self._start_failures = {name: 0 for name in names}
        self._retry_at = {name: 0.0 for name in names}
        self._tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._launcher: WorkerLauncher | None = None
        self._startup_timeout_s = 300.0
        self._drain_timeout_s = 600.0

    # -- membership -----------------------------------------------------------------------------
    def new_worker_id(self, pool: str) -> str:
        worker_id = f"{pool}-{self._counters[pool]}"
        self._counters[pool] += 1
        return worker_id

    def add_worker(self, pool: str, worker_id: str, actor) -> PoolWorker:
        if pool not in self.pools:
            raise ValueError(f"unknown pool {pool!r}; expected one of {tuple(self.pools)}")
        if self.find(worker_id) is not None:
            raise ValueError(f"duplicate worker id {worker_id!r}")
        now = self.clock()
        worker = PoolWorker(worker_id, pool, actor, created=now, state_since=now)
        self.pools[pool][worker_id] = worker
        return worker

    def mark_ready(self, worker_id: str, info: WorkerInfo, load: dict[str, Any] | None = None) -> None:
        worker = self.get(worker_id)
        worker.info = info
        if worker.state == WorkerState.STARTING:
            worker.set_state(WorkerState.READY, self.clock())
        if load is not None:
            self._set_load(worker, load)

    def drain_worker(self, worker_id: str) -> None:
        """Stop routing new requests to the worker; what it holds finishes normally."""
        worker = self.get(worker_id)
        if worker.state in (WorkerState.STARTING, WorkerState.READY):
            worker.set_state(WorkerState.DRAINING, self.clock())

    def mark_dead(self, worker_id: str, error: str) -> None:
        """Out of routing at once; the loop reaps it and starts a replacement."""
        worker = self.find(worker_id)
        if worker is not None and worker.state != WorkerState.DEAD:
            if worker.state == WorkerState.DRAINING and not error:
                error = "died while draining"
            worker.set_state(WorkerState.DEAD, self.clock())
            worker.error = error
            log.warning("%s is dead: %s", worker_id, error)
            self._notify()

    def remove_worker(self, worker_id: str) -> PoolWorker:
        worker = self.get(worker_id)
        del self.pools[worker.pool][worker_id]
        retired = self._retired_kv.setdefault(worker.pool, dict.fromkeys(KV_COUNTERS, 0))
        for key in KV_COUNTERS:
            retired[key] += int(worker.load.get(key, 0))
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
        return [w for p in pools for w in self.pools.get(p, {}).values()]

    def ready_workers(self, pool: str) -> list[PoolWorker]:
        return [w for w in self.pools.get(pool, {}).values() if w.state == WorkerState.READY]  # {}: not this mode

    def count(self, pool: str, state: WorkerState) -> int:
        return sum(1 for w in self.pools.get(pool, {}).values() if w.state == state)

    # -- desired sizes (set by ScaleCluster and the autoscaler) ------------------------------------
    def check_sizes(self, sizes: dict[str, int]) -> None:
        """Raise ``ScaleError`` naming every pool or size that is not acceptable."""
        problems = []
        for pool, size in sizes.items():
            if pool not in self.pools:
                problems.append(f"unknown pool {pool!r} (pools: {', '.join(self.pools)})")
                continue
            low, high = self.bounds[pool]
            if not low <= int(size) <= high:
                problems.append(f"{pool}={size} is outside min_workers..max_workers = {low}..{high}")
        if problems:
            raise ScaleError("; ".join(problems))

    def scale(self, sizes: dict[str, int], source: str = "admin") -> str:
        """Set desired sizes (all or nothing) and wake the loop; returns what will change.
        Raises ``ScaleError``. Returns at once: workers start and drain in the background."""
        self.check_sizes(sizes)
        changes = []
        for pool, size in sizes.items():
            size, old = int(size), self.desired_sizes.get(pool, 0)
            self.desired_sizes[pool] = size
            if size != old:
                changes.append(f"{pool} {old} -> {size}")
                self.history.append({"time": self.clock(), "event": "scale", "pool": pool, "from": old,
                                     "to": size, "source": source})
                log.info("scale %s %d -> %d (%s)", pool, old, size, source)
        self._notify()
        note = [p for p in sizes if p in self.autoscaled and source != "autoscaler"]
        text = "; ".join(changes) if changes else "no change"
        if note:
            text += f" (autoscaling is on for {', '.join(note)}: it may change this later)"
        return text

    # -- load -----------------------------------------------------------------------------------
    def _set_load(self, worker: PoolWorker, load: dict[str, Any]) -> None:
        worker.load = dict(load)
        worker.load_time = self.clock()
        total = load.get("kv_blocks_total")
        if total is not None:
            worker.kv_blocks_total = int(total)

    def record_load(self, worker: PoolWorker, load: dict[str, Any]) -> None:
        """A fresh load report from elsewhere (a health probe)."""
        self._set_load(worker, load)

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
        prefill = [w.load for w in self.workers("prefill")] + [self._retired_kv.get("prefill", {})]
        totals["transfers_streamed"] = sum(int(r.get("kv_transfers_streamed", 0)) for r in prefill)
        for pool, prefix in (("decode", "kv_bytes_received"), ("prefill", "kv_bytes_sent")):
            reports = [w.load for w in self.workers(pool)] + [self._retired_kv.get(pool, {})]
            num_bytes = sum(int(r.get(prefix, 0)) for r in reports)
            if num_bytes or pool == "prefill":
                totals["bytes"] = num_bytes
                totals["transfers_completed"] = sum(int(r.get("kv_transfers_ok", 0)) for r in reports)
                totals["transfers_failed"] = sum(int(r.get("kv_transfers_failed", 0)) for r in reports)
                break
        return totals

    def status(self, transport: str) -> dict[str, Any]:
        """The cluster snapshot (after ``refresh_loads``), in the shape `tessera status --json`
        prints: {"pools": {name: {"desired_size", "min_workers", "max_workers", "autoscaling",
        "workers": [...]}}, "kv_transfer": {...}}."""
        return {
            "pools": {
                name: {"desired_size": self.desired_sizes.get(name, len(members)),
                       "min_workers": self.bounds[name][0], "max_workers": self.bounds[name][1],
                       "autoscaling": name in self.autoscaled,
                       "workers": [w.describe() for w in members.values()]}
                for name, members in self.pools.items()
            },
            "kv_transfer": {"transport": transport, **self.kv_transfer_totals()},
        }

    # -- the loop: converge every pool to its desired size ---------------------------------------
    async def run(self, launcher: WorkerLauncher, *, startup_timeout_s: float, drain_timeout_s: float,
                  poll_s: float = 0.5) -> None:
        """Until cancelled: reconcile, then sleep until woken (scale, a death) or ``poll_s``."""
        self._launcher = launcher
        self._startup_timeout_s = startup_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._wake = asyncio.Event()
        try:
            while True:
                self._wake.clear()
                self.reconcile()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll_s)
        finally:
            self._wake = None
            tasks, self._tasks = list(self._tasks), set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def reconcile(self) -> None:
        """One pass: reap the dead, start or drain workers so each pool's live count (STARTING +
        READY) equals its desired size."""
        now = self.clock()
        for pool in self.pools:
            members = list(self.pools[pool].values())
            for w in members:
                if w.state == WorkerState.DEAD and not w.is_reaped:
                    w.is_reaped = True
                    self._spawn(self._reap(w))
                elif w.state == WorkerState.DEAD and now - w.state_since > DEAD_RETENTION_S:
                    self.remove_worker(w.worker_id)
            live = [w for w in members if w.is_live]
            desired = self.desired_sizes.get(pool, 0)
            if len(live) < desired and now >= self._retry_at[pool]:
                for _ in range(desired - len(live)):
                    self._start(pool)
            elif len(live) > desired:
                for w in pick_victims(live, len(live) - desired):
                    was_starting = w.state == WorkerState.STARTING
                    self.drain_worker(w.worker_id)
                    if was_starting:  # nothing runs on it: kill now; _wait_ready removes it
                        self._launcher.kill(w.actor)
                    else:
                        self._spawn(self._drain(w))

    def _start(self, pool: str) -> None:
        worker_id = self.new_worker_id(pool)
        try:
            actor = self._launcher.start(pool, worker_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a bad resource request
            self._start_failed(pool, f"{worker_id} could not be created: {exc}")
            return
        worker = self.add_worker(pool, worker_id, actor)
        self._spawn(self._wait_ready(worker))

    async def _wait_ready(self, worker: PoolWorker) -> None:
        ready = asyncio.ensure_future(_await_ref(worker.actor.ready.remote()))
        try:
            deadline = self.clock() + self._startup_timeout_s
            while not ready.done():
                remaining = deadline - self.clock()
                if remaining <= 0:
                    ready.cancel()
                    raise asyncio.TimeoutError
                await asyncio.wait([ready], timeout=min(remaining, STARTING_NOTE_S))
                if not ready.done() and hasattr(self._launcher, "describe_starting"):
                    worker.error = self._launcher.describe_starting(worker.pool, worker.actor)
            info = ready.result()
            load = await asyncio.wait_for(_await_ref(worker.actor.load.remote()), 30.0)
            worker.error = ""
        except asyncio.CancelledError:
            ready.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - constructor failed, timed out (no resources), killed
            if worker.state == WorkerState.DRAINING:  # scaled down before it was ready: it was killed
                self.remove_worker(worker.worker_id)
                return
            self._launcher.kill(worker.actor)
            reason = (f"not ready after {self._startup_timeout_s:.0f} s ({worker.error or 'still loading'}; see "
                      f"startup_timeout_s)" if isinstance(exc, asyncio.TimeoutError) else _first_line(exc))
            self.mark_dead(worker.worker_id, f"failed to start: {reason}")
            self._start_failed(worker.pool, f"{worker.worker_id} failed to start: {reason}")
            return
        if worker.state == WorkerState.DRAINING:  # scaled away while starting (and killed): forget it
            if self.find(worker.worker_id) is worker:
                self.remove_worker(worker.worker_id)
            return
        if worker.state != WorkerState.STARTING:  # dead meanwhile: the reaper has it
            return
        self.mark_ready(worker.worker_id, info, load)
        self._start_failures[worker.pool] = 0
        seconds = self.clock() - worker.created
        self.history.append({"time": self.clock(), "event": "ready", "pool": worker.pool,
                             "worker_id": worker.worker_id, "seconds": seconds})
        log.info("%s ready in %.1f s on node %s (pid %s)", worker.worker_id, seconds, info.node_id[:8], info.pid)

    def _start_failed(self, pool: str, message: str) -> None:
        self._start_failures[pool] += 1
        backoff = min(MAX_START_BACKOFF_S, 2.0 ** (self._start_failures[pool] - 1))
        self._retry_at[pool] = self.clock() + backoff
        log.warning("%s; next start in %.0f s", message, backoff)

    async def _drain(self, worker: PoolWorker) -> None:
        """Wait until the worker holds nothing (bounded), release its KV pairs, stop it, forget it."""
        start = self.clock()
        deadline = start + self._drain_timeout_s
        num_idle = 0
        while num_idle < 2:  # twice in a row: a reservation sent just before DRAINING has landed by then
            if worker.state == WorkerState.DEAD:
                return  # the reaper takes over
            if self.clock() >= deadline:
                log.warning("%s: drain timeout (%.0f s) with work left: %s; stopping it", worker.worker_id,
                            self._drain_timeout_s, {k: worker.load.get(k) for k in BUSY_KEYS[worker.pool]})
                break
            try:
                self._set_load(worker, await asyncio.wait_for(_await_ref(worker.actor.load.remote()), 10.0))
            except asyncio.TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001
                if _is_actor_death(exc):
                    self.mark_dead(worker.worker_id, f"died while draining: {_first_line(exc)}")
                    return
            num_idle = num_idle + 1 if worker.holds_nothing() else 0
            await asyncio.sleep(DRAIN_POLL_S)
        await self._release_pairs(worker)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_await_ref(worker.actor.shutdown.remote()), 10.0)
        self._launcher.kill(worker.actor)
        if self.find(worker.worker_id) is worker:
            self.remove_worker(worker.worker_id)
        seconds = self.clock() - start
        self.history.append({"time": self.clock(), "event": "drained", "pool": worker.pool,
                             "worker_id": worker.worker_id, "seconds": seconds})
        log.info("%s drained and stopped in %.1f s", worker.worker_id, seconds)

    async def _reap(self, worker: PoolWorker) -> None:
        """A DEAD worker: kill the actor (it may be wedged, not gone) and release its KV pairs."""
        self._launcher.kill(worker.actor)
        await self._release_pairs(worker)

    async def _release_pairs(self, worker: PoolWorker) -> None:
        """Tell the other side of every KV pair the worker had to drop it (best effort)."""
        peers = {"decode": "prefill", "prefill": "decode"}.get(worker.pool)
        if peers is None:
            return
        others = [w for w in self.workers(peers) if w.state in (WorkerState.READY, WorkerState.DRAINING)]

        async def forget(other: PoolWorker) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_await_ref(other.actor.kv_forget_peer.remote(worker.worker_id)), 10.0)

        await asyncio.gather(*(forget(o) for o in others))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("controller task failed", exc_info=task.exception())
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()


async def _await_ref(ref):
    return await ref


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


def _is_actor_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))
