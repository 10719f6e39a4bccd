"""Decode throughput of the colocated engine vs ``transformers.generate`` on the same tiny model.

    python -m benchmarks.engine_throughput [--arch llava-clip-llama] [--batches 1 8 32] [--out DIR]

For each batch size both engines generate ``--output-len`` tokens (greedy, EOS ignored) for the
same ``--prompt-len``-token text prompts; each measurement is the median of ``--repeats`` runs.
Decode tokens/s excludes prefill: ``batch * (output_len - 1) / (t(output_len) - t(1))``, where
t(n) is the wall time to generate n tokens. Both run in this process with the same torch thread
count, so the ratio is a like-for-like comparison on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(arch: str, batches: list[int], prompt_len: int, output_len: int, repeats: int) -> dict:
    from transformers import AutoModelForImageTextToText

    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine
    from cluster.engine.sampling import SamplingParams
    from models.tiny import ensure_tiny_model

    path = ensure_tiny_model(arch)
    # Prefix caching off: transformers has none, and identical rows must cost what distinct ones do.
    engine = ColocatedEngine(EngineConfig(model=str(path), max_num_seqs=max(batches), enable_prefix_caching=False))
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # One text prompt of exactly prompt_len tokens (as the engine tokenizes it), repeated per row:
    # neither engine caches prefixes, so identical rows cost the same as distinct ones.
    words = ("serving multimodal models well means keeping decode fast while prefill is heavy " * 64).split()
    ids = engine.tokenizer(" ".join(words))["input_ids"][:prompt_len]
    prompt = engine.tokenizer.decode(ids, skip_special_tokens=True)
    ids = torch.tensor(engine.tokenizer(prompt)["input_ids"])
    rows = []
    for batch in batches:
        prompts = [prompt] * batch
        batch_ids = ids.expand(batch, -1)

        def ours(n):
            sp = SamplingParams(max_tokens=n, ignore_eos=True)
            engine.generate([(p, [], sp) for p in prompts])

        def theirs(n):
            with torch.no_grad():
                hf.generate(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), do_sample=False,
                            max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        ours(4), theirs(4)  # warm-up
        row = {"batch": batch}
        for name, fn in (("tessera", ours), ("transformers", theirs)):
            t_full = _median_time(lambda: fn(output_len), repeats)
            t_one = _median_time(lambda: fn(1), repeats)
            row[f"{name}_decode_tok_s"] = batch * (output_len - 1) / max(t_full - t_one, 1e-9)
            row[f"{name}_e2e_tok_s"] = batch * output_len / t_full
        row["decode_ratio"] = row["tessera_decode_tok_s"] / row["transformers_decode_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"arch": arch, "prompt_len": prompt_len, "output_len": output_len, "repeats": repeats, "rows": rows}


def machine() -> dict:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_report(result: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": machine(), "command": command}
    (out_dir / "engine_throughput.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Colocated engine vs transformers.generate — decode throughput ({result['arch']})", "",
             f"Machine: {result['machine']['platform']}, torch threads {result['machine']['cpu_count']}, "
             f"torch {result['machine']['torch']}, transformers {result['machine']['transformers']}.", "",
             f"Prompt {result['prompt_len']} tokens, {result['output_len']} output tokens, greedy, "
             f"median of {result['repeats']}. Command: `{command}`", "",
             "| batch | Tessera decode tok/s | transformers decode tok/s | ratio | Tessera e2e tok/s | transformers e2e tok/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['tessera_decode_tok_s']:.0f} | {r['transformers_decode_tok_s']:.0f} | "
                     f"{r['decode_ratio']:.2f}x | {r['tessera_e2e_tok_s']:.0f} | {r['transformers_e2e_tok_s']:.0f} |")
    (out_dir / "engine_throughput.md").write_text("\n".join(lines) + "\n")
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llava-clip-llama")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both engines")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results") / f"{date.today()}-cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = bench(args.arch, args.batches, args.prompt_len, args.output_len, args.repeats)
    import sys

    print(write_report(result, args.out, "python -m benchmarks.engine_throughput " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
