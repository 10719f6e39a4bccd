"""Health checks of the pools' workers: a periodic probe of the serving path, not just liveness.

Every ``period_s`` each READY or DRAINING worker is asked ``health_probe()`` (``BaseWorker``): the
call travels the same path as a request (Ray actor call -> the worker's event loop), checks that
the worker's *model thread* (the one thread every forward runs on) makes progress: idle, it runs a
tiny device op; busy, its current step must be younger than ``timeout_s``, so a wedged forward or
a hung device fails the probe while a burst of long steps does not. It returns the worker's
``load()`` (recorded, so the status and the autoscaler see fresh numbers).

    outcome                                   what happens
    answered within timeout_s                 failures reset to 0, load recorded
    raised, or timed out                      failures += 1; at ``failure_threshold`` -> DEAD
    the actor died (ActorDiedError)           DEAD at once

DEAD is ``Controller.mark_dead``: the worker leaves routing at once and the controller's loop
kills it, releases its KV pairs and starts a replacement. A SIGKILLed worker is therefore out of
routing within one period (plus the time Ray takes to notice the process is gone).
"""

from __future__ import annotations

import asyncio
import logging

from cluster.controller import Controller, PoolWorker, WorkerState

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, controller: Controller, *, period_s: float, timeout_s: float, failure_threshold: int):
        self.controller = controller
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.failure_threshold = failure_threshold

    async def run(self) -> None:
        """Probe every worker each period, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.check_all()
            await asyncio.sleep(max(0.0, self.period_s - (loop.time() - started)))

    async def check_all(self) -> None:
        workers = [w for w in self.controller.workers() if w.state in (WorkerState.READY, WorkerState.DRAINING)]
        await asyncio.gather(*(self.check(w) for w in workers))

    async def check(self, worker: PoolWorker) -> bool:
        """Probe one worker; True if it answered."""
        from ray.exceptions import ActorDiedError

        try:
            report = await asyncio.wait_for(_await_ref(worker.actor.health_probe.remote(self.timeout_s)),
                                            self.timeout_s)
        except ActorDiedError as exc:
            self.controller.mark_dead(worker.worker_id, f"actor died: {_short(exc)}")
            return False
        except Exception as exc:  # noqa: BLE001 - a timeout, an error in the probe, an unreachable actor
            if worker.state == WorkerState.DEAD:
                return False
            worker.health_failures += 1
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else _short(exc)
            log.warning("%s: health probe failed (%d/%d): %s", worker.worker_id, worker.health_failures,
                        self.failure_threshold, reason)
            if worker.health_failures >= self.failure_threshold:
                self.controller.mark_dead(worker.worker_id,
                                          f"{worker.health_failures} health probes failed in a row: {reason}")
            return False
        worker.health_failures = 0
        if worker.state != WorkerState.DEAD:
            self.controller.record_load(worker, report)
        return True


async def _await_ref(ref):
    return await ref


def _short(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]
