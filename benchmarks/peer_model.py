"""One model folder every server in a comparison can load.

The tiny LLaVA checkpoint (``models/tiny.py``) stores its CLIP tower as ``vision_tower.<X>``;
vLLM's LLaVA loader wants the hub layout ``vision_tower.vision_model.<X>`` (Tessera's loader
reads both). ``hub_layout_model`` writes a copy with the tower's keys renamed and everything else
(tensors, config, tokenizer, processor, chat template) as is, so Tessera and the peer serve the
very same weights from the very same folder.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "tessera" / "bench" / "models"


def _rename(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def hub_layout_model(src: str | Path, cache_dir: Path = CACHE_DIR) -> Path:
    """A hub-layout copy of ``src`` (made once per source checkpoint; reused afterwards)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(src)
    files = sorted(src.glob("*.safetensors"))
    if not files or not any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
                            for f in files for k in safe_open(str(f), "pt").keys()):
        return src  # already in a layout vLLM reads (or not a LLaVA checkpoint)
    digest = hashlib.sha256(b"".join(f.read_bytes()[:1 << 16] + str(f.stat().st_size).encode() for f in files))
    dst = cache_dir / f"{src.name}-hub-{digest.hexdigest()[:10]}"
    if (dst / "config.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in src.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy2(item, tmp / item.name)
    for f in files:
        with safe_open(str(f), "pt") as reader:
            tensors = {_rename(k): reader.get_tensor(k) for k in reader.keys()}
            metadata = reader.metadata() or {"format": "pt"}
        save_file(tensors, str(tmp / f.name), metadata=metadata)
    index = src / "model.safetensors.index.json"
    if index.exists():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {_rename(k): v for k, v in data["weight_map"].items()}
        (tmp / index.name).write_text(json.dumps(data, indent=2))
    tmp.rename(dst)
    return dst
