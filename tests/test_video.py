"""Video (Qwen2-VL, Qwen3-VL): frames sampled and preprocessed exactly as the model's Hugging Face
video processor does them, the per-request token cap, and ``tessera generate --video``. Greedy parity
with transformers for one video and image + video in one prompt is in test_qwen_vl.py (in
process: chunked, prefix-cached) and test_cluster_e2e.py (disaggregated); bad videos against a
served cluster in test_bad_input.py."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.config import EngineConfig, LimitsConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import InvalidRequestError, MediaInput, SamplingParams
from models.media_samples import make_test_image, make_test_video
from models.processor import MediaLimits, MultimodalProcessor
from tests.reference import QWEN_VL_IMAGE, QWEN_VL_VIDEO, HFReference, _load_video
from tests.test_cli import tessera


def _setup(path):
    ref = HFReference(path)
    return path, ref, MultimodalProcessor(path, ref.model.config)


@pytest.fixture(scope="module")
def qwen_vl(tiny_models):
    return _setup(tiny_models["qwen2-vl"])


@pytest.fixture(scope="module", params=("qwen2-vl", "qwen3-vl"))  # two video processors (Qwen2.5-VL: Qwen2's)
def any_video_processor(request, tiny_models):
    return _setup(tiny_models[request.param])


@pytest.mark.parametrize("kind,frames,fps,size", [
    ("mp4", 9, 3, (112, 84)),  # sampled at 2 fps: 6 of 9 frames
    ("webm", 8, 2, (96, 128)),  # at the sampling rate: every frame
    ("mkv", 30, 15, (200, 120)),  # 2 s at 15 fps: 4 frames; resized down to the frame pixel cap
    ("mp4", 5, 2, (84, 84)),  # an odd count: sampling keeps whole temporal patches (4 frames)
])
def test_frames_and_pixels_equal_the_video_processor(any_video_processor, kind, frames, fps, size):
    path, ref, proc = any_video_processor
    media = MediaInput(make_test_video(7, size, frames, fps, kind), f"video/{kind}")
    ours = proc.decode_media(media, MediaLimits())
    all_frames, meta = _load_video(media.data)
    want = ref.processor.video_processor(videos=[all_frames], video_metadata=[meta], do_sample_frames=True,
                                         fps=proc.video_fps, return_tensors="pt")
    got = proc.preprocess([ours])
    assert ours.grid_thw == tuple(want["video_grid_thw"][0].tolist())
    assert torch.equal(got["pixel_values"], want["pixel_values_videos"])
    assert ours.num_tokens == int(want["video_grid_thw"][0].prod()) // 4
    if fps == proc.video_fps:  # at the sampling rate every frame is kept: Qwen2-VL's sampler keeps whole
        # temporal patches, Qwen3-VL's every frame (the last patch padded by repeating the last frame)
        kept = frames if proc.mrope.frame_runs else frames - frames % 2
        assert ours.video.indices == list(range(kept))


def test_qwen3_vl_needs_a_whole_temporal_patch(tiny_models):
    """Qwen3-VL's resize refuses fewer frames than a temporal patch: a one-frame video is the
    client's error, said before any worker."""
    _, _, proc = _setup(tiny_models["qwen3-vl"])
    with pytest.raises(ValueError, match=r"video has 1 frame\(s\) to sample; this model needs at least 2"):
        proc.decode_media(MediaInput(make_test_video(5, (84, 84), 1, 2), "video/mp4"), MediaLimits())


def test_a_video_and_images_share_the_tower_and_the_placeholders_must_match(qwen_vl):
    path, ref, proc = qwen_vl
    video = proc.decode_media(MediaInput(make_test_video(1), "video/mp4"), MediaLimits())
    image = proc.decode_media(MediaInput(make_test_image(1, (84, 112)), "image/png"), MediaLimits())
    plan = proc.build_token_plan(f"{QWEN_VL_VIDEO} and {QWEN_VL_IMAGE}", [video, image])
    assert plan.media_lengths == [video.num_tokens, image.num_tokens] and plan.position_delta < 0
    with pytest.raises(ValueError, match=r"placeholder 0 .*video.* media item 0 is image"):
        proc.build_token_plan(f"{QWEN_VL_VIDEO} and {QWEN_VL_IMAGE}", [image, video])


def test_media_token_cap_refuses_before_any_forward(qwen_vl):
    path, ref, proc = qwen_vl
    video = MediaInput(make_test_video(2, (112, 84), 9, 3), "video/mp4")  # 36 tokens
    prompt = f"{QWEN_VL_VIDEO} what happens?"
    capped = ColocatedEngine(EngineConfig(model=str(path), limits=LimitsConfig(max_media_tokens=35)))
    with pytest.raises(InvalidRequestError, match=r"36 prompt tokens \(video 36\); the limit is 35"):
        capped.inputs.prepare("r", prompt, [video], SamplingParams())
    frames = ColocatedEngine(EngineConfig(model=str(path), limits=LimitsConfig(max_video_frames=5)))
    with pytest.raises(InvalidRequestError, match="6 frames at the sampling rate; the limit is 5"):
        frames.inputs.prepare("r", prompt, [video], SamplingParams())
    roomy = ColocatedEngine(EngineConfig(model=str(path), limits=LimitsConfig(max_media_tokens=36)))
    assert sum(roomy.inputs.prepare("r", prompt, [video], SamplingParams()).plan.media_lengths) == 36


def test_cli_generate_video_chat_matches_transformers(qwen_vl, tmp_path):
    path, ref, proc = qwen_vl
    clip = tmp_path / "clip.webm"
    clip.write_bytes(make_test_video(4, (96, 72), 8, 4, "webm"))
    out = tessera("generate", "--model", str(path), "--video", str(clip), "--chat", "--max-tokens", "8",
                  "--ignore-eos", "--json", "What happens?")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = ref.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert result["token_ids"] == ref.greedy(prompt, [MediaInput(clip.read_bytes(), "video/webm")], 8)
