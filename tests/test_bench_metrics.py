"""benchmarks.metrics: per-request and per-run metrics, SLOs, the goodput search, server histograms.
Pure functions: fast, no servers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.metrics import (SLO, GoodputSearch, Histogram, RequestRecord, e2e, find_goodput, histogram, itls,
                                linear_fit, meets_slo, parse_prometheus, run_metrics, server_latency, slo_attainment,
                                summarize, tpot, ttft)


def make_record(index=0, send=0.0, chunks=(), end=None, ok=True, output_tokens=None, **kw) -> RequestRecord:
    """A record whose chunks arrive at ``chunks`` (one token each unless (t, n) pairs)."""
    rec = RequestRecord(index, **kw)
    rec.send_s = send
    for c in chunks:
        t, n = c if isinstance(c, tuple) else (c, 1)
        rec.add_chunk(t, n)
    rec.end_s = end if end is not None else (rec.chunk_s[-1] if rec.chunk_s else None)
    rec.ok = ok
    rec.output_tokens = sum(rec.chunk_tokens) if output_tokens is None else output_tokens
    return rec


def test_request_metrics_follow_vllm_definitions():
    rec = make_record(send=1.0, chunks=[1.5, 1.6, 1.8, 2.1], end=2.2)
    assert ttft(rec) == pytest.approx(0.5)
    assert e2e(rec) == pytest.approx(1.2)
    assert tpot(rec) == pytest.approx((1.2 - 0.5) / 3)  # (E2E - TTFT) / (out - 1)
    assert itls(rec) == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_uses_usage_token_count_not_chunks():
    # The server coalesced 9 tokens into 3 chunks: TPOT divides by tokens, ITL counts chunks.
    rec = make_record(send=0.0, chunks=[(0.2, 1), (0.5, 4), (0.8, 4)], end=0.8)
    assert rec.output_tokens == 9
    assert tpot(rec) == pytest.approx(0.6 / 8)
    assert itls(rec) == pytest.approx([0.3, 0.3])


def test_single_token_and_empty_requests():
    one = make_record(chunks=[0.3])
    assert ttft(one) == pytest.approx(0.3) and tpot(one) is None and itls(one) == []
    none = make_record(chunks=[], end=1.0, ok=False)
    assert ttft(none) is None and tpot(none) is None


def test_summarize_percentiles_and_empty():
    s = summarize([float(i) for i in range(1, 101)])
    assert s["n"] == 100 and s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(np.percentile(range(1, 101), 50))
    assert s["p99"] == pytest.approx(np.percentile(range(1, 101), 99))
    assert s["max"] == 100
    empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["p99"])
    assert summarize([None, 2.0])["n"] == 1


def test_slo_counts_failures_and_both_bounds():
    slo = SLO(ttft_s=0.5, tpot_s=0.1)
    good = make_record(0, chunks=[0.4, 0.45, 0.5])  # TTFT 0.4, TPOT 0.05
    slow_first = make_record(1, chunks=[0.6, 0.65])  # TTFT over
    slow_decode = make_record(2, chunks=[0.1, 0.5])  # TPOT 0.4 over
    failed = make_record(3, chunks=[0.1, 0.12], ok=False)
    one_token = make_record(4, chunks=[0.2])  # no TPOT: only TTFT counts
    assert [meets_slo(r, slo) for r in (good, slow_first, slow_decode, failed, one_token)] == [
        True, False, False, False, True]
    assert slo_attainment([good, slow_first, slow_decode, failed, one_token], slo) == pytest.approx(2 / 5)
    assert slo_attainment([], slo) == 0.0


def test_run_metrics_throughput_and_slo():
    recs = [make_record(i, send=i * 0.5, chunks=[i * 0.5 + 0.1 * k for k in range(1, 11)]) for i in range(4)]
    recs.append(make_record(4, send=2.0, chunks=[], end=2.5, ok=False, error="HTTP 503: busy"))
    m = run_metrics(recs, duration_s=2.5, slo=SLO(0.2, 0.2))
    assert m["num_requests"] == 5 and m["num_completed"] == 4 and m["num_failed"] == 1
    assert m["request_throughput"] == pytest.approx(4 / 2.5)
    assert m["output_throughput"] == pytest.approx(40 / 2.5)
    assert m["ttft"]["p50"] == pytest.approx(0.1)
    assert m["tpot"]["mean"] == pytest.approx(0.1)
    assert m["itl"]["n"] == 36
    assert m["slo"]["attainment"] == pytest.approx(4 / 5)
    assert m["slo"]["goodput_at_rate"] == pytest.approx(4 / 2.5)
    assert m["errors"] == {"HTTP 503": 1}


def test_record_shift_and_roundtrip():
    rec = make_record(send=10.0, chunks=[10.5, 11.0], end=11.2, scheduled_s=9.9)
    moved = rec.shifted(10.0)
    assert moved.send_s == 0.0 and moved.chunk_s == pytest.approx([0.5, 1.0]) and moved.end_s == pytest.approx(1.2)
    assert moved.scheduled_s == pytest.approx(-0.1)
    assert rec.send_s == 10.0  # the original is unchanged
    assert RequestRecord.from_dict(moved.to_dict()) == moved


def test_linear_fit():
    fit = linear_fit([0, 256, 512, 1024], [10, 20, 30, 50])
    assert fit["slope"] == pytest.approx(40 / 1024, rel=1e-6) and fit["r2"] == pytest.approx(1.0)
    assert math.isnan(linear_fit([1, 1], [2, 3])["slope"])


# -- goodput search ----------------------------------------------------------------------------------
def capacity_curve(capacity: float):
    """A fake server: everything meets the SLO below ``capacity`` req/s, nothing above."""
    calls = []

    def measure(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= capacity else 0.2

    return measure, calls


@pytest.mark.parametrize("capacity", [0.3, 1.0, 3.7, 10.0])
def test_goodput_search_brackets_the_capacity(capacity):
    measure, calls = capacity_curve(capacity)
    result = find_goodput(measure, start_rate=1.0, max_probes=12, rel_tol=0.05)
    assert result.goodput_rps <= capacity
    assert result.goodput_rps >= capacity / 1.05 - 1e-9
    assert len(calls) <= 12
    assert result.bracket[1] is not None and result.bracket[1] > capacity


def test_goodput_search_is_bounded():
    measure, calls = capacity_curve(1000.0)
    result = find_goodput(measure, start_rate=1.0, max_rate=8.0, max_probes=10)
    assert result.goodput_rps == 8.0 and calls == [1.0, 2.0, 4.0, 8.0]
    assert "max_rate" in result.reason
    measure, calls = capacity_curve(0.0)
    result = find_goodput(measure, start_rate=1.0, min_rate=0.25, max_probes=10)
    assert result.goodput_rps == 0.0 and calls == [1.0, 0.5, 0.25] and "min_rate" in result.reason
    measure, calls = capacity_curve(3.0)
    result = find_goodput(measure, start_rate=1.0, max_probes=3)
    assert len(calls) == 3 and result.goodput_rps == 2.0 and "budget" in result.reason


def test_goodput_search_uses_the_90_percent_target():
    search = GoodputSearch(2.0)
    assert search.next_rate() == 2.0
    search.record(2.0, 0.9)  # exactly the target passes
    assert search.next_rate() == 4.0
    search.record(4.0, 0.89)
    assert search.next_rate() == 3.0  # bisection
    assert search.result().bracket == (2.0, 4.0)
    with pytest.raises(ValueError):
        GoodputSearch(0.0)


# -- server histograms --------------------------------------------------------------------------------
PROM_BEFORE = """# HELP tessera_time_to_first_token_seconds Arrival at the router -> first token
# TYPE tessera_time_to_first_token_seconds histogram
tessera_time_to_first_token_seconds_bucket{le="0.1"} 1.0
tessera_time_to_first_token_seconds_bucket{le="0.5"} 2.0
tessera_time_to_first_token_seconds_bucket{le="1.0"} 2.0
tessera_time_to_first_token_seconds_bucket{le="+Inf"} 2.0
tessera_time_to_first_token_seconds_sum 0.4
tessera_time_to_first_token_seconds_count 2.0
"""
PROM_AFTER = """tessera_time_to_first_token_seconds_bucket{le="0.1"} 1.0
tessera_time_to_first_token_seconds_bucket{le="0.5"} 6.0
tessera_time_to_first_token_seconds_bucket{le="1.0"} 12.0
tessera_time_to_first_token_seconds_bucket{le="+Inf"} 12.0
tessera_time_to_first_token_seconds_sum 6.4
tessera_time_to_first_token_seconds_count 12.0
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 3
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 4
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="other \\"x\\""} 1
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="other \\"x\\""} 1
vllm:e2e_request_latency_seconds_sum{model_name="m"} 5.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 4
tessera_worker_step_seconds_bucket{pool="prefill",le="0.01"} 100
tessera_worker_step_seconds_bucket{pool="prefill",le="+Inf"} 100
tessera_worker_step_seconds_sum{pool="prefill"} 0.5
tessera_worker_step_seconds_count{pool="prefill"} 100
tessera_worker_step_seconds_bucket{pool="decode",le="0.01"} 3
tessera_worker_step_seconds_bucket{pool="decode",le="+Inf"} 4
tessera_worker_step_seconds_sum{pool="decode"} 0.05
tessera_worker_step_seconds_count{pool="decode"} 4
"""


def test_parse_prometheus_and_label_sets():
    samples = parse_prometheus(PROM_AFTER)
    rows = samples["vllm:e2e_request_latency_seconds_bucket"]
    assert rows[2][0] == {"le": "1.0", "model_name": 'other "x"'}
    hist = histogram(samples, "vllm:e2e_request_latency_seconds")  # summed over model_name
    assert hist.buckets == [(1.0, 4.0), (math.inf, 5.0)] and hist.count == 4
    assert histogram(samples, "missing") is None


def test_histogram_quantile_matches_prometheus():
    h = Histogram([(0.1, 1.0), (0.5, 6.0), (1.0, 12.0), (math.inf, 12.0)], 6.4, 12.0)
    assert h.quantile(0.5) == pytest.approx(0.5)  # rank 6 is the top of the (0.1, 0.5] bucket
    assert h.quantile(0.25) == pytest.approx(0.1 + 0.4 * (3 - 1) / 5)
    assert h.quantile(0.99) == pytest.approx(0.5 + 0.5 * (11.88 - 6) / 6)
    over = Histogram([(1.0, 1.0), (math.inf, 10.0)], 50.0, 10.0)
    assert over.quantile(0.9) == 1.0  # rank in +Inf: the highest finite bound
    assert math.isnan(Histogram([], 0.0, 0.0).quantile(0.5))


def test_server_latency_is_the_delta_between_scrapes():
    out = server_latency(PROM_BEFORE, PROM_AFTER)
    ttft_ = out["ttft"]
    assert ttft_["metric"] == "tessera_time_to_first_token_seconds"
    assert ttft_["n"] == 10 and ttft_["mean"] == pytest.approx(0.6)
    # delta buckets: (0.1, 0), (0.5, 4), (1.0, 10): p50 = rank 5 -> 0.5 + 0.5 * (5 - 4) / 6
    assert ttft_["p50"] == pytest.approx(0.5 + 0.5 / 6)
    assert out["e2e"]["metric"] == "vllm:e2e_request_latency_seconds"
    assert "tpot" not in out
    step = out["decode_step"]  # only the decode pool's label set, not prefill's
    assert step["n"] == 4 and step["mean"] == pytest.approx(0.0125) and step["p50"] <= 0.01
