"""The comparisons of issue 5, each a function, run on one machine in one go by
``tessera bench suite`` (``benchmarks/cli.py``).

Comparisons (``COMPARISONS``; each returns the dict ``benchmarks.report`` renders):

* ``isolation``: p99 TPOT of text streams alone, then with a concurrent multi-image Poisson load;
  disaggregated vs colocated.
* ``goodput``: highest rate with >= 90% of multi-image requests within both SLOs; disaggregated
  vs colocated vs vLLM's CPU build (installed into its own venv only when this runs).
* ``kv_transfer``: gloo, shm and ray transports vs memcpy, by payload size (``benchmarks.kv_bench``).
* ``kv_streaming``: the second-token gap of 8-image prompts, with and without layer-wise KV
  streaming, and colocated (``benchmarks.kv_streaming``).
* ``encoder_cache``: TTFT of a repeated image vs a new one (the repeat hits the encoder cache and,
  for the KV of the prompt up to its new text, the prefill worker's prefix cache).
* ``scaling``: TTFT against image tokens per request (linear fit), throughput against decode
  workers where the machine has the cores.
* ``peer_client``: vLLM's own load generator (``vllm bench serve``) against disaggregated,
  colocated and vLLM, text and image loads (``benchmarks.peer_client``); ``peer_client_qwen_vl``:
  the same client on the tiny Qwen2-VL with images of mixed sizes.

Fairness: every server is a separate process on known cores (``CoreLayout``); this process (the
load generator) pins itself to the client cores; server-side histograms (``/metrics``) are
scraped around every measured run and reported beside the client figures; warm-up requests
(other seeds) run before each measurement; every run is bounded in requests and in time.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from benchmarks.harness import (GOODPUT_SERVERS, Suite, comparison, distortion_notes, note_skipped, ratio_of,
                                settle, to_ms)
from benchmarks.kv_streaming import kv_streaming
from benchmarks.peer_client import peer_client, peer_client_qwen_vl


# -- (a) isolation ----------------------------------------------------------------------------------------
async def isolation(suite: Suite) -> dict[str, Any]:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.servers import ServerUnavailable
    from benchmarks.workloads import generate_requests, load_workload

    s = suite.settings
    comp = comparison("isolation", "Isolation: text TPOT under a multi-image load")
    text, vl = load_workload("text_chat"), load_workload("multi_image")
    modes: dict[str, Any] = {}
    for mode in ("disaggregated", "colocated"):
        try:
            server = await suite.start_tessera(mode)
        except ServerUnavailable as exc:
            note_skipped(comp, f"{mode}: {exc}")
            continue
        try:
            await suite.warmup(server, "multi_image")
            await suite.warmup(server, "text_chat")
            closed = LoadConfig(concurrency=s.text_concurrency, max_duration_s=s.max_run_s)
            alone = await suite.measure(server, generate_requests(text, s.text_requests, s.seed + 1), closed,
                                        f"{mode}: text alone")
            stop = asyncio.Event()
            num_vl = int(s.vl_rate * (s.max_run_s + s.vl_lead_s)) + 1
            background = asyncio.ensure_future(suite.measure(
                server, generate_requests(vl, num_vl, s.seed + 2),
                LoadConfig(rate=s.vl_rate, max_duration_s=s.max_run_s + s.vl_lead_s, seed=s.seed),
                f"{mode}: multi-image load", stop=stop, position=1, scrape=False))
            await asyncio.sleep(s.vl_lead_s)
            try:
                loaded = await suite.measure(server, generate_requests(text, s.text_requests, s.seed + 3), closed,
                                             f"{mode}: text + multi-image")
            finally:
                stop.set()
                vl_run = await background
            for run in (alone, loaded):
                comp["notes"] += distortion_notes(run["label"], run)
            modes[mode] = {"alone": alone["metrics"], "loaded": loaded["metrics"], "background": vl_run["metrics"],
                           "server_alone": alone["server"], "server_loaded": loaded["server"],
                           "runs": [alone["run"], loaded["run"], vl_run["run"]]}
        finally:
            await suite.stop(server)
    rows = []
    for mode, d in modes.items():
        a, b = d["alone"], d["loaded"]
        ratio = ratio_of(b["tpot"]["p99"], a["tpot"]["p99"])
        d["p99_tpot_ratio"] = ratio
        rows.append([mode, to_ms(a["tpot"]["p50"]), to_ms(a["tpot"]["p99"]), to_ms(b["tpot"]["p50"]), to_ms(b["tpot"]["p99"]),
                     ratio, to_ms(a["itl"]["p99"]), to_ms(b["itl"]["p99"]), to_ms(b["ttft"]["p99"]),
                     d["background"]["num_completed"],
                     to_ms(d["server_alone"].get("tpot", {}).get("p99")), to_ms(d["server_loaded"].get("tpot", {}).get("p99")),
                     to_ms(d["server_alone"].get("decode_step", {}).get("p50")),
                     to_ms(d["server_loaded"].get("decode_step", {}).get("p50")),
                     to_ms(d["server_alone"].get("decode_step", {}).get("p99")),
                     to_ms(d["server_loaded"].get("decode_step", {}).get("p99"))])
    comp["tables"].append({"title": f"Text streams (closed loop, concurrency {s.text_concurrency}, "
                                    f"{s.text_requests} requests) alone and with multi-image requests at "
                                    f"{s.vl_rate:g} req/s; times in ms",
                           "columns": ["mode", "TPOT p50 alone", "TPOT p99 alone", "TPOT p50 loaded",
                                       "TPOT p99 loaded", "p99 ratio", "ITL p99 alone", "ITL p99 loaded",
                                       "TTFT p99 loaded", "multi-image done", "server TPOT p99 alone",
                                       "server TPOT p99 loaded (all requests)", "decode step p50 alone",
                                       "decode step p50 loaded", "decode step p99 alone", "decode step p99 loaded"],
                           "rows": rows})
    for mode, d in modes.items():
        cpu = ", ".join(f"{r['label']} {r['client_cpu']:.0%}" for r in d["runs"])
        comp["notes"].append(f"{mode}: load generator CPU (share of one core): {cpu}")
    targets = {"disaggregated": ("<= 1.25x", lambda r: r <= 1.25), "colocated": (">= 3x", lambda r: r >= 3.0)}
    for mode, d in modes.items():
        target, check = targets[mode]
        r = d["p99_tpot_ratio"]
        comp["headline"].append({"metric": f"{mode} p99 TPOT loaded / alone", "value": r, "target": target,
                                 "met": None if r is None else check(r)})
    comp["data"] = {"modes": {m: {k: v for k, v in d.items() if k != "runs"} for m, d in modes.items()},
                    "runs": {m: d["runs"] for m, d in modes.items()}}
    return settle(comp, bool(modes))


# -- (b) goodput -----------------------------------------------------------------------------------------
async def goodput(suite: Suite) -> dict[str, Any]:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.metrics import GoodputSearch
    from benchmarks.workloads import generate_requests, load_workload

    s = suite.settings
    comp = comparison("goodput", "Goodput on the multi-image mix")
    spec = load_workload("multi_image")
    slo = s.slo()
    targets: dict[str, Any] = {}
    starters = [(name, start) for name, start in (
        ("disaggregated", lambda: suite.start_tessera("disaggregated")),
        ("colocated", lambda: suite.start_tessera("colocated")),
        ("vLLM CPU", suite.start_vllm)) if GOODPUT_SERVERS[name] in s.goodput_servers]
    if "vllm" not in s.goodput_servers:
        comp["notes"].append("vLLM not measured (--no-vllm / --goodput-servers)")
    async with aclosing(suite.serve_each(comp, starters)) as servers:
        async for name, server in servers:
            await suite.warmup(server, "multi_image", protocol="http")
            if slo is None:
                slo = await _calibrate_slo(suite, server, spec)
                comp["notes"].append(f"SLOs calibrated on {name}: {s.slo_scale:g} x its unloaded p50 TTFT / TPOT "
                                     f"(concurrency 1) = {slo.ttft_s * 1e3:.0f} ms / {slo.tpot_s * 1e3:.1f} ms")
            search = GoodputSearch(s.goodput_start_rate, max_probes=s.goodput_max_probes)
            probes = []
            while (rate := search.next_rate()) is not None:
                n = min(max(int(rate * s.probe_seconds), s.probe_min), s.probe_max)
                reqs = generate_requests(spec, n, seed=s.seed + 100 + len(probes))  # new images every probe
                run = await suite.measure(server, reqs, LoadConfig(rate=rate, max_duration_s=s.max_run_s,
                                                                   seed=s.seed + len(probes)),
                                          f"{name} @ {rate:.3g} req/s", slo=slo, protocol="http")
                attainment = run["metrics"]["slo"]["attainment"]
                search.record(rate, attainment)
                comp["notes"] += distortion_notes(run["label"], run)
                probes.append({"rate": rate, "attainment": attainment, "metrics": run["metrics"],
                               "server": run["server"], "run": run["run"]})
            result = search.result()
            targets[name] = {**result.to_dict(), "probes": probes}
    rows = []
    for name, t in targets.items():
        for p in t["probes"]:
            m = p["metrics"]
            rows.append([name, p["rate"], p["attainment"], m["num_completed"], m["num_requests"],
                         to_ms(m["ttft"]["p50"]), to_ms(m["ttft"]["p99"]), to_ms(m["tpot"]["p50"]), to_ms(m["tpot"]["p99"]),
                         m["request_throughput"], to_ms(p["server"].get("ttft", {}).get("p50")),
                         to_ms(p["server"].get("tpot", {}).get("p50")), p["run"]["client_cpu"],
                         to_ms(p["run"]["send_lag"].get("max"))])
    comp["tables"].append({"title": "Probes (open-loop Poisson, OpenAI HTTP API for all); times in ms; client CPU: "
                                    "the load generator's CPU time / wall time; send lag: how late the latest "
                                    "request left against its Poisson schedule",
                           "columns": ["server", "rate req/s", "SLO attainment", "done", "sent", "TTFT p50",
                                       "TTFT p99", "TPOT p50", "TPOT p99", "req/s", "server TTFT p50",
                                       "server TPOT p50", "client CPU", "send lag max"],
                           "rows": rows})
    comp["tables"].append({"title": "Goodput (highest rate with >= 90% of requests within both SLOs)",
                           "columns": ["server", "goodput req/s", "bracket", "search ended"],
                           "rows": [[n, t["goodput_rps"], f"{t['bracket'][0]:.3g} .. {t['bracket'][1] or '–'}",
                                     t["reason"]] for n, t in targets.items()]})
    disagg = targets.get("disaggregated", {}).get("goodput_rps")
    for peer, target, need in (("colocated", ">= 2x", 2.0), ("vLLM CPU", ">= 1.5x", 1.5)):
        if peer in targets and disagg is not None:
            r = ratio_of(disagg, targets[peer]["goodput_rps"])
            comp["headline"].append({"metric": f"goodput disaggregated / {peer}", "value": r, "target": target,
                                     "met": None if r is None else r >= need})
    for name, t in targets.items():
        comp["headline"].append({"metric": f"goodput {name}, req/s", "value": t["goodput_rps"], "target": "",
                                 "met": None})
    comp["data"] = {"slo": slo.to_dict() if slo else {}, "target": 0.9,
                    "targets": {n: {k: v for k, v in t.items() if k != "probes"}
                                | {"probes": [{k: v for k, v in p.items() if k != "run"} for p in t["probes"]]}
                                for n, t in targets.items()},
                    "runs": {n: [p["run"] for p in t["probes"]] for n, t in targets.items()}}
    return settle(comp, bool(targets))


async def _calibrate_slo(suite: Suite, server, spec):
    from benchmarks.loadgen import LoadConfig
    from benchmarks.metrics import SLO
    from benchmarks.workloads import generate_requests

    s = suite.settings
    run = await suite.measure(server, generate_requests(spec, max(4, s.probe_min // 2), seed=s.seed + 50),
                              LoadConfig(concurrency=1, max_duration_s=s.max_run_s), "SLO calibration (unloaded)",
                              protocol="http")
    m = run["metrics"]
    return SLO(s.slo_scale * m["ttft"]["p50"], s.slo_scale * m["tpot"]["p50"])


# -- (c) KV transfer ------------------------------------------------------------------------------------------
async def kv_transfer(suite: Suite) -> dict[str, Any]:
    from benchmarks import kv_bench

    s = suite.settings
    comp = comparison("kv_transfer", "KV transfer bandwidth vs memcpy")
    layout = suite.layout
    send_cores, recv_cores = layout.prefill, layout.decode
    memcpy = [{"bytes": n * kv_bench.BLOCK_BYTES,
               "gbps": await asyncio.to_thread(kv_bench.memcpy_gbps, n * kv_bench.BLOCK_BYTES, s.kv_repeats)}
              for n in s.kv_blocks]
    transports = {}
    for name, fn in kv_bench.TRANSPORTS.items():
        try:
            transports[name] = await asyncio.to_thread(fn, list(s.kv_blocks), s.kv_repeats, send_cores, recv_cores)
        except Exception as exc:  # noqa: BLE001 - record and go on
            note_skipped(comp, f"{name}: {type(exc).__name__}: {exc}")
    copy = {r["bytes"]: r["gbps"] for r in memcpy}
    rows = []
    for name, trs in transports.items():
        for r in trs:
            r["memcpy_fraction"] = ratio_of(r["gbps"], copy.get(r["bytes"]))
            rows.append([name, r["bytes"] / 2**20, to_ms(r["seconds"]), r["gbps"], copy.get(r["bytes"]),
                         r["memcpy_fraction"]])
    comp["tables"].append({"title": f"Payload = one request's KV, 4 layers (sender on cores {send_cores}, receiver "
                                    f"on {recv_cores}; memcpy: one thread in the load-generator process)",
                           "columns": ["transport", "payload MiB", "ms", "GB/s", "memcpy GB/s", "of memcpy"],
                           "rows": rows})
    for name, trs in transports.items():
        big = [r["memcpy_fraction"] for r in trs if r["bytes"] >= 8 * 2**20 and r["memcpy_fraction"] is not None]
        if big:
            worst = min(big)
            comp["headline"].append({"metric": f"{name}: min share of memcpy, payloads >= 8 MiB", "value": worst,
                                     "target": ">= 0.6", "met": worst >= 0.6})
    hol = []
    for lanes in (s.kv_lanes, 1):
        try:
            hol.append(await asyncio.to_thread(kv_bench.head_of_line, "shm", lanes, s.kv_hol_blocks, s.kv_repeats,
                                               send_cores, recv_cores))
        except Exception as exc:  # noqa: BLE001 - record and go on
            note_skipped(comp, f"head-of-line, {lanes} lane(s): {type(exc).__name__}: {exc}")
    if hol:
        comp["tables"].append({
            "title": f"Head-of-line: a 1-block ({kv_bench.BLOCK_BYTES // 1024} KiB) transfer alone, and started a "
                     f"quarter into a {s.kv_hol_blocks}-block ({s.kv_hol_blocks * kv_bench.BLOCK_BYTES >> 20} MiB) one "
                     "on the same shm pair (medians; ms)",
            "columns": ["lanes per pair", "short alone", "short during long", "ratio", "long alone"],
            "rows": [[h["lanes"], to_ms(h["short_alone_s"]), to_ms(h["short_during_long_s"]), h["ratio"],
                      to_ms(h["long_alone_s"])] for h in hol]})
        h = hol[0]
        comp["headline"].append({"metric": f"short transfer during a {h['long_bytes'] >> 20} MiB one on the same "
                                           f"pair / alone ({h['lanes']} lanes)", "value": h["ratio"],
                                 "target": "<= 1.2", "met": h["ratio"] <= 1.2})
    comp["notes"].append("On a GPU machine the same comparison would put NCCL against a device-to-device copy; "
                         "this run measured the CPU transports only.")
    comp["data"] = {"memcpy": memcpy, "transports": transports, "head_of_line": hol}
    return settle(comp, bool(transports))


# -- (d) encoder cache ------------------------------------------------------------------------------------------
async def encoder_cache(suite: Suite) -> dict[str, Any]:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.metrics import by_component, summarize, ttft
    from benchmarks.servers import ServerUnavailable
    from benchmarks.workloads import generate_requests, load_workload, with_repeated_media

    s = suite.settings
    comp = comparison("encoder_cache", "Encoder + prefix cache: repeated image vs new image")
    try:
        server = await suite.start_tessera("disaggregated")
    except ServerUnavailable as exc:
        note_skipped(comp, str(exc))
        return settle(comp, False)
    try:
        await suite.warmup(server, "single_image")
        before = await asyncio.to_thread(server.cluster_status)
        scrape_before = await asyncio.to_thread(server.scrape_metrics)
        reqs = with_repeated_media(generate_requests(load_workload("single_image"), s.cache_pairs, s.seed + 20))
        reqs = [replace(r, max_tokens=8) for r in reqs]
        run = await suite.measure(server, reqs, LoadConfig(concurrency=1, max_duration_s=s.max_run_s),
                                  "encoder cache: miss, hit, miss, ...")
        after = await asyncio.to_thread(server.cluster_status)
        scrape_after = await asyncio.to_thread(server.scrape_metrics)
    finally:
        await suite.stop(server)
    from benchmarks.metrics import RequestRecord

    records = [RequestRecord.from_dict(r) for r in run["run"]["records"]]
    groups = by_component([r for r in records if r.ok])
    miss = [ttft(r) for r in groups.get("miss", [])]
    hit = [ttft(r) for r in groups.get("hit", [])]
    sm, sh = summarize(miss), summarize(hit)

    def cache_counts(status):
        workers = status["pools"].get("encoder", {}).get("workers", [])
        return (sum(w["num_encoder_cache_hits"] for w in workers), sum(w["num_encoder_cache_misses"] for w in workers))

    def prefix_tokens(text):  # (hit, query) prompt tokens of the prefill workers' prefix caches
        from benchmarks.metrics import parse_prometheus

        samples = parse_prometheus(text or "")
        return tuple(sum(v for _, v in samples.get(f"tessera_prefix_cache_{kind}_tokens_total", []))
                     for kind in ("hit", "query"))

    (h0, m0), (h1, m1) = cache_counts(before), cache_counts(after)
    (ph0, pq0), (ph1, pq1) = prefix_tokens(scrape_before), prefix_tokens(scrape_after)
    ratio = ratio_of(sh["p50"], sm["p50"])
    comp["tables"].append({"title": "Sequential requests (concurrency 1), 8 output tokens; each new image is sent "
                                    "again right after with other text; times in ms",
                           "columns": ["", "requests", "TTFT p50", "TTFT mean", "TTFT p90", "server cache hits",
                                       "server cache misses"],
                           "rows": [["new image (miss)", sm["n"], to_ms(sm["p50"]), to_ms(sm["mean"]), to_ms(sm["p90"]),
                                     "", m1 - m0],
                                    ["repeated image (hit)", sh["n"], to_ms(sh["p50"]), to_ms(sh["mean"]), to_ms(sh["p90"]),
                                     h1 - h0, ""]]})
    comp["headline"].append({"metric": "TTFT p50 hit / miss", "value": ratio, "target": "<= 0.5",
                             "met": None if ratio is None else ratio <= 0.5})
    if pq1 > pq0:
        comp["notes"].append(
            f"prefix cache (prefill worker): {ph1 - ph0:.0f} of {pq1 - pq0:.0f} prompt tokens of the run reused "
            f"(~{(ph1 - ph0) / max(sh['n'], 1):.0f} per repeated-image request): a hit skips the image's encode "
            f"(encoder cache) and the prefill of every full KV block up to its new text (prefix cache)")
    else:
        comp["notes"].append("prefix cache: no reuse reported (engine.enable_prefix_caching off, or a server "
                             "without the counters): a hit skips only the image's encode")
    stages = {}
    for name, group in groups.items():
        for key in ("encode_s", "prefill_s", "queue_s"):
            stages.setdefault(name, {})[key] = summarize(r.server_timings.get(key) for r in group
                                                         if r.server_timings)["p50"]
    if any(r.server_timings for r in records):
        comp["tables"].append({"title": "Where the TTFT goes (server stage timings, p50, ms)",
                               "columns": ["", "queue", "encode", "prefill"],
                               "rows": [[n, to_ms(v["queue_s"]), to_ms(v["encode_s"]), to_ms(v["prefill_s"])]
                                        for n, v in stages.items()]})
    comp["data"] = {"miss_ttft_s": miss, "hit_ttft_s": hit, "server_cache": {"hits": h1 - h0, "misses": m1 - m0},
                    "prefix_cache_tokens": {"hit": ph1 - ph0, "query": pq1 - pq0},
                    "stages_p50_s": stages, "runs": [run["run"]]}
    return comp


# -- (e) scaling ------------------------------------------------------------------------------------------------
async def scaling(suite: Suite) -> dict[str, Any]:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.metrics import RequestRecord, linear_fit, ttft
    from benchmarks.servers import ServerUnavailable
    from benchmarks.workloads import ComponentSpec, WorkloadSpec, generate_requests

    s = suite.settings
    comp = comparison("scaling", "Scaling: TTFT vs image tokens, throughput vs decode workers")
    points, runs = [], []
    try:
        server = await suite.start_tessera("disaggregated")
    except ServerUnavailable as exc:
        note_skipped(comp, str(exc))
        server = None
    if server is not None:
        try:
            await suite.warmup(server, "multi_image")
            for k in s.scaling_images:
                spec = WorkloadSpec(name=f"images_{k}", components=(ComponentSpec(
                    name=f"{k} images", prompt_words=(12, 12), output_tokens=(4, 4), images=(k, k)),))
                run = await suite.measure(server, generate_requests(spec, s.scaling_repeats, s.seed + 30 + k),
                                          LoadConfig(concurrency=1, max_duration_s=s.max_run_s), f"{k} images / request")
                runs.append(run["run"])
                for r in map(RequestRecord.from_dict, run["run"]["records"]):
                    if r.ok:
                        points.append({"num_images": k, "prompt_tokens": r.prompt_tokens, "ttft_s": ttft(r),
                                       "encode_s": r.server_timings.get("encode_s"),
                                       "prefill_s": r.server_timings.get("prefill_s")})
        finally:
            await suite.stop(server)
    fit = linear_fit([p["prompt_tokens"] for p in points], [p["ttft_s"] for p in points]) if points else {}
    if points:
        by_k: dict[int, list[dict]] = {}
        for p in points:
            by_k.setdefault(p["num_images"], []).append(p)
        rows = []
        for k, ps in sorted(by_k.items()):
            def med(key):
                vals = sorted(p[key] for p in ps if p[key] is not None)
                return vals[len(vals) // 2] if vals else None

            rows.append([k, med("prompt_tokens"), to_ms(med("ttft_s")), to_ms(med("encode_s")), to_ms(med("prefill_s"))])
        comp["tables"].append({"title": f"TTFT vs images per request (concurrency 1, {s.scaling_repeats} each, "
                                        f"medians, ms)",
                               "columns": ["images", "prompt tokens", "TTFT", "server encode", "server prefill"],
                               "rows": rows})
        comp["headline"].append({"metric": "TTFT slope, ms per 1k prompt tokens (R²)",
                                 "value": f"{fit['slope'] * 1e6:.1f} (R² {fit['r2']:.3f})"
                                 if not math.isnan(fit["slope"]) else None,
                                 "target": "linear", "met": None if math.isnan(fit["r2"]) else fit["r2"] >= 0.9})
    # throughput vs decode workers
    counts = list(s.decode_workers) or list(range(1, max(1, len(suite.layout.colocated) - 1) + 1))
    workers = []
    if counts == [1] and not s.decode_workers:
        comp["notes"].append(f"throughput vs decode workers: this machine has {len(suite.layout.colocated)} server "
                             f"cores, so only 1 decode worker has a core of its own; pass --decode-workers 1 2 to "
                             f"measure more workers sharing cores")
    if len(counts) > 1 or s.decode_workers:
        from benchmarks.workloads import load_workload

        for n in counts:
            try:
                server = await suite.start_tessera("disaggregated", num_decode=n, tag=f"-decode{n}")
            except ServerUnavailable as exc:
                note_skipped(comp, f"{n} decode workers: {exc}")
                continue
            try:
                await suite.warmup(server, "text_chat")
                run = await suite.measure(server, generate_requests(load_workload("text_chat"), s.throughput_requests,
                                                                    s.seed + 40),
                                          LoadConfig(concurrency=s.throughput_concurrency, max_duration_s=s.max_run_s),
                                          f"{n} decode workers")
            finally:
                await suite.stop(server)
            m = run["metrics"]
            workers.append({"num_decode": n, "output_throughput": m["output_throughput"],
                            "request_throughput": m["request_throughput"], "tpot_p50_s": m["tpot"]["p50"]})
            runs.append(run["run"])
        comp["tables"].append({"title": f"Text chat, closed loop at concurrency {s.throughput_concurrency}",
                               "columns": ["decode workers", "output tok/s", "req/s", "TPOT p50 ms"],
                               "rows": [[w["num_decode"], w["output_throughput"], w["request_throughput"],
                                         to_ms(w["tpot_p50_s"])] for w in workers]})
    comp["data"] = {"images": points, "fit": fit, "decode_workers": workers, "runs": runs}
    return settle(comp, bool(points or workers))


COMPARISONS = {"isolation": isolation, "goodput": goodput, "kv_transfer": kv_transfer, "kv_streaming": kv_streaming,
               "encoder_cache": encoder_cache, "scaling": scaling, "peer_client": peer_client,
               "peer_client_qwen_vl": peer_client_qwen_vl}


async def run_all(suite: Suite, names: list[str]) -> list[dict[str, Any]]:
    """Run the named comparisons in order; one that breaks is recorded as failed, the rest go on."""
    out = []
    for name in names:
        t0 = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            comp = await COMPARISONS[name](suite)
        except Exception as exc:  # noqa: BLE001
            import traceback

            comp = comparison(name, name)
            comp.update(status="failed", reason=f"{type(exc).__name__}: {exc}", notes=[traceback.format_exc(limit=8)])
        comp["elapsed_s"] = time.monotonic() - t0
        print(f"== {name}: {comp['status']} in {comp['elapsed_s']:.0f} s {comp.get('reason', '')}", file=sys.stderr,
              flush=True)
        out.append(comp)
    return out
