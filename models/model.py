"""``MultimodalModel``: the language model plus the media encoders an architecture has.

Module tree (and therefore the canonical weight names the loader maps every layout onto):

    language_model   CausalLM          language_model.model.*, language_model.lm_head.*
    vision           VisionEncoder     vision.vision_tower.*, vision.multi_modal_projector.*   (LLaVA)
                     QwenVLVisionEncoder  vision.visual.*                          (Qwen2-VL, Qwen2.5-VL)
    audio            AudioEncoder      audio.audio_tower.*, audio.multi_modal_projector.*      (Qwen2-Audio)

Pools load only the part they run (``parts=``): encoder workers the encoders, prefill and decode
workers the language model.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from models.encoders import AudioEncoder, QwenVLVisionEncoder, VisionEncoder
from models.llm import CausalLM

# architecture (config.json "architectures"[0]) -> modality of its encoder (None: text-only)
ARCHITECTURES: dict[str, str | None] = {
    "LlavaForConditionalGeneration": "image",
    "Qwen2VLForConditionalGeneration": "image",
    "Qwen2_5_VLForConditionalGeneration": "image",
    "Qwen3VLForConditionalGeneration": "image",
    "Qwen2AudioForConditionalGeneration": "audio",
    "LlamaForCausalLM": None,
    "Qwen2ForCausalLM": None,
}

# Dynamic resolution and M-RoPE positions (models/mrope.py)
QWEN_VL_ARCHITECTURES = frozenset({"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                                   "Qwen3VLForConditionalGeneration"})

ALL_PARTS = frozenset({"language_model", "encoders"})


class MultimodalModel(nn.Module):
    def __init__(self, config, parts: Collection[str] = ALL_PARTS):
        super().__init__()
        self.config = config
        arch = (getattr(config, "architectures", None) or [""])[0]
        self.modality = ARCHITECTURES.get(arch)
        text_config = config.get_text_config()
        self.language_model = CausalLM(text_config) if "language_model" in parts else None
        want_encoders = "encoders" in parts
        vision_cls = QwenVLVisionEncoder if arch in QWEN_VL_ARCHITECTURES else VisionEncoder
        self.vision = vision_cls(config) if want_encoders and self.modality == "image" else None
        self.audio = AudioEncoder(config) if want_encoders and self.modality == "audio" else None

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def encoders(self) -> dict[str, nn.Module]:
        return {kind: m for m in (self.vision, self.audio) if m is not None for kind in m.modalities}

    @property
    def media_token_id(self) -> int | None:
        """Id of the placeholder token media embeddings replace (``<image>`` / ``<|AUDIO|>``)."""
        if self.modality == "image":
            return self.config.image_token_id
        if self.modality == "audio":
            return self.config.audio_token_id
        return None

    def materialize_buffers(self) -> None:
        """Give real values to the non-persistent buffers left on the meta device by loading."""
        for module in self.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if not buf.is_meta:
                    continue
                if name == "position_ids":  # CLIP / SigLIP embeddings: arange over positions
                    module.register_buffer(
                        name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False
                    )
                elif name in ("inv_freq", "original_inv_freq") and hasattr(module, "config"):
                    # a transformers rotary embedding (Qwen2-VL's vision tower): its own init, on the CPU
                    with torch.device("cpu"):
                        fresh = type(module)(module.config)
                    module.register_buffer(name, getattr(fresh, name), persistent=False)
                else:
                    raise RuntimeError(f"don't know how to initialise buffer {name!r} of {type(module).__name__}")
