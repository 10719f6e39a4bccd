"""M-RoPE positions (Qwen2-VL family): three rotary position ids per token — temporal, height,
width — computed from the prompt's token ids and each media item's patch grid.

Text tokens get the same id on all three axes, counting on from the last position used; the
tokens of an image or video get ``start + (t, h, w)`` over its merged grid (Qwen2.5-VL spaces a
video's temporal ids by time: ``t * tokens_per_second * seconds_per_temporal_patch``), and the text after it
continues at ``start + max(h, w)`` (the spatial extent, as transformers' ``get_rope_index``). The
prompt's positions therefore end below its length: ``delta = max position + 1 - len(prompt)``
(negative after large images), and every later token ``i`` (output, or a prompt token past
``len(prompt)`` on re-prefill) sits at ``i + delta`` on all three axes. Prefill needs the 3-D
positions of the prompt; decode needs only ``delta``, which travels with the request.
Qwen3-VL tells time by text instead: a video's temporal patches are separate runs, each after its
timestamp ("<1.3 seconds>"), each placed as a one-frame grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MRopeSpec:
    """What the positions of a Qwen-VL prompt depend on, besides its tokens and grids."""

    image_token_id: int
    video_token_id: int | None
    spatial_merge_size: int
    tokens_per_second: int | None = None  # Qwen2.5-VL: temporal position ids per second of video
    # Qwen3-VL: each temporal patch of a video is its own run of placeholders (timestamp text
    # between), placed as a one-frame grid: every patch starts its temporal axis where text left off
    frame_runs: bool = False

    @classmethod
    def from_config(cls, config) -> "MRopeSpec | None":
        """The model's spec, or None when its language model does not use M-RoPE."""
        text = config.get_text_config()
        params = getattr(text, "rope_parameters", None) or {}
        if "mrope_section" not in params and text.model_type != "qwen3_vl_text":  # (Qwen3-VL: always)
            return None
        return cls(config.image_token_id, getattr(config, "video_token_id", None),
                   config.vision_config.spatial_merge_size, getattr(config.vision_config, "tokens_per_second", None),
                   frame_runs=text.model_type == "qwen3_vl_text")


def mrope_positions(spec: MRopeSpec, token_ids: list[int], grids: list[tuple[int, int, int]],
                    seconds_per_grid: list[float | None] | None = None) -> tuple[torch.Tensor, int]:
    """``([3, len(token_ids)] int64 positions, delta)``. ``grids``: the (t, h, w) patch grid of
    each media item, in prompt order; each item's placeholders are one run of its media token,
    ``t * h * w / merge**2`` long (ValueError otherwise) — with ``spec.frame_runs``, a video is
    ``t`` runs of ``h * w / merge**2``, each placed as a grid of one frame. ``seconds_per_grid``: per item, a
    video's seconds per temporal patch (None for images), used where the spec has
    ``tokens_per_second``."""
    seconds_per_grid = seconds_per_grid or [None] * len(grids)
    merge = spec.spatial_merge_size
    media = {spec.image_token_id, spec.video_token_id} - {None}
    pieces: list[torch.Tensor] = []
    pos, i, n, item, frames_left = 0, 0, len(token_ids), 0, 0
    while i < n:
        j = i
        if token_ids[i] in media:
            if frames_left == 0 and item >= len(grids):
                raise ValueError(f"more media placeholder runs than the {len(grids)} grids given")
            t, h, w = grids[item]
            if spec.frame_runs and token_ids[i] == spec.video_token_id:
                frames_left = frames_left or t
                t, frames_left = 1, frames_left - 1
            gh, gw = h // merge, w // merge
            length = t * gh * gw
            if token_ids[i: i + length] != [token_ids[i]] * length:
                raise ValueError(f"media item {item}: expected {length} placeholder tokens at index {i}")
            temporal = torch.arange(t)
            if spec.tokens_per_second and seconds_per_grid[item] is not None:
                # float32 as transformers computes it (a tensor of seconds), then truncated
                interval = spec.tokens_per_second * torch.tensor(seconds_per_grid[item], dtype=torch.float32)
                temporal = (temporal * interval).long()
            grid_t, grid_h, grid_w = torch.meshgrid(temporal, torch.arange(gh), torch.arange(gw), indexing="ij")
            pieces.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + pos)
            pos += max(gh, gw)
            i, item = i + length, item + (frames_left == 0)
            continue
        while j < n and token_ids[j] not in media:
            j += 1
        pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
        pos, i = pos + j - i, j
    if item != len(grids) or frames_left:
        raise ValueError(f"{len(grids)} grids for {item} media placeholder runs")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.int64)
    delta = (int(positions.max()) + 1 - n) if n else 0
    return positions, delta


def step_positions(prompt_positions: torch.Tensor | None, delta: int, start: int, end: int) -> torch.Tensor:
    """[3, end - start] positions of tokens [start, end) of a request: the prompt's own 3-D
    positions where it has them, ``index + delta`` after."""
    known = 0 if prompt_positions is None else prompt_positions.shape[1]
    if end <= known:
        return prompt_positions[:, start:end]
    tail = torch.arange(max(start, known), end).add_(delta).expand(3, -1)
    if start >= known:
        return tail
    return torch.cat([prompt_positions[:, start:], tail], dim=1)
