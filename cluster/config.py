"""Typed configuration: one closed pydantic model per component, composed into ``ClusterConfig``.

Unknown keys are rejected (``extra="forbid"``), every field is documented once (the text serves
the CLI help and the YAML reference in the README), and values are validated when loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.processor import MediaLimits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_CHAT_TEMPLATE_CHARS = 256 * 1024  # a chat template: engine.chat_template or a request's own


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(_Closed):
    max_media_per_request: int = Field(8, ge=0, le=256, description="media items in one request")
    max_media_bytes: int = Field(20 * 2**20, ge=1, description="encoded size of one media item, bytes")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height cap, checked before decoding")
    max_image_aspect_ratio: float = Field(
        200.0, ge=1, le=10000, description="long side / short side cap of an image, checked before decoding "
                                           "(a shortest-edge resize of a 1x5000 image makes a 224x1120000 one)")
    max_audio_seconds: float = Field(30.0, gt=0, le=30.0, description="audio clip length cap (Qwen2-Audio: 30 s window)")
    max_video_seconds: float = Field(600.0, gt=0, description="video length cap, from the container header "
                                                                "before decoding")
    max_video_frames: int = Field(768, ge=1, description="frames of one video the model sees, after sampling at "
                                                         "the model's fps")
    max_video_pixels: int = Field(2**28, ge=1, description="width x height x sampled frames of one video (the "
                                                           "decoded frames' memory), checked before decoding")
    max_media_tokens: int = Field(0, ge=0, description="prompt tokens all media of one request may become "
                                                       "(an image or a video is thousands); 0: only the context "
                                                       "length bounds them")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")

    def media(self) -> MediaLimits:
        return MediaLimits(self.max_media_per_request, self.max_media_bytes, self.max_image_pixels,
                           self.max_audio_seconds, self.max_image_aspect_ratio, self.max_video_seconds,
                           self.max_video_frames, self.max_video_pixels, self.max_media_tokens)


class EngineConfig(_Closed):
    """How one engine (colocated, or the LM part of a prefill/decode worker) runs the model."""

    model: str = Field("", description="model folder or hub id; empty: the built-in tiny multimodal model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations dtype (float16 needs a GPU)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    attention_backend: Literal["auto", "torch"] = Field(
        "auto", description="how attention runs over the paged KV cache (models/attention_backend.py); auto: the "
                            "best one registered for the device")
    linear_backend: Literal["auto", "torch", "onednn"] = Field(
        "auto", description="how the decoder layers' projections run (models/linear.py): onednn reorders each "
                            "weight once for oneDNN's CPU matmul; torch keeps F.linear; auto: onednn where the CPU "
                            "has a kernel for the dtype")
    kv_cache_memory_gb: float = Field(0.5, gt=0, description="memory for the KV cache, GiB")
    max_num_seqs: int = Field(64, ge=1, description="requests in one running batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="new tokens per step (prefill chunk bound)")
    max_model_len: int = Field(0, ge=0, description="context length; 0: the model's max_position_embeddings")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV of full blocks whose tokens and media (by content hash) repeat an earlier "
                          "request's prefix, LRU-evicted when blocks run out (colocated and prefill workers; "
                          "decode workers never use it)")
    chat_template: str = Field(
        "", description="Jinja chat template for chat requests: a file's path (read when the config is loaded), or "
                        "the template itself (text with '{' or a line break); empty: the model folder's")
    limits: LimitsConfig = LimitsConfig()

    @field_validator("chat_template")
    @classmethod
    def _load_chat_template(cls, value: str) -> str:
        """A path that names a file becomes the file's text (vLLM's rule: text with ``{`` or a line
        break is a template), so every process gets the template itself."""
        if value and "{" not in value and "\n" not in value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(f"chat template file {value!r} does not exist (or pass the template itself)")
            value = path.read_text(encoding="utf-8")
        if len(value) > MAX_CHAT_TEMPLATE_CHARS:
            raise ValueError(f"the chat template is {len(value)} characters; at most {MAX_CHAT_TEMPLATE_CHARS}")
        return value

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ------------------------------------------------------------------------------------------------
# The cluster: pools of Ray actors, the KV transport between them, and the router in front.
# ------------------------------------------------------------------------------------------------

POOL_NAMES = ("encoder", "prefill", "decode")


class AutoscalingConfig(_Closed):
    """When the autoscaler resizes one pool (``cluster/autoscaler.py``). Each ``target_*`` is what
    one worker should carry (0 turns that signal off); the pool is sized for its most demanding
    signal, between the pool's ``min_workers`` and ``max_workers``. A size change needs the load to
    ask for it without a break for the up (or down) delay, which is what keeps it from flapping."""

    enabled: bool = Field(False, description="let the autoscaler set this pool's size (min_workers..max_workers)")
    window_s: float = Field(
        30.0, gt=0, le=3600, description="look-back window: each decision uses the metrics averaged over it, seconds")
    upscale_delay_s: float = Field(
        30.0, ge=0, le=3600,
        description="load must call for more workers this long, without a break, to add any, seconds")
    downscale_delay_s: float = Field(
        300.0, ge=0, le=86400,
        description="load must call for fewer workers this long, without a break, to remove any, seconds")

    def targets(self) -> dict[str, float]:
        """{metric: target per worker} of the signals that are on, e.g. {"queued_tokens": 8192.0}."""
        return {name.removeprefix("target_"): float(value) for name, value in self
                if name.startswith("target_") and value > 0}

    @model_validator(mode="after")
    def _check_targets(self) -> "AutoscalingConfig":
        if self.enabled and not self.targets():
            raise ValueError("autoscaling is enabled but every target_* is 0: set at least one target")
        return self


class EncoderAutoscalingConfig(AutoscalingConfig):
    target_queued_items: float = Field(
        16.0, ge=0, description="media items queued or being encoded per worker (0: off)")
    target_ttft_s: float = Field(0.0, ge=0, description="mean TTFT of requests with media, seconds (0: off)")


class PrefillAutoscalingConfig(AutoscalingConfig):
    target_queued_requests: float = Field(
        0.0, ge=0, description="prompts waiting or being prefilled per worker (0: off)")
    target_queued_tokens: float = Field(
        8192.0, ge=0, description="prompt tokens waiting or being prefilled per worker (0: off)")
    target_ttft_s: float = Field(0.0, ge=0, description="mean TTFT, seconds (0: off)")


class DecodeAutoscalingConfig(AutoscalingConfig):
    target_running_requests: float = Field(0.0, ge=0, description="requests in the running batch per worker (0: off)")
    target_kv_utilization: float = Field(
        0.75, ge=0, le=1, description="share of KV blocks in use or reserved, mean over workers (0: off)")
    target_tpot_s: float = Field(0.0, ge=0, description="mean time per output token, seconds (0: off)")


class PoolConfig(_Closed):
    """One pool of identical workers (Ray actors) and what each worker asks Ray for.

    Placement: a worker lands on a node that has all of ``num_cpus``, ``num_gpus`` and
    ``resources`` free. To pin a pool to particular nodes, start those nodes with a custom
    resource (``ray start --resources='{"decode_node": 8}'``) and ask for a little of it here
    (``resources: {decode_node: 1}``).
    """

    num_workers: int = Field(1, ge=0, le=1024, description="workers started with the cluster")
    min_workers: int = Field(
        1, ge=0, le=1024, description="fewest workers: scaling stops here and dead workers are replaced up to it")
    max_workers: int = Field(
        64, ge=1, le=1024, description="most workers `tessera scale` or the autoscaler may ask for")
    num_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves per worker (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per worker (fractions share one GPU)")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per worker, e.g. {decode_node: 1}; pins the pool to nodes that have them")
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per worker (CPU math)")
    scheduling_strategy: Literal["DEFAULT", "SPREAD"] = Field(
        "DEFAULT", description="Ray actor scheduling: DEFAULT packs by load, SPREAD spreads workers over nodes")
    cpu_affinity: list[int] = Field(
        default_factory=list,
        description="CPU cores every thread of each worker is pinned to (Linux); empty: no pinning. For fair "
                    "side-by-side CPU benchmarks (e.g. encoder+prefill on core 0, decode on core 1)")

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"resource {name!r} is set with num_cpus / num_gpus, not in `resources`")
            if not name or amount < 0:
                raise ValueError(f"resource {name!r}: amounts must be >= 0")
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> "PoolConfig":
        if not self.min_workers <= self.num_workers <= self.max_workers:
            raise ValueError(f"need min_workers <= num_workers <= max_workers, got {self.min_workers} / "
                             f"{self.num_workers} / {self.max_workers}")
        return self


class EncoderPoolConfig(PoolConfig):
    """The encoder pool: a ``PoolConfig`` plus cross-request batching and the output cache."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="media items in one tower forward")
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="how long a worker waits for more items before a forward, ms")
    cache_mb: float = Field(
        256.0, ge=0, description="encoder-output LRU cache per worker, MiB (keyed by media content hash)")
    autoscaling: EncoderAutoscalingConfig = Field(
        EncoderAutoscalingConfig(), description="autoscaler policy of the encoder pool")


