"""``kv_streaming``: the second-token gap of long multimodal prompts (layer-wise KV streaming).

A disaggregated request's first token comes from the prefill worker; its second from the decode
worker, once the prompt's KV has landed there. Without streaming the second token waits for the
whole KV to be shipped after prefill ends; with ``kv_transfer.stream_layers`` (the default) each
layer of the prompt's last chunk is sent while the next one computes, and the decode worker
admits the request the moment the last layer lands. The figure: second-token gap / median later
gap, per request, on 8-image prompts sent one at a time, for disaggregated with and without
streaming, and colocated (where the second token is just the next step).
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.harness import Suite, comparison, note_skipped, settle, to_ms

VARIANTS = (  # (label, mode, kv_transfer overrides)
    ("disaggregated, layer-wise streaming", "disaggregated", {"stream_layers": True}),
    ("disaggregated, KV sent after prefill", "disaggregated", {"stream_layers": False}),
    ("colocated", "colocated", None),
)
TARGET = 1.5


def token_gaps(record) -> tuple[float, float] | None:
    """(second-token gap, median later per-token gap) of one streamed request, or None when the
    first chunk already held several tokens (the gap is then not seen) or there are too few."""
    if not record.ok or len(record.chunk_s) < 4 or record.chunk_tokens[0] != 1 or record.chunk_tokens[1] != 1:
        return None
    later = [(b - a) / n for a, b, n in zip(record.chunk_s[1:], record.chunk_s[2:], record.chunk_tokens[2:])]
    return record.chunk_s[1] - record.chunk_s[0], statistics.median(later)


async def kv_streaming(suite: Suite) -> dict[str, Any]:
    from benchmarks.loadgen import LoadConfig
    from benchmarks.metrics import RequestRecord, summarize
    from benchmarks.servers import ServerUnavailable
    from benchmarks.workloads import generate_requests, load_workload

    s = suite.settings
    comp = comparison("kv_streaming", "Layer-wise KV streaming: second-token gap of 8-image prompts")
    spec = load_workload("eight_images")
    rows, data = [], {}
    for i, (label, mode, kv) in enumerate(VARIANTS):
        try:
            server = await suite.start_tessera(mode, tag=f"-stream{i}", kv_transfer=kv)
        except ServerUnavailable as exc:
            note_skipped(comp, f"{label}: {exc}")
            continue
        try:
            await suite.warmup(server, "eight_images")
            run = await suite.measure(server, generate_requests(spec, s.stream_rounds, s.seed + 40),
                                      LoadConfig(concurrency=1, max_duration_s=s.max_run_s), label)
        finally:
            await suite.stop(server)
        records = [RequestRecord.from_dict(r) for r in run["run"]["records"]]
        gaps = [g for g in map(token_gaps, records) if g is not None]
        ratios = [a / b for a, b in gaps if b > 0]
        second, later = summarize(a for a, _ in gaps), summarize(b for _, b in gaps)
        ttft = run["metrics"]["ttft"]
        ratio = statistics.median(ratios) if ratios else None
        rows.append([label, len(gaps), to_ms(ttft["p50"]), to_ms(second["p50"]), to_ms(later["p50"]), ratio,
                     max(ratios) if ratios else None])
        data[label] = {"gaps_s": gaps, "ratios": ratios, "prompt_tokens": [r.prompt_tokens for r in records],
                       "run": run["run"]}
        if mode == "disaggregated" and kv.get("stream_layers"):
            comp["headline"].append({"metric": "second-token gap / median later gap (disaggregated, median of "
                                               "requests)", "value": ratio, "target": f"<= {TARGET}",
                                     "met": None if ratio is None else ratio <= TARGET})
    comp["tables"].append({
        "title": f"{s.stream_rounds} requests one at a time, each 8 new 150x100 images (~2.1k prompt tokens), "
                 f"32 output tokens ({s.protocol}); times in ms",
        "columns": ["server", "requests", "TTFT p50", "2nd-token gap p50", "later gap p50", "gap ratio p50",
                    "gap ratio max"],
        "rows": rows})
    comp["notes"].append("gap ratio: per request, (2nd token - 1st token) / median of its later per-token gaps; "
                         "requests whose first chunk held more than one token are left out")
    comp["data"] = data
    return settle(comp, bool(rows))
