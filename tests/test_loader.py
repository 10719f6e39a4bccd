import json

import pytest
import torch

from models.loader import canonical_key, load_model
from models.tiny import build_tiny_model


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llava-clip-llama", "qwen2-audio"])
def test_sharded_and_hub_layouts_load_identically(tmp_path, tiny_models, arch):
    base = _weights(load_model(tiny_models[arch]))
    sharded = build_tiny_model(arch, tmp_path / "sharded", max_shard_size="300KB")
    assert (sharded / "model.safetensors.index.json").exists()
    hub = build_tiny_model(arch, tmp_path / "hub", hub_layout=True)
    for path in (sharded, hub):
        other = _weights(load_model(path))
        assert other.keys() == base.keys()
        for k in base:
            assert torch.equal(base[k], other[k]), (path, k)


def test_key_layouts_map_to_one_canonical_name():
    assert canonical_key("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision") == \
        canonical_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight", "vision") == \
        "vision.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert canonical_key("language_model.lm_head.weight", "vision") == canonical_key("lm_head.weight", "vision")
    assert canonical_key("multi_modal_projector.linear.weight", "audio") == "audio.multi_modal_projector.linear.weight"


def test_parts_load_only_what_a_pool_runs(tiny_models):
    lm_only = load_model(tiny_models["llava-clip-llama"], parts={"language_model"})
    assert lm_only.vision is None and lm_only.language_model is not None
    enc_only = load_model(tiny_models["qwen2-audio"], parts={"encoders"})
    assert enc_only.language_model is None and enc_only.audio is not None


def test_unsupported_architecture_is_a_clear_error(tmp_path, tiny_models):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["llava-clip-llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'MambaForCausalLM'"):
        load_model(bad)


def test_missing_weight_is_named(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "missing"
    shutil.copytree(tiny_models["qwen2-audio"], bad)
    tensors = load_file(bad / "model.safetensors")
    dropped = next(k for k in tensors if "layers.1" in k)
    del tensors[dropped]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weights"):
        load_model(bad)
