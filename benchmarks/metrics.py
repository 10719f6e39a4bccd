"""Client-side serving metrics, as ``vllm bench serve`` defines them; pure functions, no I/O.

Per request (``RequestRecord``, filled in by ``benchmarks.clients``)::

    TTFT = first token received - request sent
    E2E  = last byte received - request sent
    TPOT = (E2E - TTFT) / (output tokens - 1)            (requests with >= 2 output tokens)
    ITL  = gaps between consecutive chunks that carried output (one per chunk, as vLLM counts)

Per run: mean / p50 / p90 / p99 of each, request and output-token throughput, SLO attainment
(share of *sent* requests that finished and met both the TTFT and the TPOT SLO; failed and
cut-off requests count as misses), and **goodput**: the highest request rate at which at least
90% of requests meet both SLOs, found by a bounded rate sweep (``GoodputSearch``: a geometric
ladder to bracket it, then bisection).

Also here: a small Prometheus text parser and histogram quantiles, to cross-check client figures
with the server's own ``/metrics`` histograms (the delta over a run).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


# -- one request ----------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """What a client saw of one request. Times are ``time.perf_counter()`` seconds (a run shifts
    them to seconds since its start before saving)."""

    index: int  # BenchRequest.index
    component: str = ""  # BenchRequest.component
    request_id: str = ""
    num_images: int = 0
    num_audios: int = 0
    max_tokens: int = 0
    send_s: float = 0.0  # request sent
    scheduled_s: float | None = None  # open loop: when the arrival process wanted it sent
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk with output, first included
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per chunk (HTTP: 1 per content delta)
    end_s: float | None = None  # stream ended (last byte)
    ok: bool = False  # finished normally (stop / length) with at least one token
    error: str = ""
    finish_reason: str = ""
    output_tokens: int = 0  # usage.completion_tokens when the server sent it, else the counted chunks
    prompt_tokens: int = 0  # usage.prompt_tokens (after media expansion) when sent
    server_timings: dict[str, float] = field(default_factory=dict)  # gRPC stage timings, seconds

    def add_chunk(self, t: float, num_tokens: int) -> None:
        self.chunk_s.append(t)
        self.chunk_tokens.append(num_tokens)

    def shifted(self, origin: float) -> "RequestRecord":
        """A copy with every time relative to ``origin``."""
        def s(t):
            return None if t is None else t - origin

        return RequestRecord(**{**self.__dict__, "send_s": self.send_s - origin, "scheduled_s": s(self.scheduled_s),
                                "chunk_s": [t - origin for t in self.chunk_s], "end_s": s(self.end_s)})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**d)


def ttft(rec: RequestRecord) -> float | None:
    return rec.chunk_s[0] - rec.send_s if rec.chunk_s else None


def e2e(rec: RequestRecord) -> float | None:
    return None if rec.end_s is None else rec.end_s - rec.send_s


def tpot(rec: RequestRecord) -> float | None:
    first, total = ttft(rec), e2e(rec)
    if first is None or total is None or rec.output_tokens < 2:
        return None
    return (total - first) / (rec.output_tokens - 1)


def itls(rec: RequestRecord) -> list[float]:
    return [b - a for a, b in zip(rec.chunk_s, rec.chunk_s[1:])]


# -- one run ------------------------------------------------------------------------------------------
def summarize(values: Iterable[float], percentiles: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    """{n, mean, p50, p90, p99, max} (seconds in, seconds out); NaN statistics when empty."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": math.nan, **{f"p{p}": math.nan for p in percentiles}, "max": math.nan}
    return {"n": int(v.size), "mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in percentiles},
            "max": float(v.max())}


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def to_dict(self) -> dict[str, float]:
        return {"ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3}


def meets_slo(rec: RequestRecord, slo: SLO) -> bool:
    """Finished, TTFT within the SLO, and TPOT within it (a one-token answer has no TPOT)."""
    if not rec.ok:
        return False
    first, per_token = ttft(rec), tpot(rec)
    return first is not None and first <= slo.ttft_s and (per_token is None or per_token <= slo.tpot_s)


def slo_attainment(records: list[RequestRecord], slo: SLO) -> float:
    """Share of the requests sent that met both SLOs (0 when none was sent)."""
    return sum(meets_slo(r, slo) for r in records) / len(records) if records else 0.0


def run_metrics(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """Everything a run reports, from its records and its wall time (first send -> last end)."""
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    duration_s = max(duration_s, 1e-9)
    result: dict[str, Any] = {
        "num_requests": len(records), "num_completed": len(done), "num_failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in done),
        "ttft": summarize(ttft(r) for r in done),
        "tpot": summarize(tpot(r) for r in done),
        "itl": summarize(x for r in done for x in itls(r)),
        "e2e": summarize(e2e(r) for r in done),
        "errors": _error_counts(records),
    }
    if slo is not None:
        met = sum(meets_slo(r, slo) for r in records)
        result["slo"] = {**slo.to_dict(), "attainment": met / len(records) if records else 0.0,
                         "goodput_at_rate": met / duration_s}
    return result


def _error_counts(records: list[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or r.finish_reason or "failed").split(":")[0][:60]
            counts[key] = counts.get(key, 0) + 1
    return counts


def by_component(records: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    out: dict[str, list[RequestRecord]] = {}
    for r in records:
        out.setdefault(r.component, []).append(r)
    return out


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares ``y = slope * x + intercept`` and R²."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return {"slope": math.nan, "intercept": math.nan, "r2": math.nan}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0}


# -- goodput: a bounded rate sweep ------------------------------------------------------------------
@dataclass
class GoodputResult:
    goodput_rps: float  # highest rate measured with attainment >= target (0: none)
    target: float
    probes: list[tuple[float, float]]  # (rate, attainment) in the order measured
    bracket: tuple[float, float | None]  # (highest passing, lowest failing rate; None: no failure seen)
    reason: str  # how the search ended

    def to_dict(self) -> dict[str, Any]:
        return {"goodput_rps": self.goodput_rps, "target": self.target,
                "probes": [{"rate": r, "attainment": a} for r, a in self.probes],
                "bracket": list(self.bracket), "reason": self.reason}


class GoodputSearch:
    """Ask ``next_rate()``, measure the SLO attainment at that rate, ``record(rate, attainment)``,
    repeat until ``next_rate()`` is None; then ``result()``.

    Ladder: from ``start_rate`` multiply by ``growth`` while the target is met (or divide while
    it is not) until the goodput is bracketed; then bisect the bracket until its width is within
    ``rel_tol`` of its lower end. At most ``max_probes`` measurements; never outside
    [``min_rate``, ``max_rate``]."""

    def __init__(self, start_rate: float, *, target: float = 0.9, growth: float = 2.0, min_rate: float = 0.05,
                 max_rate: float = 64.0, max_probes: int = 8, rel_tol: float = 0.15):
        if not (0 < min_rate <= start_rate <= max_rate) or growth <= 1 or max_probes < 1:
            raise ValueError("need 0 < min_rate <= start_rate <= max_rate, growth > 1, max_probes >= 1")
        self.start_rate, self.target, self.growth = start_rate, target, growth
        self.min_rate, self.max_rate, self.max_probes, self.rel_tol = min_rate, max_rate, max_probes, rel_tol
        self.probes: list[tuple[float, float]] = []
        self.passing: float | None = None  # highest rate that met the target
        self.failing: float | None = None  # lowest rate that missed it
        self.reason = ""

    def record(self, rate: float, attainment: float) -> None:
        self.probes.append((rate, attainment))
        if attainment >= self.target:
            self.passing = rate if self.passing is None else max(self.passing, rate)
        else:
            self.failing = rate if self.failing is None else min(self.failing, rate)

    def next_rate(self) -> float | None:
        if not self.probes:
            return self.start_rate
        if len(self.probes) >= self.max_probes:
            self.reason = self.reason or f"probe budget ({self.max_probes}) spent"
            return None
        if self.failing is None:  # every probe passed: climb
            if self.passing >= self.max_rate:
                self.reason = f"met the target at max_rate {self.max_rate:g} (goodput may be higher)"
                return None
            return min(self.passing * self.growth, self.max_rate)
        if self.passing is None:  # every probe failed: descend
            if self.failing <= self.min_rate:
                self.reason = f"missed the target even at min_rate {self.min_rate:g}"
                return None
            return max(self.failing / self.growth, self.min_rate)
        if self.failing <= self.passing:  # noise: a lower rate failed after a higher one passed
            self.reason = "non-monotonic attainment; kept the highest passing rate"
            return None
        if (self.failing - self.passing) <= self.rel_tol * self.passing:
            self.reason = f"bracketed within {self.rel_tol:.0%}"
            return None
        return (self.passing + self.failing) / 2

    def result(self) -> GoodputResult:
        return GoodputResult(self.passing or 0.0, self.target, list(self.probes), (self.passing or 0.0, self.failing),
                             self.reason)


def find_goodput(measure: Callable[[float], float], start_rate: float, **kw: Any) -> GoodputResult:
    """``GoodputSearch`` driven by a synchronous ``measure(rate) -> attainment``."""
    search = GoodputSearch(start_rate, **kw)
    while (rate := search.next_rate()) is not None:
        search.record(rate, measure(rate))
    return search.result()


# -- the server's own histograms (Prometheus text) -----------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# What to compare, and the server metric names that hold it (Tessera's, then vLLM's).
SERVER_HISTOGRAMS = {
    "ttft": ("tessera_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    "tpot": ("tessera_time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds",
             "vllm:time_per_output_token_seconds"),
    "itl": ("vllm:inter_token_latency_seconds",),
    "e2e": ("tessera_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
}

SERVER_STEP_HISTOGRAM = "tessera_worker_step_seconds"


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value), ...]} of a text exposition (comments skipped)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(m.group(3) or "")}
        out.setdefault(m.group(1), []).append((labels, value))
    return out


@dataclass
class Histogram:
    buckets: list[tuple[float, float]]  # (upper bound `le`, cumulative count), ascending, +inf last
    sum: float
    count: float

    def minus(self, earlier: "Histogram | None") -> "Histogram":
        if earlier is None:
            return self
        before = dict(earlier.buckets)
        return Histogram([(le, c - before.get(le, 0.0)) for le, c in self.buckets], self.sum - earlier.sum,
                         self.count - earlier.count)

    def quantile(self, q: float) -> float:
        """Prometheus' ``histogram_quantile``: linear within the bucket; the highest finite bound
        when the rank falls in the +Inf bucket; NaN when empty."""
        if self.count <= 0 or not self.buckets:
            return math.nan
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le

    def summary(self) -> dict[str, float]:
        return {"n": self.count, "mean": self.sum / self.count if self.count > 0 else math.nan,
                **{f"p{p}": self.quantile(p / 100) for p in PERCENTILES}}


def histogram(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
              match: dict[str, str] | None = None) -> Histogram | None:
    """The histogram ``name`` summed over its label sets that have the labels ``match`` (bucket
    bounds matched by ``le``)."""

    def rows(suffix: str):
        return [(labels, v) for labels, v in samples.get(f"{name}{suffix}", [])
                if all(labels.get(k) == want for k, want in (match or {}).items())]

    bucket_rows = rows("_bucket")
    if not bucket_rows:
        return None
    buckets: dict[float, float] = {}
    for labels, value in bucket_rows:
        le = float(labels.get("le", "+Inf").replace("+Inf", "inf"))
        buckets[le] = buckets.get(le, 0.0) + value
    total = sum(v for _, v in rows("_sum"))
    count = sum(v for _, v in rows("_count"))
    return Histogram(sorted(buckets.items()), total, count)


def server_latency(before_text: str | None, after_text: str) -> dict[str, dict[str, Any]]:
    """{"ttft"|"tpot"|"itl"|"e2e": {metric, n, mean, p50, p90, p99}} of what the server recorded
    between two scrapes (seconds); only the metrics the server exposes."""
    before = parse_prometheus(before_text) if before_text else {}
    after = parse_prometheus(after_text)
    out: dict[str, dict[str, Any]] = {}
    for key, names in SERVER_HISTOGRAMS.items():
        for name in names:
            hist = histogram(after, name)
            if hist is not None:
                out[key] = {"metric": name, **hist.minus(histogram(before, name)).summary()}
                break
    # Tessera: the model-step time of the workers that decode (decode pool, or the colocated one).
    for pool in ("decode", "colocated"):
        match = {"pool": pool}
        hist = histogram(after, SERVER_STEP_HISTOGRAM, match)
        if hist is not None:
            step = hist.minus(histogram(before, SERVER_STEP_HISTOGRAM, match))
            if step.count > 0:
                out["decode_step"] = {"metric": f"{SERVER_STEP_HISTOGRAM}{{pool={pool}}}", **step.summary()}
                break
    return out
