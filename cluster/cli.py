"""The ``tessera`` command line: one sub-command per function, each in a few lines.

    tessera make-tiny-model --arch ARCH OUT     write a tiny random-weight checkpoint
    tessera generate [--model DIR] ... PROMPT   run one request in-process (colocated engine)
    tessera generate --server HOST:PORT ...     the same request through a running cluster (gRPC)
    tessera serve [--model M] [--config F]      start the cluster (Ray pools + gRPC and HTTP router)
    tessera status --server HOST:PORT [--json]  pools, workers, load, KV-transfer counters
    tessera scale --server HOST:PORT decode=4   resize pools at runtime (admin; --api-key)
    tessera demo                                start a tiny cluster, send image/audio requests, exit
    tessera bench suite|run|sweep|workloads     benchmarks: comparisons, load runs, goodput (benchmarks/)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeatable, in prompt order)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="video file: mp4, webm, mkv (repeatable; after the images, in prompt order)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio file (repeatable, in prompt order)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS until --max-tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2]; 0 is off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2]; 0 is off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 is off")
    p.add_argument("--min-p", type=float, default=0.0, help="[0, 1]; 0 is off")
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop before this many tokens")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--chat-template", default="", metavar="FILE_OR_TEMPLATE",
                   help="with --chat, in-process: this Jinja template (a file, or the template itself) instead of "
                        "the model folder's (with --server: the server's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("prompt", help="raw prompt with the model's placeholders (<image>, <|AUDIO|>), one per media file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Disaggregated multimodal LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint of a real architecture")
    p.add_argument("--arch", default="llava-clip-llama",
                   choices=["llava-clip-llama", "llava-siglip-qwen2", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen2-audio"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("generate", help="generate for one prompt (in-process, or against --server)")
    p.add_argument("--server", default="", metavar="HOST:PORT",
                   help="send the request to a running `tessera serve` instead of running it in-process")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of the request (--server)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="key when the server sets router.api_keys (--server; default: $TESSERA_API_KEY)")
    _add_tls_flags(p)
    p.add_argument("--model", default="",
                   help="model folder or hub id (default: the built-in tiny model; with --server: the server's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="in-process only (a server runs its configured dtype)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="in-process only")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="start the cluster: encoder/prefill/decode pools on Ray behind a gRPC and "
                                     "OpenAI-compatible HTTP router")
    _add_cluster_flags(p)
    p.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="join this Ray cluster (e.g. auto, or 10.0.0.1:6379) instead of starting a local instance")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show the pools, their workers' load and the KV-transfer counters")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of `tessera serve`'s gRPC port")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="key when the server sets router.api_keys (default: $TESSERA_API_KEY)")
    _add_tls_flags(p)
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("scale", help="set pool sizes at runtime (returns once accepted; workers then start or drain)")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of `tessera serve`'s gRPC port")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="admin key when the server sets router.api_keys (default: $TESSERA_API_KEY)")
    _add_tls_flags(p)
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="then wait (up to SECONDS) until every named pool has exactly that many ready workers")
    p.add_argument("sizes", nargs="+", metavar="POOL=N",
                   help="e.g. encoder=2 decode=4 (pools not named keep their size)")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("demo", help="start a local tiny cluster, send real requests over gRPC, print them, exit")
    p.add_argument("--arch", action="append", choices=["llava-clip-llama", "llava-siglip-qwen2", "qwen2-audio"],
                   help="tiny model(s) to demo (repeatable; default: llava-clip-llama with an image, "
                        "then qwen2-audio with an audio clip)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens to generate per request")
    p.add_argument("--config", type=Path, default=None, help="cluster config YAML (pools, transport)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: the comparisons (suite), one load run or a goodput sweep against "
                                     "a server (run, sweep), the workload files (workloads)")
    from benchmarks.cli import add_bench_arguments  # argparse only; the rest is imported when run

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    """Client TLS, for a server with router.tls_cert_file set (any of them turns TLS on)."""
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="TLS: PEM CA certificate(s) that signed the server's certificate")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="mutual TLS: this client's PEM certificate (with --tls-key), when the server sets "
                        "router.tls_client_ca_file")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="mutual TLS: the PEM private key of --tls-cert")


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or hub id (default: the built-in tiny model)")
    p.add_argument("--config", type=Path, default=None, help="cluster config YAML (see `python -m cluster.config`)")
    p.add_argument("--host", default=None, help="address the gRPC and HTTP servers bind to (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port for the OpenAI-compatible API (default 8000)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template (a file, or the template itself) for models whose folder has none, "
                        "or to replace it (engine.chat_template)")


def cluster_config(args):
    """The config file (or defaults) with the command-line flags applied on top."""
    from cluster.config import ClusterConfig

    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    engine = {k: v for k, v in (("model", args.model), ("dtype", args.dtype), ("device", args.device),
                                ("chat_template", args.chat_template)) if v is not None}
    router = {k: v for k, v in (("host", args.host), ("grpc_port", args.grpc_port), ("http_port", args.http_port))
              if v is not None}
    return config.with_overrides(engine=engine, router=router)


def cmd_make_tiny_model(args) -> int:
    from models.tiny import build_tiny_model

    path = build_tiny_model(args.arch, args.out, seed=args.seed)
    print(path)
    return 0


def media_inputs(args) -> list:
    from cluster.request_types import MediaInput

    def read(path: str, kind: str) -> MediaInput:
        suffix = Path(path).suffix.lower().lstrip(".") or "octet-stream"
        return MediaInput(Path(path).read_bytes(), f"{kind}/{'jpeg' if suffix == 'jpg' else suffix}")

    return ([read(f, "image") for f in args.image] + [read(f, "video") for f in args.video]
            + [read(f, "audio") for f in args.audio])


def sampling_params(args):
    from cluster.request_types import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop),
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, min_p=args.min_p, min_tokens=args.min_tokens)


def chat_messages(args) -> list[dict]:
    parts = ([{"type": "image"} for _ in args.image] + [{"type": "video"} for _ in args.video]
             + [{"type": "audio"} for _ in args.audio])
    return [{"role": "user", "content": parts + [{"type": "text", "text": args.prompt}]}]


def cmd_generate(args) -> int:
    if args.server:
        return _generate_remote(args)
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine
    from cluster.request_types import InvalidRequestError

    engine = ColocatedEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                          chat_template=args.chat_template))
    try:
        prompt = engine.inputs.render_chat(chat_messages(args)) if args.chat else args.prompt
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


def _generate_remote(args) -> int:
    import grpc

    from cluster.client import TesseraClient

    media = media_inputs(args)
    messages = None
    if args.chat:
        parts = [{"type": "media", "index": i} for i in range(len(media))]
        messages = [{"role": "user", "content": parts + [{"type": "text", "text": args.prompt}]}]

    def on_chunk(token_ids, text):
        print(text, end="", flush=True)

    with TesseraClient(args.server, api_key=_api_key(args), **_tls(args)) as client:
        try:
            result = client.generate(None if messages else args.prompt, media, sampling_params(args),
                                     messages=messages, timeout_s=args.timeout,
                                     on_chunk=None if args.json else on_chunk)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print()
        if result.finish_reason in ("abort", "error"):
            print(f"error: request ended with {result.finish_reason}: {result.message}", file=sys.stderr)
            return 1
    return 0


def _log_pool_events() -> None:
    """Scaling, drains, deaths and health failures (cluster.controller / .health / .autoscaler) to stderr."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("cluster.controller", "cluster.health", "cluster.autoscaler"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)


