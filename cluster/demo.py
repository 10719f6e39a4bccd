"""``tessera demo``: start a local cluster with a built-in tiny model, send one real multimodal
request through the gRPC API, print the streamed answer and the per-stage timings, exit.

Per architecture: ``llava-clip-llama`` gets an image, ``qwen2-audio`` an audio clip (a tiny
``llava-siglip-qwen2`` also takes an image). One Ray instance serves all of them in turn. The
tiny models have random weights: the answer is well-formed tokens, not sense.

Like the CLI, this module ties the layers together, so it imports the router (lazily).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

MEDIA = {"llava-clip-llama": "image", "llava-siglip-qwen2": "image", "qwen2-audio": "audio"}
QUESTION = {"image": "Describe the image in one sentence.", "audio": "Listen to the audio and tell me what you hear."}


def run_demo(archs: list[str], max_tokens: int = 24, config_path: Path | None = None, out=sys.stdout) -> int:
    import ray

    from cluster.config import ClusterConfig
    from cluster.launch import Cluster, LaunchError, init_ray

    base = ClusterConfig.from_yaml(config_path) if config_path else ClusterConfig()
    owns_ray = init_ray()
    try:
        for arch in archs:
            config = base.with_overrides(engine={"model": str(_tiny_model(arch))}, router={"grpc_port": 0})
            try:
                _demo_one(arch, config, max_tokens, out)
            except LaunchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    finally:
        if owns_ray:
            ray.shutdown()
    return 0


def _tiny_model(arch: str) -> Path:
    from transformers.utils import logging as hf_logging

    from models.tiny import ensure_tiny_model

    hf_logging.disable_progress_bar()  # building a tiny model on first use prints shard progress

    return ensure_tiny_model(arch)


def _demo_one(arch: str, config, max_tokens: int, out) -> None:
    from cluster.client import TesseraClient
    from cluster.request_types import SamplingParams
    from cluster.launch import Cluster
    from models.media_samples import make_test_audio, make_test_image
    from cluster.request_types import MediaInput
    from router.service import BackgroundRouter

    kind = MEDIA[arch]
    pools = ", ".join(f"{name} {pool.num_workers}" for name, pool in config.pools.items())
    print(f"== {arch}: one {kind} request through the cluster ==", file=out)
    print(f"starting workers ({pools}; KV transport {config.kv_transfer.transport}) ...", end=" ", file=out,
          flush=True)
    start = time.perf_counter()
    with Cluster(config) as cluster, BackgroundRouter(cluster) as router:
        print(f"ready in {time.perf_counter() - start:.1f} s; gRPC at {router.address}", file=out)
        with TesseraClient(router.address) as client:
            info = client.model_info()
            if kind == "image":
                media, what = MediaInput(make_test_image(seed=1), "image/png"), "a 256x192 PNG image"
            else:
                media, what = MediaInput(make_test_audio(seed=1, seconds=2.0), "audio/wav"), "a 2 s WAV clip"
            messages = [{"role": "user", "content": [{"type": "media", "index": 0},
                                                     {"type": "text", "text": QUESTION[kind]}]}]
            print(f"model:  {info.model_name} ({info.architecture}, {info.dtype}, context {info.max_context_length})",
                  file=out)
            print(f"user:   [{what}] {QUESTION[kind]}", file=out)
            print("answer: ", end="", file=out, flush=True)
            before = client.status()["kv_transfer"]["bytes"]
            result = client.generate(messages=messages, media=[media],
                                     sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                     on_chunk=lambda ids, text: print(text, end="", file=out, flush=True))
            kv_bytes = client.status()["kv_transfer"]["bytes"] - before
        print(file=out)
        print(f"finish: {result.finish_reason}; {len(result.token_ids)} tokens generated, prompt "
              f"{result.prompt_tokens} tokens (random weights: the text is noise)", file=out)
        t = result.timings
        print("server stage timings: " + " | ".join([
            f"queue {_ms(t['queue_s'])}", f"encode {_ms(t['encode_s'])}", f"prefill {_ms(t['prefill_s'])}",
            f"kv transfer {_ms(t['kv_transfer_s'])} ({kv_bytes / 2**20:.2f} MiB)",
            f"decode {_ms(t['decode_s'])}", f"ttft {_ms(t['ttft_s'])}", f"e2e {_ms(t['e2e_s'])}"]), file=out)
        print(f"client: ttft {_ms(result.ttft_s)}, tpot {_ms(result.tpot_s)}, e2e {_ms(result.e2e_s)}", file=out)
        print(f"stopping ({arch}) ...", file=out, flush=True)
    print(file=out, flush=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
