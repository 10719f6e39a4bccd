"""The controller's loop with fake actors and a fake launcher (no Ray): scale up to READY, drain
before stopping (bounded by the drain timeout), STARTING workers removed at once, dead workers
reaped (killed, KV pairs released) and replaced, failed starts backed off, victims picked."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from cluster.contracts import WorkerInfo
from cluster.controller import Controller, PoolWorker, WorkerState, pick_victims

IDLE = {"encoder": {"num_queued_items": 0, "num_encoding_items": 0},
        "prefill": {"num_queued_requests": 0, "num_shipping": 0},
        "decode": {"num_running": 0, "num_reserved": 0, "kv_blocks_total": 10, "kv_blocks_free": 10}}


class FakeMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)  # a coroutine: the controller awaits it like an ObjectRef


class FakeActor:
    def __init__(self, pool: str, worker_id: str, *, ready_after_s: float = 0.0, fail: bool = False):
        self.pool, self.worker_id = pool, worker_id
        self.ready_after_s, self.fail = ready_after_s, fail
        self.load_report = dict(IDLE[pool])
        self.killed = False
        self.calls: list[tuple] = []
        for name in ("ready", "load", "shutdown", "kv_forget_peer"):
            setattr(self, name, FakeMethod(getattr(self, f"_{name}")))

    async def _ready(self):
        waited = 0.0
        while waited < self.ready_after_s or self.ready_after_s < 0:  # < 0: never ready
            if self.killed:
                raise ActorDiedError()
            await asyncio.sleep(0.01)
            waited += 0.01
        if self.fail or self.killed:
            raise RuntimeError("constructor failed")
        return WorkerInfo(self.worker_id, self.pool, "node", 1)

    async def _load(self):
        if self.killed:
            raise ActorDiedError()
        return dict(self.load_report)

    async def _shutdown(self):
        self.calls.append(("shutdown",))

    async def _kv_forget_peer(self, peer_id):
        self.calls.append(("kv_forget_peer", peer_id))


class FakeLauncher:
    def __init__(self, **actor_options):
        self.actor_options = actor_options
        self.started: dict[str, FakeActor] = {}

    def start(self, pool, worker_id):
        actor = FakeActor(pool, worker_id, **self.actor_options.get(pool, {}))
        self.started[worker_id] = actor
        return actor

    def kill(self, actor):
        actor.killed = True


async def until(condition, timeout_s: float = 5.0):
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


class FakeClock:
    """The controller's clock, moved by hand: backoffs and deadlines pass when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_controller(scenario, launcher: FakeLauncher, sizes=None, drain_timeout_s: float = 5.0, clock=None):
    """Start ``sizes`` workers READY, run the controller loop, then ``await scenario(ctl)``."""
    sizes = sizes or {"encoder": 1, "prefill": 1, "decode": 1}

    async def main():
        ctl = Controller(dict(sizes), bounds={p: (1, 4) for p in sizes}, **({"clock": clock} if clock else {}))
        for pool, n in sizes.items():
            for _ in range(n):
                wid = ctl.new_worker_id(pool)
                ctl.add_worker(pool, wid, launcher.start(pool, wid))
                ctl.mark_ready(wid, WorkerInfo(wid, pool, "node", 1), dict(IDLE[pool]))
        loop = asyncio.create_task(ctl.run(launcher, startup_timeout_s=2.0, drain_timeout_s=drain_timeout_s,
                                           poll_s=0.05))
        try:
            await scenario(ctl)
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(main())


def test_scale_up_starts_workers_that_join_once_ready():
    launcher = FakeLauncher(decode={"ready_after_s": 0.2})

    async def scenario(ctl):
        assert ctl.scale({"decode": 3}) == "decode 1 -> 3"
        await until(lambda: len(ctl.workers("decode")) == 3)
        assert [w.state for w in ctl.workers("decode")][1:] == [WorkerState.STARTING] * 2
        assert len(ctl.ready_workers("decode")) == 1  # not routed to while starting
        await until(lambda: len(ctl.ready_workers("decode")) == 3)
        assert [e["event"] for e in ctl.history].count("ready") == 2

    run_controller(scenario, launcher)


