"""The load generator: open-loop Poisson arrivals at a rate, or closed-loop at a concurrency.

Every run is bounded twice: by its request list (``len(requests)``) and by ``max_duration_s``.
At the time limit nothing new is sent and requests still running are cancelled; they stay in the
results as failed (``benchmarks.clients.CANCELLED``), so an overloaded rate cannot look good by
leaving its slowest requests out. Requests never sent are counted (``num_not_sent``).

* open loop (``rate``): send times are a Poisson process (exponential gaps, seeded), independent
  of how fast the server answers; ``rate=inf`` sends everything at once. How late each request
  left against its schedule is recorded (``send_lag``): a load generator that cannot keep up
  (CPU-starved on a small machine) shows there, not as server latency.
* closed loop (``concurrency``): that many requests in flight, the next one sent when one ends.

    result = asyncio.run(run_load(client, requests, LoadConfig(rate=2.0, max_duration_s=60)))
    metrics = run_metrics(result.records, result.duration_s, slo)
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.clients import BenchClient
from benchmarks.metrics import RequestRecord, summarize
from benchmarks.workloads import BenchRequest


@dataclass(frozen=True)
class LoadConfig:
    rate: float | None = None  # open loop: requests/s of the Poisson process (math.inf: all at once)
    concurrency: int | None = None  # closed loop: requests in flight
    max_duration_s: float = 60.0  # hard stop of the run, seconds
    request_timeout_s: float = 300.0  # per request
    seed: int = 0  # arrival process

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.max_duration_s > 0:
            raise ValueError("max_duration_s must be > 0")

    @property
    def mode(self) -> str:
        return "open-loop poisson" if self.rate is not None else "closed-loop"


@dataclass
class RunResult:
    label: str
    config: dict[str, Any]
    records: list[RequestRecord]  # times relative to the run's start
    duration_s: float  # first send -> last request ended (or the time limit)
    num_not_sent: int
    hit_time_limit: bool
    send_lag: dict[str, float] = field(default_factory=dict)  # open loop: actual - scheduled send, seconds
    client_cpu: float = 0.0  # load generator CPU time / wall time (1.0: one core fully busy)
    started_at: float = 0.0  # time.time() at the start

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "records"},
                "records": [r.to_dict() for r in self.records]}


def poisson_arrivals(num: int, rate: float, seed: int) -> list[float]:
    """Send offsets (seconds from the start) of ``num`` requests at ``rate`` requests/s."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


def _progress(total: int, label: str, enabled: bool, position: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label or "requests", unit="req", file=sys.stderr, position=position,
                leave=True, dynamic_ncols=True, mininterval=0.5)


async def run_load(client: BenchClient, requests: list[BenchRequest], config: LoadConfig, *, label: str = "",
                   run_id: str = "", progress: bool = True, progress_position: int = 0,
                   stop: asyncio.Event | None = None) -> RunResult:
    """Drive ``requests`` through ``client`` (already started). ``stop``: end the run early (the
    isolation comparison stops its background load when the foreground one is done)."""
    payloads = [client.prepare(r) for r in requests]  # before the clock
    run_id = run_id or f"bench{os.getpid()}-{int(time.time() * 1e3) % 10**9}"
    records: list[RequestRecord] = []
    bar = _progress(len(requests), label, progress, progress_position)
    cpu0, wall0, start = time.process_time(), time.time(), time.perf_counter()
    deadline = start + config.max_duration_s

    async def one(i: int, scheduled: float | None) -> None:
        req = requests[i]
        rec = RequestRecord(req.index, req.component, f"{run_id}-{i}", req.num_images, req.num_audios,
                            req.max_tokens, scheduled_s=scheduled)
        records.append(rec)
        try:
            await client.send(req, payloads[i], rec, config.request_timeout_s)
        finally:
            if bar is not None:
                bar.update(1)

    tasks: list[asyncio.Task] = []
    if config.rate is not None:
        dispatcher = asyncio.ensure_future(_open_loop(one, len(requests), config, start, deadline, tasks))
    else:
        dispatcher = asyncio.ensure_future(_closed_loop(one, len(requests), config, deadline))
    waiters = {dispatcher}
    if stop is not None:
        waiters.add(asyncio.ensure_future(stop.wait()))
    hit_limit = False
    try:
        await asyncio.wait(waiters, timeout=max(0.0, deadline - time.perf_counter()),
                           return_when=asyncio.FIRST_COMPLETED)
        if not dispatcher.done():  # the time limit (or ``stop``)
            hit_limit = stop is None or not stop.is_set()
            dispatcher.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(dispatcher, *tasks, return_exceptions=True)
    finally:
        for w in waiters:
            w.cancel()
        if bar is not None:
            bar.close()
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = (max(ends) if ends else time.perf_counter()) - start
    lags = [r.send_s - r.scheduled_s for r in records if r.scheduled_s is not None]
    cpu = (time.process_time() - cpu0) / max(time.time() - wall0, 1e-9)
    shifted = sorted((r.shifted(start) for r in records), key=lambda r: r.index)
    cfg = {**asdict(config), "mode": config.mode, "num_requests": len(requests), "client": client.name}
    return RunResult(label, cfg, shifted, duration, len(requests) - len(records), hit_limit,
                     {k: v for k, v in summarize(lags).items() if k in ("mean", "p99", "max")} if lags else {},
                     cpu, wall0)


async def _open_loop(one, num: int, config: LoadConfig, start: float, deadline: float,
                     tasks: list[asyncio.Task]) -> None:
    for i, offset in enumerate(poisson_arrivals(num, config.rate, config.seed)):
        at = start + offset
        if at >= deadline:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, at)))
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _closed_loop(one, num: int, config: LoadConfig, deadline: float) -> None:
    next_index = iter(range(num))

    async def worker() -> None:
        for i in next_index:  # shared iterator: each index goes to exactly one worker
            if time.perf_counter() >= deadline:
                return
            await one(i, None)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(config.concurrency, num))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
