"""The autoscaler policy, pure: metric samples and a fake clock in, pool sizes out (compressed time:
window 2 s, up-delay 5 s, down-delay 10 s, a sample every 0.5 s). No Ray, no sleeping."""

from __future__ import annotations

import math

import pytest

from cluster.autoscaler import Autoscaler, LatencyWindow, PoolAutoscaler, PoolSample
from cluster.config import ClusterConfig, DecodeAutoscalingConfig, EncoderAutoscalingConfig
from cluster.contracts import WorkerInfo
from cluster.controller import Controller, WorkerState

DT = 0.5  # seconds between samples
UP, DOWN, WINDOW = 5.0, 10.0, 2.0


def make_policy(min_workers=1, max_workers=4, **targets) -> PoolAutoscaler:
    targets = targets or {"target_running_requests": 8.0, "target_kv_utilization": 0.0}
    config = DecodeAutoscalingConfig(enabled=True, window_s=WINDOW, upscale_delay_s=UP, downscale_delay_s=DOWN,
                                     **{"target_kv_utilization": 0.0, **targets})
    return PoolAutoscaler(config, min_workers, max_workers)


def simulate(policy: PoolAutoscaler, load, start: float, end: float, size: int, changes: list) -> int:
    """Feed ``load(t)`` (total running requests) every DT from ``start`` to ``end``; the pool takes
    each decided size at once. Appends (time, new size) to ``changes``; returns the final size."""
    steps = round((end - start) / DT)
    for i in range(steps + 1):
        now = start + i * DT
        policy.observe(PoolSample(now, size, {"running_requests": float(load(now))}))
        new = policy.decide(now, size)
        if new != size:
            changes.append((now, new))
            size = new
    return size


def test_scales_up_only_after_the_up_delay_of_sustained_load():
    policy, changes = make_policy(), []
    size = simulate(policy, lambda t: 20, 0.0, 4.5, 1, changes)
    assert changes == [] and size == 1  # 4.5 s of load: not yet
    size = simulate(policy, lambda t: 20, 5.0, 8.0, size, changes)
    assert changes == [(5.0, 3)]  # ceil(20 / 8) = 3 workers, right at the delay


def test_scales_down_only_after_the_down_delay_then_to_min():
    policy, changes = make_policy(), []
    size = simulate(policy, lambda t: 20, 0.0, 6.0, 1, changes)
    assert size == 3
    changes.clear()
    size = simulate(policy, lambda t: 0, 6.5, 40.0, size, changes)
    [(when, new)] = changes
    assert new == 1 and size == 1  # straight to the floor: no load at all
    # the load dropped at 6.5 s; the recommendation falls below 3 at once (window mean < 16)
    assert 6.5 + DOWN <= when <= 6.5 + DOWN + DT


def test_a_blip_shorter_than_the_delay_changes_nothing():
    policy, changes = make_policy(), []
    simulate(policy, lambda t: 20 if 10 <= t < 13 else 2, 0.0, 60.0, 1, changes)
    assert changes == []


@pytest.mark.parametrize("period", [2.0, 4.0, 6.0, 8.0])
def test_no_flapping_under_oscillating_load(period):
    """Load swings between 'needs 3' and 'needs 1' in half-periods shorter than the delays: the
    size moves at most once (a fast swing averages to 'needs 2' over the window) and never back;
    after a sustained rise it moves up once and stays through the swings."""
    def swing(t):
        return 20 if math.floor(t / (period / 2)) % 2 == 0 else 4

    policy, changes = make_policy(), []
    simulate(policy, swing, 0.0, 120.0, 1, changes)
    assert len(changes) <= 1, changes

    policy, changes = make_policy(), []
    size = simulate(policy, lambda t: 20, 0.0, 10.0, 1, changes)  # sustained: up to 3
    size = simulate(policy, lambda t: 24 if math.floor(t / (period / 2)) % 2 == 0 else 12, 10.5, 120.0, size,
                    changes)  # then swings between needing 3 and 2 (3 on average)
    assert [new for _, new in changes] == [3] and size == 3