def test_scale_down_drains_then_stops_and_releases_kv_pairs():
    launcher = FakeLauncher()

    async def scenario(ctl):
        busy, idle = ctl.workers("decode")
        busy.actor.load_report["num_running"] = 1  # what the worker says it still runs
        busy.inflight_requests, idle.inflight_requests = 2, 1  # what the router dispatched
        ctl.scale({"decode": 1})
        await until(lambda: idle.state == WorkerState.DRAINING)  # the least busy goes
        assert ctl.ready_workers("decode") == [busy]
        await asyncio.sleep(0.5)
        assert ctl.find(idle.worker_id) is idle  # still holds a request (router accounting)
        idle.inflight_requests = 0
        await until(lambda: ctl.find(idle.worker_id) is None)
        assert idle.actor.killed and ("shutdown",) in idle.actor.calls
        [prefill] = ctl.workers("prefill")
        assert ("kv_forget_peer", idle.worker_id) in prefill.actor.calls
        assert not busy.actor.killed

    run_controller(scenario, launcher, sizes={"encoder": 1, "prefill": 1, "decode": 2})


def test_drain_is_bounded_by_the_drain_timeout():
    launcher = FakeLauncher()

    async def scenario(ctl):
        for w in ctl.workers("encoder"):
            w.actor.load_report["num_queued_items"] = 5  # never finishes
        ctl.scale({"encoder": 1})
        await until(lambda: len(ctl.workers("encoder")) == 1, timeout_s=3.0)
        [drained] = [e for e in ctl.history if e["event"] == "drained"]
        assert 0.3 <= drained["seconds"] < 2.0

    run_controller(scenario, launcher, sizes={"encoder": 2, "prefill": 1, "decode": 1}, drain_timeout_s=0.3)


def test_a_starting_worker_scaled_away_is_killed_at_once():
    launcher = FakeLauncher(prefill={"ready_after_s": -1})  # new prefill workers never get ready

    async def scenario(ctl):
        ctl.scale({"prefill": 2})
        await until(lambda: len(ctl.workers("prefill")) == 2)
        [starting] = [w for w in ctl.workers("prefill") if w.state == WorkerState.STARTING]
        ctl.scale({"prefill": 1})
        await until(lambda: ctl.find(starting.worker_id) is None)
        assert starting.actor.killed and len(ctl.ready_workers("prefill")) == 1

    run_controller(scenario, launcher)


def test_a_dead_worker_is_reaped_and_replaced_up_to_the_desired_size():
    launcher = FakeLauncher()

    async def scenario(ctl):
        [dead] = ctl.workers("decode")
        ctl.mark_dead(dead.worker_id, "actor died")
        assert ctl.ready_workers("decode") == []  # out of routing at once
        await until(lambda: len(ctl.ready_workers("decode")) == 1)
        assert dead.actor.killed and dead.state == WorkerState.DEAD and ctl.find(dead.worker_id) is dead
        [prefill] = ctl.workers("prefill")
        assert ("kv_forget_peer", dead.worker_id) in prefill.actor.calls
        status = ctl.status("gloo")["pools"]["decode"]
        assert [w["state"] for w in status["workers"]] == ["dead", "ready"] and status["workers"][0]["error"]

    run_controller(scenario, launcher)


def test_failed_starts_back_off():
    """The controller's clock decides the backoff (no wall-clock bound): while it stands still
    no new start comes, however many passes the loop makes; 1 s later on it, the next one does."""
    launcher, clock = FakeLauncher(encoder={"fail": True}), FakeClock()

    async def scenario(ctl):
        ctl.scale({"encoder": 2})
        await until(lambda: any(w.state == WorkerState.DEAD for w in ctl.workers("encoder")))
        for _ in range(5):  # reconcile passes (poll_s = 0.05) at the same instant
            await ctl_pass(ctl)
        assert len(launcher.started) == 4  # 3 initial + 1 attempt: the next waits for the 1 s backoff
        clock.now += 0.9
        await ctl_pass(ctl)
        assert len(launcher.started) == 4
        clock.now += 0.2  # past the backoff on the controller's clock (~0.5 s of real time since)
        await until(lambda: len(launcher.started) == 5, timeout_s=0.3)  # at once, not 1 s of real time later

    run_controller(scenario, launcher, clock=clock)


async def ctl_pass(ctl) -> None:
    """Let the controller's loop run one more pass (it reconciles every poll_s = 0.05 s)."""
    await asyncio.sleep(0.06)