class PrefillPoolConfig(PoolConfig):
    """The prefill pool: a ``PoolConfig`` plus its autoscaler policy."""

    autoscaling: PrefillAutoscalingConfig = Field(
        PrefillAutoscalingConfig(), description="autoscaler policy of the prefill pool")


class DecodePoolConfig(PoolConfig):
    """The decode pool: a ``PoolConfig`` plus its autoscaler policy."""

    autoscaling: DecodeAutoscalingConfig = Field(
        DecodeAutoscalingConfig(), description="autoscaler policy of the decode pool")


class ColocatedPoolConfig(PoolConfig):
    """The colocated pool (``mode: colocated``): each worker runs encode, prefill and decode."""

    autoscaling: DecodeAutoscalingConfig = Field(
        DecodeAutoscalingConfig(), description="not supported for the colocated pool yet: must stay disabled")

    @model_validator(mode="after")
    def _no_autoscaling(self) -> "ColocatedPoolConfig":
        if self.autoscaling.enabled:
            raise ValueError("autoscaling the colocated pool is not supported; use tessera scale")
        return self


class PoolsConfig(_Closed):
    """The three pools of a disaggregated deployment."""

    encoder: EncoderPoolConfig = Field(
        EncoderPoolConfig(), description="encoder workers: media decode + tower + projector")
    prefill: PrefillPoolConfig = Field(
        PrefillPoolConfig(), description="prefill workers: LM prefill, first token, KV send")
    decode: DecodePoolConfig = Field(
        DecodePoolConfig(), description="decode workers: KV receive, continuous-batch decode")

    colocated: ColocatedPoolConfig = Field(
        ColocatedPoolConfig(num_cpus=1.0), description="colocated workers (mode: colocated): encode + prefill + decode in one")

    def items(self) -> list[tuple[str, PoolConfig]]:
        """The three disaggregated pools (``ClusterConfig.active_pools`` follows the mode)."""
        return [(name, getattr(self, name)) for name in POOL_NAMES]