def test_min_and_max_are_respected():
    policy, changes = make_policy(min_workers=2, max_workers=4), []
    size = simulate(policy, lambda t: 1000, 0.0, 30.0, 2, changes)
    assert size == 4 and max(new for _, new in changes) == 4  # 125 wanted, capped
    size = simulate(policy, lambda t: 0, 30.5, 80.0, size, changes)
    assert size == 2 and min(new for _, new in changes) == 2  # never below min
    # a size outside the bounds (an older config) is corrected at once
    assert make_policy(min_workers=2).decide(0.0, 1) == 2
    assert make_policy(max_workers=3).decide(0.0, 5) == 3


def test_no_second_scale_up_while_workers_start():
    policy = make_policy(max_workers=8)
    for i in range(20):
        policy.observe(PoolSample(i * DT, 1, {"running_requests": 40.0}))
        assert policy.decide(i * DT, 1, num_starting=1) == 1
    assert policy.decide(10.0, 1, num_starting=0) == 5  # the load asked for it long enough


def test_latency_targets_scale_by_ratio_with_tolerance():
    policy = make_policy(target_tpot_s=0.05, target_running_requests=0.0)
    policy.observe(PoolSample(0.0, 2, {"tpot_s": 0.052}))  # within 10 %: keep 2
    assert policy.recommend(0.0) == 2
    policy.observe(PoolSample(1.0, 2, {"tpot_s": 0.1}))  # mean 0.076 over the window: 2 * 1.52 -> 4
    assert policy.recommend(1.0) == 4
    no_requests = make_policy(target_tpot_s=0.05, target_running_requests=0.0)
    no_requests.observe(PoolSample(0.0, 3, {}))  # nothing finished: no latency signal, only the floor
    assert no_requests.recommend(0.0) == 1


def test_enabled_without_a_target_is_rejected():
    with pytest.raises(ValueError, match="target"):
        EncoderAutoscalingConfig(enabled=True, target_queued_items=0)


# -- the loop's step: samples from the controller, decisions into Controller.scale ---------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_autoscaler_step_feeds_controller_loads_and_scales_the_pool():
    config = ClusterConfig().with_overrides(pools={
        "encoder": {"num_workers": 1, "max_workers": 3,
                    "autoscaling": {"enabled": True, "window_s": WINDOW, "upscale_delay_s": UP,
                                    "downscale_delay_s": DOWN, "target_queued_items": 4}}})
    ctl = Controller({"encoder": 1, "prefill": 1, "decode": 1},
                     bounds={name: (p.min_workers, p.max_workers) for name, p in config.pools.items()},
                     autoscaled=["encoder"])
    ctl.add_worker("encoder", "encoder-0", actor=None)
    ctl.mark_ready("encoder-0", WorkerInfo("encoder-0", "encoder", "n", 1), {"num_queued_items": 10})
    clock = FakeClock()
    scaler = Autoscaler(ctl, config, LatencyWindow(clock=clock), clock=clock)
    assert set(scaler.policies) == {"encoder"}  # only autoscaled pools get a policy
    sizes = []
    for _ in range(int(8 / DT)):
        clock.now += DT
        scaler.step()
        sizes.append(ctl.desired_sizes["encoder"])
    assert sizes[int(UP / DT) - 2] == 1 and sizes[-1] == 3  # ceil(10 / 4) = 3 after the up-delay
    assert ctl.history[-1]["source"] == "autoscaler"
    ctl.get("encoder-0").load["num_queued_items"] = 0
    ctl.add_worker("encoder", "encoder-1", actor=None).state = WorkerState.STARTING
    for _ in range(int((DOWN + WINDOW + 1) / DT)):
        clock.now += DT
        scaler.step()
    assert ctl.desired_sizes["encoder"] == 1  # idle for the down-delay: back to min


def test_latency_window_means_and_media_filter():
    clock = FakeClock()
    window = LatencyWindow(clock=clock)
    window.record(1.0, 0.1, has_media=True)
    clock.now = 5.0
    window.record(3.0, None, has_media=False)
    assert window.means(since=-1) == {"ttft_s": 2.0, "tpot_s": 0.1}
    assert window.means(since=-1, media_only=True) == {"ttft_s": 1.0, "tpot_s": 0.1}
    assert window.means(since=1.0) == {"ttft_s": 3.0}
    assert window.means(since=5.0) == {}
