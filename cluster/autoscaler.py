"""The autoscaler: a pure policy per pool (``PoolAutoscaler``) and the loop that feeds it
(``Autoscaler``).

Policy (pure: metric samples and a clock in, a pool size out; unit-tested with a fake clock)::

    observe(PoolSample)        every interval: the pool's metrics now (totals over READY workers,
                               mean latencies of requests that finished since the last sample)
    decide(now, current, ...)  1. recommendation: mean of each metric over the look-back window,
                                  turned into a worker count per target (below), the largest wins,
                                  clamped to min_workers..max_workers
                               2. hysteresis: the size moves up only once every recommendation for
                                  ``upscale_delay_s`` was above the current size, down only once
                                  every one for ``downscale_delay_s`` was below it, and then to the
                                  latest recommendation; any size change, or a recommendation equal
                                  to the current size (or on the other side), restarts the clock.
                                  No scale-up while workers are still starting.

How a target becomes a worker count (``n`` READY workers, ``m`` the window mean):

    additive metrics (queued_items, queued_requests, queued_tokens, running_requests):
        ceil(m_total / target)                     e.g. 40 queued items, 16 per worker -> 3
    per-worker ratios (ttft_s, tpot_s, kv_utilization):
        ceil(n * m / target), kept at n within +-10 %   e.g. TTFT 3 s on 2 workers, target 1 s -> 6

Loop (``Autoscaler.run``): every ``controller.autoscale_interval_s`` refresh the workers' load
reports, build one sample per autoscaled pool from them and from the router's recent latencies
(``LatencyWindow``), and call ``Controller.scale(..., source="autoscaler")`` when the decision
differs from the desired size. The controller then asks Ray for the actors; a pending actor is
resource demand that Ray's own autoscaler (``ray up``, KubeRay) answers with a node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.config import AutoscalingConfig, ClusterConfig
from cluster.controller import Controller, PoolWorker, WorkerState

log = logging.getLogger(__name__)

ADDITIVE_METRICS = frozenset({"queued_items", "queued_requests", "queued_tokens", "running_requests"})
RATIO_METRICS = frozenset({"ttft_s", "tpot_s", "kv_utilization"})
RATIO_TOLERANCE = 0.1  # a ratio within 10 % of its target keeps the current size


@dataclass(frozen=True)
class PoolSample:
    """One observation of a pool. Additive metrics are totals over its READY workers; ratios are
    means (latencies: over requests finished since the previous sample; absent if none did)."""

    time: float  # clock seconds (monotonic in production, fake in tests)
    num_ready: int  # READY workers when sampled
    metrics: dict[str, float] = field(default_factory=dict)  # metric name -> value


class PoolAutoscaler:
    """The policy of one pool. Pure: no Ray, no asyncio, no wall clock."""

    def __init__(self, config: AutoscalingConfig, min_workers: int, max_workers: int):
        self.config = config
        self.targets = config.targets()
        unknown = set(self.targets) - ADDITIVE_METRICS - RATIO_METRICS
        if unknown:
            raise ValueError(f"no scaling rule for metrics {sorted(unknown)}")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self._samples: collections.deque[PoolSample] = collections.deque()
        self._last_size: int | None = None  # the current size seen at the last decide()
        self._trend: tuple[int, float] | None = None  # (+1 more / -1 fewer workers wanted, since when)

    def clamp(self, size: int) -> int:
        return max(self.min_workers, min(self.max_workers, size))

    def observe(self, sample: PoolSample) -> None:
        self._samples.append(sample)
        horizon = sample.time - self.config.window_s
        while self._samples and self._samples[0].time < horizon:
            self._samples.popleft()

    def recommend(self, now: float) -> int | None:
        """Workers the window's mean load calls for (clamped); None without samples in the window."""
        window = [s for s in self._samples if s.time >= now - self.config.window_s]
        if not window:
            return None
        num_ready = max(1, window[-1].num_ready)
        wanted = [self.min_workers]
        for metric, target in self.targets.items():
            values = [s.metrics[metric] for s in window if metric in s.metrics]
            if not values:
                continue
            mean = sum(values) / len(values)
            if metric in ADDITIVE_METRICS:
                wanted.append(math.ceil(mean / target - 1e-9))
            else:
                ratio = mean / target
                wanted.append(num_ready if abs(ratio - 1.0) <= RATIO_TOLERANCE else math.ceil(num_ready * ratio - 1e-9))
        return self.clamp(max(wanted))

    def decide(self, now: float, current: int, num_starting: int = 0) -> int:
        """The size the pool should have now (``current`` if nothing is due)."""
        if current != self._last_size:  # changed (by us or by an admin): start over
            self._trend = None
            self._last_size = current
        if current != self.clamp(current):
            return self._change(self.clamp(current))
        rec = self.recommend(now)
        if rec is None or rec == current:
            self._trend = None
            return current
        direction = 1 if rec > current else -1
        if self._trend is None or self._trend[0] != direction:
            self._trend = (direction, now)
        since = self._trend[1]
        if direction > 0:
            if num_starting == 0 and now - since >= self.config.upscale_delay_s:
                return self._change(rec)
        elif now - since >= self.config.downscale_delay_s:
            return self._change(rec)
        return current

    def _change(self, size: int) -> int:
        self._trend = None
        self._last_size = size
        return size