class KVTransferConfig(_Closed):
    """How prefill workers ship KV caches to decode workers."""

    transport: Literal["auto", "gloo", "shm", "ray", "nccl"] = Field(
        "auto", description="auto: shm to a decode worker on the same host, gloo to one on another node (chosen "
                            "per pair); gloo: CPU sockets, any nodes; shm: shared memory, prefill and decode workers "
                            "on one host (the fastest on CPU); ray: Ray object store; nccl: GPU (needs "
                            "nvidia-nccl-cu12)")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline of one request's whole KV transfer, seconds")
    lanes_per_pair: int = Field(
        4, ge=1, le=16, description="communicators a prefill worker may open to one decode worker (gloo, shm, nccl): "
                                    "transfers in flight side by side, so a short prompt's KV never queues behind a "
                                    "long one's (up to this many at once)")
    stream_layers: bool = Field(
        True, description="start a request's KV transfer with the prefill step that computes its last chunk, each "
                          "layer sent as soon as it is written (false: send after the first token is sampled)")
    interface: str = Field(
        "127.0.0.1", min_length=1,
        description="local IP address the workers' own sockets bind to: the KV transport's and the token "
                    "streams decode/colocated workers serve to routers (must be reachable from the peer "
                    "nodes and the routers); auto: each worker's node IP as Ray sees it (multi-node clusters)")


