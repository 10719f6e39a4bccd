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
        """One tower forward for all ``items``; returns [num_tokens_i, lm_hidden] per item."""
        if not items:
            return []
        encoder = self.model.encoders[items[0].modality]
        inputs = {k: v.to(self.device) for k, v in self.processor.preprocess(items).items()}
        embeddings = encoder(**inputs)
        for item, emb in zip(items, embeddings):
            if emb.shape[0] != item.num_tokens:  # the token plan and the tower disagree: a bug
                raise RuntimeError(f"encoder produced {emb.shape[0]} tokens, plan expected {item.num_tokens}")
        return embeddings