# ------------------------------------------------------------------------------------------------
# Inputs from the router: recent latencies
# ------------------------------------------------------------------------------------------------

class LatencyWindow:
    """TTFT / TPOT of recently finished requests, for the autoscaler (``RouterCore`` records every
    finished request; TPOT as ``vllm bench`` defines it: (E2E - TTFT) / (output tokens - 1))."""

    def __init__(self, max_samples: int = 20_000, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._samples: collections.deque[tuple[float, float | None, float | None, bool]] = \
            collections.deque(maxlen=max_samples)  # (time, ttft_s, tpot_s, has_media)

    def record(self, ttft_s: float | None, tpot_s: float | None, has_media: bool) -> None:
        self._samples.append((self._clock(), ttft_s, tpot_s, has_media))

    def record_final(self, final) -> None:
        """From a ``router.events.FinalEvent``."""
        n, t = final.usage.completion_tokens, final.timings
        if n:
            tpot = max(0.0, t.e2e_s - t.ttft_s) / (n - 1) if n > 1 else None
            self.record(t.ttft_s, tpot, final.usage.prompt_media_tokens > 0)

    def means(self, since: float, media_only: bool = False) -> dict[str, float]:
        """{"ttft_s", "tpot_s"} means of requests finished after ``since`` (keys absent if none)."""
        ttft, tpot = [], []
        for when, a, b, has_media in reversed(self._samples):
            if when <= since:
                break
            if media_only and not has_media:
                continue
            if a is not None:
                ttft.append(a)
            if b is not None:
                tpot.append(b)
        out = {}
        if ttft:
            out["ttft_s"] = sum(ttft) / len(ttft)
        if tpot:
            out["tpot_s"] = sum(tpot) / len(tpot)
        return out


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def pool_metrics(pool: str, workers: list[PoolWorker]) -> dict[str, float]:
    """The load metrics of a pool from its READY workers' last ``load()`` reports."""
    loads = [w.load for w in workers]

    def total(*keys: str) -> float:
        return float(sum(int(load.get(k, 0)) for load in loads for k in keys))

    if pool == "encoder":
        return {"queued_items": total("num_queued_items", "num_encoding_items")}
    if pool == "prefill":
        return {"queued_requests": total("num_queued_requests"), "queued_tokens": total("num_queued_tokens")}
    used = [1.0 - load["kv_blocks_free"] / load["kv_blocks_total"] for load in loads if load.get("kv_blocks_total")]
    out = {"running_requests": total("num_running")}
    if used:
        out["kv_utilization"] = sum(used) / len(used)
    return out


class Autoscaler:
    def __init__(self, controller: Controller, config: ClusterConfig, latency: LatencyWindow | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.controller = controller
        self.latency = latency
        self.clock = clock
        self.interval_s = config.controller.autoscale_interval_s
        self.policies = {name: PoolAutoscaler(pool.autoscaling, pool.min_workers, pool.max_workers)
                         for name, pool in config.pools.items() if pool.autoscaling.enabled}
        self._last_sample = clock()

    def sample(self, pool: str, now: float) -> PoolSample:
        ready = self.controller.ready_workers(pool)
        metrics = pool_metrics(pool, ready)
        if self.latency is not None:
            latency = self.latency.means(self._last_sample, media_only=(pool == "encoder"))
            metrics.update({k: v for k, v in latency.items() if (k == "tpot_s") == (pool == "decode")})
        return PoolSample(now, len(ready), metrics)

    def step(self) -> dict[str, int]:
        """Sample every autoscaled pool, decide, apply; returns {pool: new size} of the changes."""
        now = self.clock()
        changes = {}
        for pool, policy in self.policies.items():
            policy.observe(self.sample(pool, now))
            current = self.controller.desired_sizes.get(pool, 0)
            size = policy.decide(now, current, self.controller.count(pool, WorkerState.STARTING))
            if size != current:
                changes[pool] = size
        self._last_sample = now
        if changes:
            self.controller.scale(changes, source="autoscaler")
        return changes

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.controller.refresh_loads()
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bad sample must not stop autoscaling
                log.exception("autoscaler step failed")
