"""``EncoderRunner``: decoded media -> embeddings, batched across items and requests."""

from __future__ import annotations

import torch

from models.model import MultimodalModel
from models.processor import DecodedMedia, MultimodalProcessor


class EncoderRunner:
    def __init__(self, model: MultimodalModel, processor: MultimodalProcessor, device="cpu"):
        self.model = model
        self.processor = processor
        self.device = torch.device(device)

    @torch.inference_mode()
    def encode(self, items: list[DecodedMedia]) -> list[torch.Tensor]:
        """One tower forward per modality of ``items`` (images and videos of a Qwen-VL model are
        separate forwards of the same tower); [num_tokens_i, lm_hidden] per item, in order."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for modality in dict.fromkeys(m.modality for m in items):
            index = [i for i, m in enumerate(items) if m.modality == modality]
            group = [items[i] for i in index]
            encoder = self.model.encoders[modality]
            inputs = {k: v.to(self.device) for k, v in self.processor.preprocess(group).items()}
            for i, item, emb in zip(index, group, encoder(**inputs)):
                if emb.shape[0] != item.num_tokens:  # the token plan and the tower disagree: a bug
                    raise RuntimeError(f"encoder produced {emb.shape[0]} tokens, plan expected {item.num_tokens}")
                out[i] = emb
        return out
