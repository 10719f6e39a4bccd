"""Typed configuration: one closed pydantic model per component, composed into ``ClusterConfig``.

Unknown keys are rejected (``extra="forbid"``), every field is documented once (the text serves
the CLI help and the YAML reference in the README), and values are validated when loaded.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from models.processor import MediaLimits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(_Closed):
    max_media_per_request: int = Field(8, ge=0, le=256, description="media items in one request")
    max_media_bytes: int = Field(20 * 2**20, ge=1, description="encoded size of one media item, bytes")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height cap, checked before decoding")
    max_audio_seconds: float = Field(30.0, gt=0, le=30.0, description="audio clip length cap (Qwen2-Audio: 30 s window)")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")

    def media(self) -> MediaLimits:
        return MediaLimits(self.max_media_per_request, self.max_media_bytes, self.max_image_pixels,
                           self.max_audio_seconds)


class EngineConfig(_Closed):
    """How one engine (colocated, or the LM part of a prefill/decode worker) runs the model."""

    model: str = Field("", description="model folder or hub id; empty: the built-in tiny multimodal model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations dtype (float16 needs a GPU)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    kv_cache_memory_gb: float = Field(0.5, gt=0, description="memory for the KV cache, GiB")
    max_num_seqs: int = Field(64, ge=1, description="requests in one running batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="new tokens per step (prefill chunk bound)")
    max_model_len: int = Field(0, ge=0, description="context length; 0: the model's max_position_embeddings")
    limits: LimitsConfig = LimitsConfig()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
