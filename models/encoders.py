"""Media encoders: vision tower + projector (LLaVA), the Qwen2-VL vision transformer (patch
merger included) and audio tower + projector (Qwen2-Audio).

Towers are stateless forwards, so they reuse ``transformers``' modules (CLIP, SigLIP, the
Whisper-style Qwen2-Audio encoder); the selection logic around them (feature layer, CLS
handling, audio length masking) mirrors the reference ``get_image_features`` /
``get_audio_features`` so embeddings match it exactly.

Each encoder maps a batch of preprocessed media to a list of per-item embeddings
``[num_media_tokens, lm_hidden]`` — one entry per media item, lengths may differ (audio).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.qwen2_audio.modeling_qwen2_audio import (
    Qwen2AudioEncoder,
    Qwen2AudioMultiModalProjector,
)


class VisionEncoder(nn.Module):
    """LLaVA vision path: CLIP or SigLIP tower -> feature layer(s) -> MLP projector."""

    modalities = ("image",)

    def __init__(self, config):
        super().__init__()
        vision_config = config.vision_config
        if vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(f"unsupported vision tower {vision_config.model_type!r} (CLIP or SigLIP)")
        self.vision_tower = AutoModel.from_config(vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.feature_layer = config.vision_feature_layer  # int or list of ints
        self.select_strategy = config.vision_feature_select_strategy  # "default" drops CLS, "full" keeps

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        # pixel_values: [N, 3, H, W] -> N x [tokens_per_image, lm_hidden]
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return list(self.multi_modal_projector(torch.cat(feats, dim=-1)))


class QwenVLVisionEncoder(nn.Module):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision path: a ViT over the flattened patches of every image of the batch at once
    (each image attends within itself: cumulative lengths from ``grid_thw``), then the 2x2 patch
    merger into the LM's hidden size — the reference ``get_image_features`` and
    ``get_video_features`` (one tower for both)."""

    modalities = ("image", "video")

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        towers = {"qwen2_vl_vision": Qwen2VisionTransformerPretrainedModel,  # full attention, LayerNorm, GELU
                  "qwen2_5_vl_vision": Qwen2_5_VisionTransformerPretrainedModel,  # + windows, RMSNorm, SwiGLU
                  "qwen3_vl_vision": Qwen3VLVisionModel}  # + interpolated position table, DeepStack mergers
        tower = towers.get(config.vision_config.model_type)
        if tower is None:
            raise ValueError(f"unsupported Qwen-VL vision tower {config.vision_config.model_type!r}")
        self.visual = tower._from_config(config.vision_config)
        self.spatial_merge_size = config.vision_config.spatial_merge_size

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        # pixel_values: [sum of patches, C * temporal_patch * patch^2]; grid_thw: [N, 3]
        # -> N x [t * h * w / merge^2, lm_hidden]; images and videos alike (a video: t > 1)
        out = self.visual(pixel_values.to(self.dtype), grid_thw=grid_thw)
        merged = out.pooler_output
        # Qwen3-VL: DeepStack features of some tower layers ride along, concatenated after the
        # embedding ([tokens, (1 + k) * lm_hidden]): one tensor per item through every hand-off
        stacked = getattr(out, "deepstack_features", None)
        if stacked:
            merged = torch.cat([merged, *stacked], dim=-1)
        return list(merged.split((grid_thw.prod(-1) // self.spatial_merge_size ** 2).tolist()))


class AudioEncoder(nn.Module):
    """Qwen2-Audio path: Whisper-style encoder (+ 2x average pooling) -> linear projector."""

    modalities = ("audio",)

    def __init__(self, config):
        super().__init__()
        self.audio_tower = Qwen2AudioEncoder(config.audio_config)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear.weight.dtype

    @staticmethod
    def output_lengths(num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel frames -> (frames after the stride-2 conv, audio tokens after pooling)."""
        after_conv = (num_frames - 1) // 2 + 1
        return after_conv, (after_conv - 2) // 2 + 1

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> list[torch.Tensor]:
        # input_features: [N, num_mel_bins, 3000] padded log-mel; feature_attention_mask: [N, 3000]
        # -> N x [num_audio_tokens_i, lm_hidden], each trimmed to the clip's real length.
        conv_lens, token_lens = self.output_lengths(feature_attention_mask.sum(-1))
        num_items, _, max_frames = input_features.shape
        max_len = (max_frames - 2) // 2 + 1
        valid = torch.arange(max_len)[None, :] < conv_lens[:, None]  # [N, max_len]
        mask = create_bidirectional_mask(
            config=self.audio_tower.config,
            inputs_embeds=torch.zeros(num_items, max_len, 1, dtype=self.dtype),
            attention_mask=valid.long(),
        )
        hidden = self.audio_tower(input_features.to(self.dtype), attention_mask=mask).last_hidden_state
        feats = self.multi_modal_projector(hidden)  # [N, max_tokens, lm_hidden]
        return [feats[i, : int(token_lens[i])] for i in range(num_items)]
