"""Building an engine's parts from an ``EngineConfig``: shared by the colocated engine and the
prefill and decode workers, so every LM engine sizes its KV cache and context the same way.

    lm = build_lm_engine(config, model)   # runner (owns the KV cache), blocks, scheduler, max_model_len

Prefix caching follows ``config.enable_prefix_caching`` unless the caller turns it off (decode
workers receive KV into reserved blocks and never look a prefix up).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GenerationConfig

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.model_runner import ModelRunner
from cluster.engine.scheduler import Scheduler, SchedulerConfig
from models.loader import resolve_model_path
from models.model import MultimodalModel
from models.paged_attention import KVCacheSpec


def resolve_engine_model(config: EngineConfig):
    if config.model:
        return resolve_model_path(config.model)
    from models.tiny import ensure_tiny_model  # the built-in default, built once and cached

    return ensure_tiny_model()


def eos_token_ids(model_dir, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def num_kv_blocks(config: EngineConfig, lm) -> int:
    spec = KVCacheSpec(lm.num_layers, 1, config.block_size, lm.num_kv_heads, lm.head_dim, config.torch_dtype)
    return max(2, int(config.kv_cache_memory_gb * 2**30 // spec.bytes_per_block))


def resolve_max_model_len(config: EngineConfig, text_config, num_blocks: int) -> int:
    limit = text_config.max_position_embeddings
    if config.max_model_len:
        if config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's {limit} positions")
        limit = config.max_model_len
    return min(limit, num_blocks * config.block_size)


@dataclass
class LMEngine:
    """The language-model half of an engine: KV cache + runner, block manager, scheduler."""

    runner: ModelRunner
    blocks: BlockManager
    scheduler: Scheduler
    max_model_len: int


def build_lm_engine(config: EngineConfig, model: MultimodalModel, *, prefix_caching: bool = True) -> LMEngine:
    lm = model.language_model
    num_blocks = num_kv_blocks(config, lm)
    runner = ModelRunner(lm, num_blocks, config.block_size, config.torch_dtype, config.device,
                         attention_backend=config.attention_backend, linear_backend=config.linear_backend,
                         model_dir=str(resolve_engine_model(config)))
    max_model_len = resolve_max_model_len(config, model.text_config, num_blocks)
    blocks = BlockManager(num_blocks, config.block_size)
    scheduler = Scheduler(
        SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                        enable_prefix_caching=prefix_caching and config.enable_prefix_caching), blocks)
    return LMEngine(runner, blocks, scheduler, max_model_len)