def cmd_serve(args) -> int:
    import asyncio
    import signal

    from cluster.launch import Cluster, LaunchError, init_ray
    from router.service import new_router_loop, serve_forever
    from router.tls import ServerTLS

    try:
        config = cluster_config(args)
        ServerTLS.from_config(config.router)  # bad TLS files: fail now, not once the workers are up
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _log_pool_events()
    print("starting the cluster: Ray, then "
          + ", ".join(f"{n} {p.num_workers}" for n, p in config.active_pools()) + " workers ...", flush=True)
    cluster = Cluster(config, address=args.address)
    try:
        cluster.adopt_ray(init_ray(args.address))
        # SIGTERM while the workers start: unwind like Ctrl-C so they (and a local Ray) are shut
        # down. Installed after ray.init, which sets a SIGTERM handler of its own.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        cluster.start()

        def on_ready(grpc_address: str, http_address: str) -> None:
            print(f"Tessera is serving {config.engine.model or 'the built-in tiny model'} ({cluster.model_dir})")
            print(f"  gRPC     {grpc_address}   (tessera generate --server {grpc_address} ...; "
                  f"tessera status --server {grpc_address})")
            scheme = "https" if config.router.tls_cert_file else "http"
            print(f"  HTTP     {scheme}://{http_address}/v1   (OpenAI-compatible; Prometheus at "
                  f"{scheme}://{http_address}/metrics)")
            print(f"  Ray      {args.address or 'local instance'}; KV transport {config.kv_transfer.transport}")
            print("Press Ctrl-C to stop.", flush=True)

        with asyncio.Runner(loop_factory=new_router_loop) as runner:
            runner.run(serve_forever(cluster, on_ready))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        print("shutting down ...", flush=True)
        cluster.shutdown()
    print("stopped", flush=True)
    return 0