class RouterConfig(_Closed):
    """The front door: gRPC server, admission control, routing knobs."""

    host: str = Field("127.0.0.1", min_length=1,
                      description="address the gRPC and HTTP servers bind to (0.0.0.0: all)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP port (0: pick a free one)")
    max_http_body_mb: float = Field(
        64.0, gt=0, le=2047, description="largest HTTP request body, MiB (bounds inline base64 media); larger: 413")
    media_url_allowlist: tuple[str, ...] = Field(
        (), description="hosts that http(s) image URLs may be fetched from (`images.example.com`, or "
                        "`*.example.com` for its subdomains); empty: no URL fetching, only data: URIs")
    media_url_timeout_s: float = Field(
        10.0, gt=0, le=300, description="time cap of fetching one media URL, seconds (size cap: "
                                        "engine.limits.max_media_bytes)")
    max_message_mb: float = Field(
        64.0, gt=0, le=2047, description="largest gRPC message sent or received, MiB (bounds inline media)")
    max_inflight_requests: int = Field(
        256, ge=1, description="requests dispatched to the pools at once; later ones wait in the queue")
    max_queued_requests: int = Field(
        512, ge=0, description="requests waiting for admission; beyond it new requests get RESOURCE_EXHAUSTED")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens of a request that sets none (capped by engine.limits.max_tokens)")
    request_timeout_s: float = Field(
        600.0, gt=0, description="server-side deadline of a request when the client sets none, seconds")
    max_encoder_retries: int = Field(
        1, ge=0, le=10, description="times a request's media is encoded again (on another encoder when there is "
                                    "one) after an encoder worker failed it; then UNAVAILABLE")
    max_prefill_retries: int = Field(
        1, ge=0, le=10, description="times a prompt is prefilled again, on another prefill worker, after one "
                                    "failed before the first token; then UNAVAILABLE")
    max_decode_migrations: int = Field(
        1, ge=0, le=10, description="times a request whose decode worker (or KV transfer) failed after tokens "
                                    "were streamed moves to another decode worker, re-prefilling prompt + tokens "
                                    "so far (greedy output continues exactly); 0: it fails with UNAVAILABLE")
    trust_request_chat_template: bool = Field(
        False, description="accept a chat request's own `chat_template` (Jinja, rendered in transformers' sandbox); "
                           "off: such a request gets INVALID_ARGUMENT / 400. `chat_template_kwargs` are always "
                           "accepted")
    encoder_affinity_max_queue: int = Field(
        8, ge=0, description="encoder media-hash affinity is skipped when the affine worker has more queued items")
    api_keys: tuple[str, ...] = Field(
        (), description="keys every gRPC method and HTTP route (but health checks) needs as `authorization: "
                        "Bearer <key>`, compared in constant time; empty: no authentication. Keep the file private")
    tls_cert_file: str = Field(
        "", description="PEM certificate chain the gRPC and HTTP servers present (TLS; HTTP becomes HTTPS); "
                        "set with tls_key_file; empty: plaintext")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file (unencrypted; keep it private)")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle: clients must present a certificate signed by it (mutual TLS, both "
                        "servers, health checks included); needs tls_cert_file; empty: no client certificates")

    @model_validator(mode="after")
    def _check_tls(self) -> "RouterConfig":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("set both router.tls_cert_file and router.tls_key_file, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("router.tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            if not key or any(c.isspace() for c in key):
                raise ValueError("api_keys entries must be non-empty and contain no whitespace")
        return value

    @field_validator("media_url_allowlist")
    @classmethod
    def _check_allowlist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        hosts = tuple(h.strip().lower() for h in value)
        for host in hosts:
            name = host.removeprefix("*.")
            if not name or any(c in name for c in "/:@*?# \t") or name.startswith("."):
                raise ValueError(f"media_url_allowlist entry {host!r}: give a host name (images.example.com) or "
                                 f"*.example.com, without scheme, port or path")
        return hosts


class ControllerConfig(_Closed):
    """Pool membership at runtime (``cluster/controller.py``): health checks, draining, autoscaling."""

    health_check_period_s: float = Field(
        5.0, gt=0, le=3600,
        description="how often every worker is probed (its event loop, model thread and device answer), seconds")
    health_check_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="a probe that takes longer than this, or finds one model step running longer, counts as "
                    "failed, seconds")
    health_check_failures: int = Field(
        3, ge=1, le=100,
        description="consecutive failed probes that mark a worker dead (an actor that died is dead at once)")
    drain_timeout_s: float = Field(
        0.0, ge=0,
        description="how long a removed worker may take to finish what it holds before it is stopped (requests "
                    "left then end with an error), seconds; 0: router.request_timeout_s + kv_transfer.timeout_s, "
                    "so every admitted request finishes")
    autoscale_interval_s: float = Field(
        5.0, gt=0, le=3600, description="how often the autoscaler samples the pools' metrics and decides, seconds")


