"""The ``peer_client`` comparison: vLLM's own load generator (``vllm bench serve``) against
Tessera disaggregated, Tessera colocated and vLLM, one after the other, on the same cores.

The loads of issue 12, all with ``--ignore-eos --temperature 0`` and the client pinned to the
client cores:

* ``text``: 32 concurrent streams of 128 prompt / 128 output tokens (``--dataset-name random``);
* ``images @ R``: Poisson arrivals at R req/s (``IMAGE_RATES``) of 48 prompt tokens plus two
  224x224 images, 64 output tokens (``--dataset-name random-mm``).

``peer_client_qwen_vl`` runs the image loads on the tiny Qwen2-VL instead, with images of mixed
sizes (``QWEN_VL_BUCKETS``: dynamic resolution, so 64 to 192 tokens each), at 1.5 and 4 req/s.

Goodput is vLLM's own definition per run (``--goodput``: requests/s that met both SLOs) and, over
the rate sweep, the highest rate whose p99 TTFT and p99 TPOT are both within the SLOs. Every run's
JSON (``--save-result``) is kept under ``<out>/peer_client/``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from contextlib import aclosing
from pathlib import Path
from typing import Any

from benchmarks.harness import Suite, comparison, note_skipped, ratio_of, settle

IMAGE_RATES = (1.5, 4.0, 6.0, 9.0)
SLO_TTFT_MS, SLO_TPOT_MS = 1000.0, 25.0
TEXT = ["--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "128",
        "--max-concurrency", "32"]
IMAGES = ["--dataset-name", "random-mm", "--random-input-len", "48", "--random-output-len", "64",
          "--random-mm-base-items-per-request", "2", "--random-mm-num-mm-items-range-ratio", "0",
          "--random-mm-limit-mm-per-prompt", '{"image": 2, "video": 0}',
          "--random-mm-bucket-config", "{(224, 224, 1): 1.0}"]


# (width, height, frames): probability. Tiny Qwen2-VL tokens: 224x224 64, 448x336 192, 336x168 72.
QWEN_VL_BUCKETS = "{(224, 224, 1): 0.5, (448, 336, 1): 0.25, (336, 168, 1): 0.25}"
QWEN_VL_RATES = (1.5, 4.0)


def _image_loads(flags: list[str], rates, quick: bool) -> list[tuple[str, list[str], int]]:
    return [(f"images @ {r:g} req/s", [*flags, "--request-rate", str(r)], 8 if quick else max(40, int(r * 15)))
            for r in rates[:1 if quick else None]]


def loads(quick: bool) -> list[tuple[str, list[str], int]]:
    """(label, load flags, number of prompts) of every measured run."""
    return [("text 32 streams", TEXT, 32 if quick else 128), *_image_loads(IMAGES, IMAGE_RATES, quick)]


def qwen_vl_loads(quick: bool) -> list[tuple[str, list[str], int]]:
    flags = [*IMAGES[:-1], QWEN_VL_BUCKETS]  # the same shape, mixed image sizes
    return _image_loads(flags, QWEN_VL_RATES, quick)


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def bench_serve(suite: Suite, server, label: str, flags: list[str], num_prompts: int, seed: int,
                arch: str = "llava-clip-llama", subdir: str = "peer_client") -> dict[str, Any]:
    """One ``vllm bench serve`` run; its saved JSON."""
    out_dir = suite.out_dir / subdir
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{server.name}-{label.replace(' ', '_').replace('@', 'at').replace('/', '')}.json"
    tokenizer = suite.model(arch)
    cmd = ["taskset", "-c", ",".join(map(str, suite.layout.client)), str(suite.vllm_venv / "bin" / "python"),
           str(suite.peer_dir / "vllm_cli.py"), "bench", "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", server.http_url, "--model", served_model(server.http_url),
           "--tokenizer", tokenizer, *flags, "--num-prompts", str(num_prompts), "--ignore-eos", "--temperature", "0",
           "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--goodput", f"ttft:{SLO_TTFT_MS:g}", f"tpot:{SLO_TPOT_MS:g}", "--save-result",
           "--result-dir", str(out_dir), "--result-filename", name]
    log = suite.log_dir / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(600, suite.settings.max_run_s * 3))
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); log {log}")
    return json.loads((out_dir / name).read_text())


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("output_throughput", "request_throughput", "request_goodput", "completed", "num_prompts",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")
    return {k: result.get(k) for k in keys}


def meets_slo(s: dict[str, Any]) -> bool:
    return (s["completed"] == s["num_prompts"] and (s["p99_ttft_ms"] or 1e18) <= SLO_TTFT_MS
            and (s["p99_tpot_ms"] or 1e18) <= SLO_TPOT_MS)


async def peer_client(suite: Suite) -> dict[str, Any]:
    return await _peer_client(suite, "peer_client", "llava-clip-llama", loads,
                              "vLLM's own load generator (vllm bench serve) against all three servers")


async def peer_client_qwen_vl(suite: Suite) -> dict[str, Any]:
    return await _peer_client(suite, "peer_client_qwen_vl", "qwen2-vl", qwen_vl_loads,
                              "vllm bench serve on the tiny Qwen2-VL, images of mixed sizes, against all three servers")


async def _peer_client(suite: Suite, name: str, arch: str, loads_of, title: str) -> dict[str, Any]:
    from benchmarks.servers import ServerUnavailable, ensure_vllm

    s = suite.settings
    comp = comparison(name, title)
    comp["notes"].append(f"SLOs for goodput: TTFT p99 <= {SLO_TTFT_MS:g} ms, TPOT p99 <= {SLO_TPOT_MS:g} ms; "
                         f"client pinned to cores {suite.layout.client}")
    try:
        await asyncio.to_thread(ensure_vllm, suite.vllm_venv, suite.peer_dir, suite.log_dir / "vllm-install.log")
    except ServerUnavailable as exc:  # its client lives in the same venv
        note_skipped(comp, f"vllm bench serve unavailable: {exc}")
        return settle(comp, False)
    quick = s.warmup_requests <= 1
    results: dict[str, dict[str, dict[str, Any]]] = {}
    starters = (("disaggregated", lambda: suite.start_tessera("disaggregated", arch)),
                ("colocated", lambda: suite.start_tessera("colocated", arch)), ("vLLM", lambda: suite.start_vllm(arch)))
    run = {"arch": arch, "subdir": name}
    async with aclosing(suite.serve_each(comp, starters)) as servers:
        async for server_name, server in servers:
            for label, flags, _ in loads_of(True)[:2]:  # warm-up: every shape, other seeds
                await asyncio.to_thread(bench_serve, suite, server, f"warmup {label}", flags, 8, s.seed + 1000, **run)
            results[server_name] = {}
            for label, flags, n in loads_of(quick):
                results[server_name][label] = summarize(await asyncio.to_thread(
                    bench_serve, suite, server, label, flags, n, s.seed, **run))
    columns = ["load", "server", "output tok/s", "req/s", "goodput req/s", "TTFT p50", "TTFT p99", "TPOT p50",
               "TPOT p99", "ITL p99", "done"]
    rows = [[label, name, r["output_throughput"], r["request_throughput"], r["request_goodput"], r["median_ttft_ms"],
             r["p99_ttft_ms"], r["median_tpot_ms"], r["p99_tpot_ms"], r["p99_itl_ms"],
             f"{r['completed']}/{r['num_prompts']}"]
            for label in [lb for lb, _, _ in loads_of(quick)] for name, runs in results.items()
            if (r := runs.get(label))]
    comp["tables"].append({"title": "vllm bench serve, per run (times in ms)", "columns": columns, "rows": rows})
    sweep = {name: max([float(lb.split("@ ")[1].split()[0]) for lb, r in runs.items()
                        if lb.startswith("images") and meets_slo(r)], default=0.0) for name, runs in results.items()}
    comp["tables"].append({"title": "Goodput over the image-rate sweep: highest rate meeting both p99 SLOs",
                           "columns": ["server", "rate req/s"], "rows": [[n, v] for n, v in sweep.items()]})
    shapes = [lb for lb, _, _ in loads_of(quick)]
    text = shapes[0] if shapes[0].startswith("text") else None
    light = next(lb for lb in shapes if lb.startswith("images"))
    peer = results.get("vLLM", {})
    for name in ("disaggregated", "colocated"):
        mine = results.get(name, {})
        for metric, key, label, lower_is_better in (("text output tok/s", "output_throughput", text, False),
                                                    ("light image TPOT p50", "median_tpot_ms", light, True),
                                                    ("light image TPOT p99", "p99_tpot_ms", light, True),
                                                    ("light image TTFT p50", "median_ttft_ms", light, True)):
            if label in mine and label in peer:
                r = ratio_of(mine[label][key], peer[label][key])
                comp["headline"].append({"metric": f"{metric}, {name} / vLLM", "value": r,
                                         "target": "<= 1.0x" if lower_is_better else ">= 1.0x",
                                         "met": None if r is None else (r <= 1.0 if lower_is_better else r >= 1.0)})
        if name in sweep and "vLLM" in sweep and not quick:
            r = ratio_of(sweep[name], sweep["vLLM"])
            comp["headline"].append({"metric": f"image goodput (rate sweep), {name} / vLLM", "value": r,
                                     "target": ">= 1.0x", "met": None if r is None else r >= 1.0})
    comp["data"] = {"runs": results, "sweep_goodput_rps": sweep, "slo_ms": {"ttft": SLO_TTFT_MS, "tpot": SLO_TPOT_MS},
                    "json_dir": str(Path(name))}
    return settle(comp, bool(results))