def test_scale_checks_every_size_first():
    ctl = Controller({"encoder": 1, "prefill": 1, "decode": 1}, bounds={"decode": (1, 4)}, autoscaled=["decode"])
    with pytest.raises(ValueError, match="gpu.*decode=9|decode=9.*gpu"):
        ctl.scale({"decode": 9, "gpu": 1})
    with pytest.raises(ValueError):
        ctl.scale({"decode": 2, "encoder": -1})
    assert ctl.desired_sizes == {"encoder": 1, "prefill": 1, "decode": 1}  # all or nothing
    assert "autoscaling is on for decode" in ctl.scale({"decode": 2})
    assert ctl.scale({"decode": 2}).startswith("no change")


def test_pick_victims_prefers_starting_then_least_busy_newest():
    workers = [PoolWorker(f"d-{i}", "decode", None, state=s, created=float(i))
               for i, s in enumerate([WorkerState.READY, WorkerState.READY, WorkerState.STARTING,
                                      WorkerState.READY, WorkerState.DRAINING])]
    workers[0].inflight_requests = 3
    assert [w.worker_id for w in pick_victims(workers, 3)] == ["d-2", "d-3", "d-1"]


# -- health checks -------------------------------------------------------------------------------
class ProbedActor(FakeActor):
    """``health_probe`` answers, hangs, raises, or finds the actor dead, as ``mode`` says."""

    def __init__(self, pool, worker_id, mode="ok"):
        super().__init__(pool, worker_id)
        self.mode = mode
        self.health_probe = FakeMethod(self._probe)

    async def _probe(self, timeout_s):
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "error":
            raise RuntimeError("engine loop stopped")
        if self.mode == "died":
            raise ActorDiedError()
        return {**self.load_report, "num_running": 3}


def test_health_monitor_counts_failures_and_marks_dead():
    from cluster.health import HealthMonitor

    async def main():
        ctl = Controller({"decode": 4})
        for i, mode in enumerate(["ok", "hang", "error", "died"]):
            wid = f"decode-{i}"
            ctl.add_worker("decode", wid, ProbedActor("decode", wid, mode))
            ctl.mark_ready(wid, WorkerInfo(wid, "decode", "node", 1), dict(IDLE["decode"]))
        ok, hang, error, died = ctl.workers("decode")
        monitor = HealthMonitor(ctl, period_s=0.05, timeout_s=0.05, failure_threshold=2)
        await monitor.check_all()
        assert died.state == WorkerState.DEAD and "died" in died.error  # at once
        assert (hang.state, hang.health_failures, error.state, error.health_failures) == \
            (WorkerState.READY, 1, WorkerState.READY, 1)  # one failure is not enough
        assert ok.load["num_running"] == 3  # a probe's report is the fresh load
        error.actor.mode = "ok"
        await monitor.check_all()
        assert hang.state == WorkerState.DEAD and "2 health probes failed" in hang.error
        assert (error.state, error.health_failures) == (WorkerState.READY, 0)  # a success resets the count
        assert [w.worker_id for w in ctl.ready_workers("decode")] == ["decode-0", "decode-2"]

    asyncio.run(main())


def test_worker_health_probe_exercises_the_loop_and_the_model_thread():
    from cluster.worker_base import BaseWorker

    class Worker(BaseWorker):
        pool = "decode"

        def __init__(self):
            super().__init__("decode-9")
            self.crash = asyncio.Event()

        async def _engine_loop(self):
            await self.crash.wait()
            raise RuntimeError("bug")

        def _load(self):
            return {"num_running": 0}

    async def main():
        worker = Worker()
        worker._ensure_loop()  # what ready() does, without asking Ray who we are
        assert (await worker.health_probe(1.0))["healthy"] is True
        worker._model_executor.submit(__import__("time").sleep, 0.5)  # a long forward on the model thread
        with pytest.raises(asyncio.TimeoutError):
            await worker.health_probe(0.1)  # the model thread did not answer in time
        worker.crash.set()
        await asyncio.sleep(0.6)
        with pytest.raises(RuntimeError, match="engine loop stopped"):
            await worker.health_probe(1.0)
        await worker.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            await worker.health_probe(1.0)

    asyncio.run(main())
