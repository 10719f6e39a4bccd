"""Prometheus metrics of one router: the metric definitions, the one place that records a finished
request (``RouterMetrics.observe_request``, called by ``RouterCore`` for every request it saw,
whichever front end sent it), and per-worker gauges read from the controller on each scrape.

Every metric lives in the router's own ``CollectorRegistry`` (not prometheus_client's global
one), so several routers in one process (tests) do not collide. Served as text by the HTTP
server's ``/metrics`` (``render``).

Where the numbers come from:

* request histograms and counters: ``FinalEvent.timings`` / ``usage`` of each finished request
  (router clock; see ``router.events.StageTimings``);
* worker gauges: each worker's own ``load()`` report, refreshed (``Controller.refresh_loads``)
  just before a scrape is rendered; cache and KV-transfer counters are the workers' cumulative
  counts since they started.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder

from cluster.request_types import InvalidRequestError
from cluster.worker_base import STEP_SECONDS_BUCKETS
from router.events import DeadlineExceededError, FinalEvent, OverloadedError, RouterError

STAGES = ("queue", "encode", "prefill", "kv_transfer", "decode")
# How a request the core saw ended: a finish reason, or why it failed before its first token.
OUTCOMES = ("stop", "length", "abort", "error", "invalid", "overloaded", "unavailable", "deadline", "cancelled")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
                   120.0, 300.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def outcome_of(final: FinalEvent | None, failure: BaseException | None, stop_reason: str = "") -> str:
    """The ``outcome`` label of a request: its finish reason, else what it failed with."""
    if final is not None:
        return final.finish_reason if final.finish_reason in OUTCOMES else "error"
    if isinstance(failure, InvalidRequestError):
        return "invalid"
    if isinstance(failure, OverloadedError):
        return "overloaded"
    if isinstance(failure, DeadlineExceededError) or stop_reason == "deadline":
        return "deadline"
    if isinstance(failure, RouterError):
        return "unavailable"
    if failure is None and stop_reason == "cancelled":
        return "cancelled"  # the client went away before its first token
    return "error"


class RouterMetrics:
    def __init__(self, controller, admission):
        self.controller = controller  # cluster.controller.Controller: per-worker gauges
        self.admission = admission  # router.admission.Admission: router queue gauges
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tessera_requests", "Requests the router core saw, by how they ended",
                                ["outcome"], registry=r)
        self.stage_seconds = Histogram(
            "tessera_request_stage_seconds",
            "Per-stage latency of finished requests (only stages the request went through)",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tessera_time_to_first_token_seconds", "Arrival at the router -> first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tessera_time_per_output_token_seconds",
                              "(E2E - TTFT) / (output tokens - 1), requests with >= 2 output tokens",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tessera_e2e_request_latency_seconds", "Arrival at the router -> last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "Prompt tokens of finished requests (after "
                                     "media expansion)", registry=r)
        self.generation_tokens = Counter("tessera_generation_tokens", "Tokens generated", registry=r)
        self.retries = Counter("tessera_request_retries", "Stages run again after a worker failed a request "
                               "(encoder/prefill: retried on another worker; decode: migrated)", ["stage"],
                               registry=r)
        self.forks = Counter("tessera_forked_samples", "Samples of n > 1 requests decoded on the first sample's "
                             "prompt KV (no prefill, no KV transfer of their own)", registry=r)
        self.http_responses = Counter("tessera_http_responses", "HTTP responses by endpoint and status code",
                                      ["endpoint", "code"], registry=r)
        self.router_requests = Gauge("tessera_router_requests", "Requests in the router: running in the pools "
                                     "or waiting for admission", ["state"], registry=r)
        for outcome in OUTCOMES:  # present (at 0) from the first scrape, so rate() works at once
            self.requests.labels(outcome)
        for pool in ("encoder", "prefill", "decode"):
            self.retries.labels(pool)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        r.register(_WorkerCollector(controller))

    # -- the one place a finished request is recorded ---------------------------------------------
    def observe_retry(self, stage: str) -> None:
        self.retries.labels(stage).inc()

    def observe_fork(self) -> None:
        self.forks.inc()

    def observe_request(self, final: FinalEvent | None, failure: BaseException | None = None,
                        stop_reason: str = "") -> None:
        self.requests.labels(outcome_of(final, failure, stop_reason)).inc()
        if final is None:
            return
        t, usage = final.timings, final.usage
        self.stage_seconds.labels("queue").observe(t.queue_s)
        for stage, seconds in (("encode", t.encode_s), ("prefill", t.prefill_s), ("kv_transfer", t.kv_transfer_s),
                               ("decode", t.decode_s)):
            if seconds > 0:  # 0: the request skipped the stage (text-only; done at the first token)
                self.stage_seconds.labels(stage).observe(seconds)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        if usage.completion_tokens:
            self.ttft.observe(t.ttft_s)
            self.e2e.observe(t.e2e_s)
        if usage.completion_tokens > 1:
            self.tpot.observe(max(0.0, t.e2e_s - t.ttft_s) / (usage.completion_tokens - 1))

    def observe_http(self, endpoint: str, code: int) -> None:
        self.http_responses.labels(endpoint, str(code)).inc()

    # -- scrape -----------------------------------------------------------------------------------
    async def render(self, accept: str = "", refresh_timeout_s: float = 2.0) -> tuple[bytes, str]:
        """(exposition, content type) in the format the scraper accepts (Prometheus text, or
        OpenMetrics), with worker loads refreshed first (a slow worker keeps its last report)."""
        await self.controller.refresh_loads(timeout_s=refresh_timeout_s)
        self.router_requests.labels("running").set(self.admission.num_inflight)
        self.router_requests.labels("queued").set(self.admission.num_queued)
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _WorkerCollector:
    """Per-worker gauges and counters from the controller's last ``load()`` reports."""

    def __init__(self, controller):
        self.controller = controller

    def describe(self):
        return []  # names are only known at collect time; nothing to check at registration

    def collect(self):
        labels = ["pool", "worker"]
        workers = GaugeMetricFamily("tessera_workers", "Workers per pool and state", labels=["pool", "state"])
        queued = GaugeMetricFamily("tessera_worker_queued_requests", "Requests waiting in a worker (prefill: "
                                   "scheduled, not yet prefilled; decode: reserved, KV not yet landed)", labels=labels)
        queued_tokens = GaugeMetricFamily("tessera_worker_queued_tokens", "Prefill: prompt tokens not yet "
                                          "prefilled; encoder: media items queued", labels=labels)
        running = GaugeMetricFamily("tessera_worker_running_requests", "Requests a worker is running (decode: "
                                    "in the batch; prefill: shipping KV; encoder: items in a forward)", labels=labels)
        kv_used = GaugeMetricFamily("tessera_worker_kv_blocks_used", "KV-cache blocks in use", labels=labels)
        kv_total = GaugeMetricFamily("tessera_worker_kv_blocks_total", "KV-cache blocks", labels=labels)
        hits = CounterMetricFamily("tessera_encoder_cache_hits", "Encoder-output cache hits", labels=["worker"])
        misses = CounterMetricFamily("tessera_encoder_cache_misses", "Encoder-output cache misses",
                                     labels=["worker"])
        prefix_hits = CounterMetricFamily("tessera_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the "
                                          "prefix cache (prefill and colocated workers)", labels=labels)
        prefix_queries = CounterMetricFamily("tessera_prefix_cache_query_tokens", "Prompt tokens admitted while "
                                             "the prefix cache was on (hits + computed)", labels=labels)
        states: dict[tuple[str, str], int] = {}
        num_hits = num_misses = 0
        steps: dict[str, dict] = {}  # pool -> summed step-time histogram of its workers
        for w in self.controller.workers():
            states[(w.pool, w.state.value)] = states.get((w.pool, w.state.value), 0) + 1
            load, ids = w.load, [w.pool, w.worker_id]
            queued.add_metric(ids, _first(load, "num_queued_requests", "num_reserved"))
            if w.pool != "decode":
                queued_tokens.add_metric(ids, _first(load, "num_queued_tokens", "num_queued_items"))
            running.add_metric(ids, _first(load, "num_running_requests", "num_running", "num_shipping",
                                           "num_encoding_items"))
            if "kv_blocks_total" in load:
                kv_total.add_metric(ids, load["kv_blocks_total"])
                kv_used.add_metric(ids, load["kv_blocks_total"] - load.get("kv_blocks_free", 0))
            if "prefix_cache_query_tokens" in load:
                prefix_hits.add_metric(ids, _first(load, "prefix_cache_hit_tokens"))
                prefix_queries.add_metric(ids, _first(load, "prefix_cache_query_tokens"))
            if "step_seconds" in load:
                _add_steps(steps.setdefault(w.pool, {"buckets": [], "sum": 0.0}), load["step_seconds"])
            if w.pool == "encoder":
                num_hits += _first(load, "cache_hits")
                num_misses += _first(load, "cache_misses")
                hits.add_metric([w.worker_id], _first(load, "cache_hits"))
                misses.add_metric([w.worker_id], _first(load, "cache_misses"))
        for (pool, state), count in sorted(states.items()):
            workers.add_metric([pool, state], count)
        lookups = num_hits + num_misses
        hit_rate = GaugeMetricFamily("tessera_encoder_cache_hit_rate", "Encoder-output cache hits / lookups, "
                                     "all encoder workers, since they started (0 before any lookup)",
                                     value=num_hits / lookups if lookups else 0.0)
        kv = self.controller.kv_transfer_totals()
        kv_bytes = CounterMetricFamily("tessera_kv_transfer_bytes", "KV-cache bytes moved prefill -> decode",
                                       value=kv["bytes"])
        kv_transfers = CounterMetricFamily("tessera_kv_transfers", "KV transfers by result", labels=["result"])
        kv_transfers.add_metric(["ok"], kv["transfers_completed"])
        kv_transfers.add_metric(["failed"], kv["transfers_failed"])
        kv_streamed = CounterMetricFamily("tessera_kv_transfers_streamed", "KV transfers started with the prefill "
                                          "step that computed the prompt's last chunk (kv_transfer.stream_layers)",
                                          value=kv["transfers_streamed"])
        step_seconds = HistogramMetricFamily(
            "tessera_worker_step_seconds", "Model-step wall time of a pool's workers (decode: one token for the "
            "whole batch; prefill: one chunk; encoder: one batch), as the workers report it", labels=["pool"])
        for pool, hist in sorted(steps.items()):
            cumulative, total = [], 0
            for bound, count in zip(STEP_SECONDS_BUCKETS + (float("inf"),), hist["buckets"]):
                total += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
            step_seconds.add_metric([pool], cumulative, hist["sum"])
        yield from (workers, queued, queued_tokens, running, kv_used, kv_total, hits, misses, hit_rate, kv_bytes,
                    kv_transfers, kv_streamed, step_seconds, prefix_hits, prefix_queries)


def _add_steps(into: dict, report: dict) -> None:
    buckets = report.get("buckets") or []
    if len(into["buckets"]) < len(buckets):
        into["buckets"] += [0] * (len(buckets) - len(into["buckets"]))
    for i, count in enumerate(buckets):
        into["buckets"][i] += count
    into["sum"] += report.get("sum", 0.0)


def _first(load: dict, *keys: str) -> float:
    for key in keys:
        if key in load:
            return max(0.0, float(load[key]))
    return 0.0