class ClusterConfig(_Closed):
    """A whole deployment. Load with ``ClusterConfig.from_yaml(path)``; every key is optional."""

    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="disaggregated: encoder, prefill and decode pools with KV transfer; colocated: "
                                     "one pool running all three phases per worker (the baseline)")
    engine: EngineConfig = Field(EngineConfig(), description="model and engine settings shared by every worker")
    pools: PoolsConfig = Field(PoolsConfig(), description="worker pools: encoder, prefill, decode")
    kv_transfer: KVTransferConfig = Field(KVTransferConfig(), description="KV-cache transport prefill -> decode")
    router: RouterConfig = Field(RouterConfig(), description="gRPC front door and admission control")
    controller: ControllerConfig = Field(
        ControllerConfig(), description="runtime pool membership: health checks, draining, autoscaling")
    startup_timeout_s: float = Field(
        300.0, gt=0, description="how long launch waits for every worker to be ready (model loaded), seconds")

    def active_pools(self) -> list[tuple[str, PoolConfig]]:
        """The pools this mode runs, as (name, config)."""
        if self.mode == "colocated":
            return [("colocated", self.pools.colocated)]
        return self.pools.items()

    @model_validator(mode="after")
    def _check_devices(self) -> "ClusterConfig":
        if self.engine.device == "cuda":
            cpu_only = [name for name, pool in self.active_pools() if pool.num_workers and pool.num_gpus <= 0]
            if cpu_only:
                raise ValueError(
                    f"engine.device is cuda but pools {cpu_only} ask Ray for no GPU (num_gpus: 0), and Ray hides "
                    f"GPUs from such workers; set pools.<name>.num_gpus (fractions share a GPU, e.g. 0.3)")
        if self.kv_transfer.transport == "nccl" and self.engine.device != "cuda":
            raise ValueError("kv_transfer.transport nccl needs engine.device cuda; use gloo, shm or ray on CPU")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        """Parse and validate a YAML file (raises ``ValueError`` naming the file and the bad keys)."""
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"{path}: invalid cluster config:\n{exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def drain_timeout_s(self) -> float:
        """``controller.drain_timeout_s``, or (0) long enough for every admitted request to end."""
        return self.controller.drain_timeout_s or self.router.request_timeout_s + self.kv_transfer.timeout_s

    def with_overrides(self, **sections: dict) -> "ClusterConfig":
        """A copy with some fields of some sections replaced (validated), e.g.
        ``with_overrides(engine={"model": m}, router={"grpc_port": 0})``."""
        data = self.model_dump()
        for section, fields in sections.items():
            if isinstance(fields, dict):
                if fields:
                    data[section] = {**data[section], **fields}
            else:  # a top-level scalar such as ``mode``
                data[section] = fields
        return type(self).model_validate(data)


# ------------------------------------------------------------------------------------------------
# The config reference (README): `python -m cluster.config --markdown`
# ------------------------------------------------------------------------------------------------

def _type_name(annotation) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin is dict:
        k, v = get_args(annotation)
        return f"map {k.__name__} → {v.__name__}"
    return getattr(annotation, "__name__", str(annotation))


def config_reference(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) rows for every leaf field, dotted keys, in order."""
    model = model or ClusterConfig
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(config_reference(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, _type_name(ann), json.dumps(default), field.description or ""))
    return rows


def config_reference_markdown() -> str:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, typ, default, desc in config_reference():
        lines.append(f"| `{key}` | {typ} | `{default}` | {desc} |")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.config", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the config reference as a Markdown table")
    parser.add_argument("--check", metavar="YAML", help="validate a cluster config file")
    parser.add_argument("--defaults", action="store_true", help="print the default config as YAML")
    args = parser.parse_args(argv)
    if args.check:
        try:
            ClusterConfig.from_yaml(args.check)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.check}: ok")
    if args.defaults:
        print(ClusterConfig().to_yaml(), end="")
    if args.markdown or not (args.check or args.defaults):
        print(config_reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