def cmd_status(args) -> int:
    import grpc

    from cluster.client import TesseraClient

    with TesseraClient(args.server, api_key=_api_key(args), **_tls(args)) as client:
        try:
            status = client.status()
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(status))
        return 0
    print(format_status(status))
    return 0


def parse_sizes(items: list[str]) -> dict[str, int]:
    """["encoder=2", "decode=4"] -> {"encoder": 2, "decode": 4}; ValueError naming a bad item."""
    sizes = {}
    for item in items:
        pool, sep, num = item.partition("=")
        if not sep or not pool or not num.strip().isdigit():
            raise ValueError(f"{item!r}: expected POOL=N, e.g. decode=4")
        sizes[pool.strip()] = int(num)
    return sizes


def cmd_scale(args) -> int:
    import time

    import grpc

    from cluster.client import TesseraClient

    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api_key = _api_key(args)
    with TesseraClient(args.server, api_key=_api_key(args), **_tls(args)) as client:
        try:
            accepted, message = client.scale(sizes, api_key=api_key)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        if not accepted:
            print(f"rejected: {message}", file=sys.stderr)
            return 1
        print(f"accepted: {message}", flush=True)
        if args.wait is None:
            return 0
        deadline = time.monotonic() + args.wait
        while True:
            pools = client.status()["pools"]
            states = {p: [w["state"] for w in pools[p]["workers"]] for p in sizes}
            if all(s.count("ready") == sizes[p] and not {"starting", "draining"} & set(s) for p, s in states.items()):
                print("done: " + ", ".join(f"{p} {n} ready" for p, n in sizes.items()))
                return 0
            if time.monotonic() > deadline:
                print(f"error: not done after {args.wait:.0f} s: {states}", file=sys.stderr)
                return 1
            time.sleep(0.5)


def format_status(status: dict) -> str:
    from collections import Counter

    lines = [f"{'worker':<12} {'state':<9} {'queued':>7} {'q.tokens':>9} {'running':>8} {'kv free/total':>15} "
             f"{'cache hit/miss':>15}"]
    for name, pool in status["pools"].items():
        states = Counter(w["state"] for w in pool["workers"])
        counts = ", ".join(f"{states[s]} {s}" for s in ("ready", "starting", "draining", "dead") if states[s])
        lines.append(f"[{name}] desired {pool['desired_size']} (min {pool.get('min_workers', 0)}, max "
                     f"{pool.get('max_workers', 0)}, autoscaling {'on' if pool.get('autoscaling') else 'off'}): "
                     f"{counts or 'no workers'}")
        for w in pool["workers"]:
            kv = f"{w['num_kv_blocks_free']}/{w['num_kv_blocks_total']}" if w["num_kv_blocks_total"] else "-"
            hits = w["num_encoder_cache_hits"] + w["num_encoder_cache_misses"]
            cache = f"{w['num_encoder_cache_hits']}/{w['num_encoder_cache_misses']}" if hits else "-"
            lines.append(f"{w['id']:<12} {w['state']:<9} {w['num_queued_requests']:>7} {w['num_queued_tokens']:>9} "
                         f"{w['num_running_requests']:>8} {kv:>15} {cache:>15}"
                         + (f"   {w['error']}" if w.get("error") else ""))
    kv = status["kv_transfer"]
    lines.append(f"KV transfer ({kv['transport']}): {kv['bytes']} bytes in {kv['transfers_completed']} transfers, "
                 f"{kv['transfers_failed']} failed")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from cluster.demo import run_demo

    return run_demo(args.arch or ["llava-clip-llama", "qwen2-audio"], max_tokens=args.max_tokens,
                    config_path=args.config)


def cmd_bench(args) -> int:
    from benchmarks.cli import main as bench_main

    return bench_main(args)


def _api_key(args) -> str | None:
    return getattr(args, "api_key", None) or os.environ.get("TESSERA_API_KEY") or None


def _tls(args) -> dict:
    """TesseraClient's tls_* keyword arguments from --tls-ca / --tls-cert / --tls-key."""
    files = {"tls-ca": args.tls_ca, "tls-cert": args.tls_cert, "tls-key": args.tls_key}
    for flag, path in files.items():
        if path and not os.access(path, os.R_OK):
            raise SystemExit(f"error: --{flag}: cannot read {path}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    return {"tls_ca_file": args.tls_ca, "tls_cert_file": args.tls_cert, "tls_key_file": args.tls_key}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
