"""The tiny-model builder writes real, loadable, deterministic HF checkpoints (CPU, offline)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.media_samples import make_test_audio, make_test_image
from models.tiny import ARCHS, TINY_MODEL_DIR_ENV, build_tiny_model, ensure_tiny_model

transformers = pytest.importorskip("transformers")

# Placeholder expansion per media item, as the processor computes it.
# LLaVA: (224 / 14)^2; Qwen2-VL, a 256x192 image: smart resize to 252x196, 18 x 14 patches, 2x2 merged
NUM_IMAGE_TOKENS = {"llava-clip-llama": 256, "llava-siglip-qwen2": 256, "qwen2-vl": 63, "qwen2.5-vl": 63,
                    "qwen3-vl": 48}
QWEN_VL = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def num_audio_tokens(num_samples: int, hop_length: int = 160) -> int:
    """Qwen2-Audio: mel frames (10 ms) -> stride-2 conv -> stride-2 pool."""
    num_frames = num_samples // hop_length
    return ((num_frames - 1) // 2 + 1 - 2) // 2 + 1


def model_class(arch: str):
    if arch == "qwen2-audio":
        return transformers.Qwen2AudioForConditionalGeneration
    if arch == "qwen2-vl":
        return transformers.Qwen2VLForConditionalGeneration
    if arch == "qwen2.5-vl":
        return transformers.Qwen2_5_VLForConditionalGeneration
    if arch == "qwen3-vl":
        return transformers.Qwen3VLForConditionalGeneration
    return transformers.LlavaForConditionalGeneration


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def load_state_dict(arch: str, folder: Path) -> dict[str, torch.Tensor]:
    model, info = model_class(arch).from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    return model.state_dict()


def saved_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            keys.update(f.keys())
    return keys


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, build_tiny_model(arch, tmp_path_factory.mktemp(arch) / "model")


def test_writes_hf_files(built):
    arch, folder = built
    names = {p.name for p in folder.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
    }
    assert expected <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [model_class(arch).__name__]


def test_tokenizer_and_config_agree(built):
    arch, folder = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    generation = json.loads((folder / "generation_config.json").read_text())

    assert 1000 <= len(tokenizer) <= config.get_text_config().vocab_size
    text = "Hello, wörld! 1024 tokens — ünïcode 😀 ok"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    if arch == "qwen2-audio":
        assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") == config.audio_token_id
    elif arch in QWEN_VL:
        assert tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"]) == [
            config.image_token_id, config.video_token_id, config.vision_start_token_id]
    else:
        assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    if arch == "llava-clip-llama":
        assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
        assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id  # Llama prepends BOS
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert tokenizer.pad_token_id == generation["pad_token_id"]


EXPECTED_PROMPTS = {
    "llava-clip-llama": "USER: <image>\nWhat is it? ASSISTANT:",
    "llava-siglip-qwen2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen2-vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen2.5-vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen3-vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen2-audio": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


def test_chat_template(built):
    arch, folder = built
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    media_type = "audio" if arch == "qwen2-audio" else "image"
    parts = [{"type": media_type}, {"type": "text", "text": "What is it?"}]
    messages = [{"role": "user", "content": parts}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == EXPECTED_PROMPTS[arch]
    # Plain-string content and multi-turn conversations render too.
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert "Hi" in text and "Hello" in text and text.index("Hello") < text.index("Bye")


def _model_inputs(arch: str, processor, text: str, seed: int):
    """Chat-templated prompt with one media item, through the processor (as a user would)."""
    media_type = "audio" if arch == "qwen2-audio" else "image"
    messages = [{"role": "user", "content": [{"type": media_type}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if arch == "qwen2-audio":
        audio, sr = _decode_wav(make_test_audio(seed, seconds=2.0))
        return processor(text=prompt, audio=[audio], sampling_rate=sr, return_tensors="pt")
    image = Image.open(io.BytesIO(make_test_image(seed)))
    return processor(text=prompt, images=[image], return_tensors="pt")


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    return audio, sr


def test_processor_expands_media_and_model_generates(built):
    arch, folder = built
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = model_class(arch).from_pretrained(folder, local_files_only=True).eval()
    is_audio = arch == "qwen2-audio"
    media_token_id = model.config.audio_token_id if is_audio else model.config.image_token_id
    expected_media_tokens = NUM_IMAGE_TOKENS.get(arch) or num_audio_tokens(2 * 16000)

    for seed, text in enumerate(["What is in it?", "Describe it in detail, please."]):
        inputs = _model_inputs(arch, processor, text, seed)
        prompt_ids = inputs["input_ids"][0]
        assert int((prompt_ids == media_token_id).sum()) == expected_media_tokens
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=16,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new_ids = out.sequences[0, len(prompt_ids) :].tolist()
        assert len(new_ids) == 16  # special tokens (EOS included) are never greedy
        assert len(set(new_ids)) >= 6, new_ids  # varied, not one token repeated
        assert max(new_ids) < len(processor.tokenizer)  # never the vocab padding
        # No near-ties: an engine matching transformers in fp32 must pick the same tokens.
        for scores in out.scores:
            top2 = scores[0].topk(2).values
            assert float(top2[0] - top2[1]) > 1e-4


def test_build_is_deterministic(built, tmp_path):
    arch, folder = built
    build_tiny_model(arch, tmp_path / "again", max_shard_size="2MB")
    again = build_tiny_model(arch, tmp_path / "again")  # same folder: old shards must go
    assert file_hashes(again) == file_hashes(folder)
    other_seed = build_tiny_model(arch, tmp_path / "seed1", seed=1)
    assert file_hashes(other_seed)["model.safetensors"] != file_hashes(folder)["model.safetensors"]


def test_sharded_and_hub_layouts_load_identical_weights(built, tmp_path):
    arch, folder = built
    reference = load_state_dict(arch, folder)

    sharded = build_tiny_model(arch, tmp_path / "sharded", max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert not (sharded / "model.safetensors").exists()

    hub = build_tiny_model(arch, tmp_path / "hub", hub_layout=True, max_shard_size="4MB")
    hub_prefixes = {key.split(".")[0] for key in saved_keys(hub)}
    if arch in QWEN_VL:  # the hub's Qwen2-VL / Qwen2.5-VL names are what transformers 5 saves
        want = {"model", "lm_head"} if arch == "qwen3-vl" else {"model", "visual", "lm_head"}  # Qwen3: model.visual.*
        assert hub_prefixes == want and saved_keys(hub) == saved_keys(folder)
    tower = "audio_tower" if arch == "qwen2-audio" else "vision_tower" if arch not in QWEN_VL else None
    if tower is not None:
        assert hub_prefixes == {"language_model", "multi_modal_projector", tower}
    if tower == "vision_tower":
        tower_keys = [k for k in saved_keys(hub) if k.startswith("vision_tower.")]
        assert all(k.startswith("vision_tower.vision_model.") for k in tower_keys)
        assert not any(k.startswith("vision_tower.vision_model.") for k in saved_keys(folder))
    index = json.loads((hub / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == saved_keys(hub)

    for variant in (sharded, hub):
        state_dict = load_state_dict(arch, variant)
        assert state_dict.keys() == reference.keys()
        for key, tensor in reference.items():
            assert torch.equal(state_dict[key], tensor), key


def test_ensure_tiny_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv(TINY_MODEL_DIR_ENV, str(tmp_path))
    path = ensure_tiny_model("llava-siglip-qwen2")
    assert path.parent == tmp_path and path.name.startswith("llava-siglip-qwen2-")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("llava-siglip-qwen2") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folder left behind


def test_media_samples_are_deterministic_and_decodable():
    assert make_test_image(3) == make_test_image(3) != make_test_image(4)
    image = Image.open(io.BytesIO(make_test_image(3, size=(64, 48))))
    assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGB"

    assert make_test_audio(3) == make_test_audio(3) != make_test_audio(4)
    audio, sr = _decode_wav(make_test_audio(3, seconds=1.5, sr=16000))
    assert sr == 16000 and audio.shape == (24000,)
    assert 0.01 < float(np.abs(audio).mean()) < 1.0
