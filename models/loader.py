"""Load a Hugging Face model folder (config.json + safetensors) into a ``MultimodalModel``.

Checkpoints of the same architecture exist under several key layouts: the hub's LLaVA /
Qwen2-Audio checkpoints (``vision_tower.vision_model.*``, ``language_model.model.*``), what recent
``transformers`` versions save (``model.vision_tower.*``, ``model.language_model.*``,
``lm_head.*``), and plain text-only LMs (``model.*``). Each is rewritten by prefix into the one
canonical layout of our module tree, then loaded strictly: a missing or unexpected key is an error
that names it, never a silently random weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from models.model import ALL_PARTS, ARCHITECTURES, MultimodalModel

# (checkpoint prefix, canonical prefix), first match wins; longest prefixes first.
# transformers 5 dropped the ``vision_model.`` level inside CLIP/SigLIP vision models, so the
# hub's ``vision_tower.vision_model.X`` becomes ``vision.vision_tower.X``.
_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision.vision_tower."),
    # Qwen2-VL: the hub's visual.* / model.* / lm_head.*, transformers 5's model.visual.* /
    # model.language_model.* (the LM rules below)
    ("model.visual.", "vision.visual."),
    ("visual.", "vision.visual."),
    ("vision_tower.vision_model.", "vision.vision_tower."),
    # transformers >= 4.52 save format
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision.vision_tower."),
    ("model.audio_tower.", "audio.audio_tower."),
    ("model.multi_modal_projector.", "{mm}.multi_modal_projector."),
    # hub format
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision.vision_tower."),
    ("audio_tower.", "audio.audio_tower."),
    ("multi_modal_projector.", "{mm}.multi_modal_projector."),
    # text-only LM / new-format lm_head
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, fetched only when the machine is online."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model folder {str(name_or_path)!r} does not exist (and HF_HUB_OFFLINE=1)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            str(name_or_path),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
        ))
    except Exception as exc:  # noqa: BLE001 - any hub failure is "not found" to the user
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a local folder nor reachable on the hub: {exc}"
        ) from exc


def checkpoint_files(path: Path) -> list[Path]:
    """Single ``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return found


def canonical_key(key: str, mm_prefix: str) -> str | None:
    for src, dst in _PREFIX_RULES:
        if key.startswith(src):
            return dst.format(mm=mm_prefix) + key[len(src):]
    return None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parts=ALL_PARTS,
) -> MultimodalModel:
    """Build the model on the meta device and assign the checkpoint's tensors to it (no random
    init of weights that are about to be overwritten). ``parts`` limits what is built and loaded."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in {path / 'config.json'}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    with torch.device("meta"):
        model = MultimodalModel(config, parts)
    mm_prefix = "audio" if model.audio is not None else "vision"
    expected = model.state_dict(keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = canonical_key(key, mm_prefix)
                if name is not None and getattr(model, name.split(".", 1)[0]) is None:
                    continue  # a part this process does not run
                if name is None or name not in expected:
                    if name is not None and name.endswith(("rotary_emb.inv_freq", "position_ids")):
                        continue  # buffers some old checkpoints saved; recomputed here
                    raise ValueError(f"unexpected weight {key!r} in {file.name} for {arch}")
                loaded[name] = f.get_tensor(key)
    tied = model.language_model is not None and model.text_config.tie_word_embeddings
    if tied:
        loaded.pop("language_model.lm_head.weight", None)  # shares embed_tokens
    missing = [k for k in expected if k not in loaded and not (tied and k == "language_model.lm_head.weight")]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.materialize_buffers()
    model = model.to(device=device, dtype=dtype).eval()
    if model.language_model is not None:
        model.language_model.fuse_projections()  # (after the cast: fused in the serving dtype)
    return model
