"""The ``tessera`` command line: one sub-command per function, each in a few lines.

    tessera make-tiny-model --arch ARCH OUT     write a tiny random-weight checkpoint
    tessera generate [--model DIR] ... PROMPT   run one request in-process (colocated engine)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeatable, in prompt order)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio file (repeatable, in prompt order)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS until --max-tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("prompt", help="raw prompt with the model's placeholders (<image>, <|AUDIO|>), one per media file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Disaggregated multimodal LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint of a real architecture")
    p.add_argument("--arch", default="llava-clip-llama", choices=["llava-clip-llama", "llava-siglip-qwen2", "qwen2-audio"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("generate", help="generate for one prompt (in-process, or against --server)")
    p.add_argument("--model", default="", help="model folder or hub id (default: the built-in tiny model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)
    return parser


def cmd_make_tiny_model(args) -> int:
    from models.tiny import build_tiny_model

    path = build_tiny_model(args.arch, args.out, seed=args.seed)
    print(path)
    return 0


def media_inputs(args) -> list:
    from models.processor import MediaInput

    def read(path: str, kind: str) -> MediaInput:
        suffix = Path(path).suffix.lower().lstrip(".") or "octet-stream"
        return MediaInput(Path(path).read_bytes(), f"{kind}/{'jpeg' if suffix == 'jpg' else suffix}")

    return [read(f, "image") for f in args.image] + [read(f, "audio") for f in args.audio]


def sampling_params(args):
    from cluster.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop))


def chat_messages(args) -> list[dict]:
    parts = [{"type": "image"} for _ in args.image] + [{"type": "audio"} for _ in args.audio]
    return [{"role": "user", "content": parts + [{"type": "text", "text": args.prompt}]}]


def cmd_generate(args) -> int:
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine
    from cluster.engine.sampling import InvalidRequestError

    engine = ColocatedEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device))
    prompt = engine.processor.apply_chat_template(chat_messages(args)) if args.chat else args.prompt
    try:
        media, sampling = media_inputs(args), sampling_params(args)
        if args.json:
            [c] = engine.generate([(prompt, media, sampling)])
            print(json.dumps({"text": c.text, "token_ids": c.token_ids, "prompt_tokens": c.prompt_tokens,
                              "finish_reason": c.finish_reason, "ttft_s": c.ttft_s, "tpot_s": c.tpot_s,
                              "e2e_s": c.e2e_s}))
            return 0
        for out in engine.stream(prompt, media, sampling):
            print(out.text, end="", flush=True)
        print()
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
