"""Reference outputs from ``transformers`` and the standard prompt cases, shared by test files."""

from __future__ import annotations

import io
import warnings

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from models.media_samples import make_test_audio, make_test_image, make_test_video
from cluster.request_types import MediaInput

IMAGE_PROMPTS = {
    "text": ("The capital of France is a city where", 0),
    "one-image": ("USER: <image>\nWhat is in this picture? ASSISTANT:", 1),
    "two-images": ("<image> and <image>: compare the two.", 2),
}
AUDIO_PROMPTS = {
    "text": ("The capital of France is a city where", 0),
    "audio": ("<|audio_bos|><|AUDIO|><|audio_eos|>What do you hear?", 1),
    "two-audio": ("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nCompare.", 2),
}
QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VL_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
QWEN_VL_PROMPTS = {
    "text": ("The capital of France is a city where", []),
    "one-image": (f"<|im_start|>user\n{QWEN_VL_IMAGE}What is in this picture?<|im_end|>\n<|im_start|>assistant\n",
                  [("image", (256, 192))]),
    # different sizes and aspect ratios: different grids, so different token counts and positions
    "two-images": (f"{QWEN_VL_IMAGE} and {QWEN_VL_IMAGE}: compare the two.",
                   [("image", (224, 224)), ("image", (330, 150))]),
    # 9 frames at 3 fps, sampled at 2: 6 frames, 3 temporal patches
    "one-video": (f"<|im_start|>user\n{QWEN_VL_VIDEO}What happens?<|im_end|>\n<|im_start|>assistant\n",
                  [("video", ((112, 84), 9, 3, "mp4"))]),
    "image-and-video": (f"{QWEN_VL_IMAGE} then {QWEN_VL_VIDEO}: what moved?",
                        [("image", (150, 330)), ("video", ((96, 128), 8, 2, "webm"))]),
}


def _qwen_vl_media(seed: int, kind: str, spec) -> MediaInput:
    if kind == "image":
        return MediaInput(make_test_image(seed, spec), "image/png")
    size, frames, fps, container = spec
    return MediaInput(make_test_video(seed, size, frames, fps, container), f"video/{container}")


def prompt_cases(arch: str) -> dict[str, tuple[str, list[MediaInput]]]:
    """name -> (prompt with placeholders, media items) for an architecture."""
    if arch in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        return {name: (p, [_qwen_vl_media(i + 1, kind, spec) for i, (kind, spec) in enumerate(items)])
                for name, (p, items) in QWEN_VL_PROMPTS.items()}
    if arch == "qwen2-audio":
        return {name: (p, [MediaInput(make_test_audio(i + 1, 1.0 + i), "audio/wav") for i in range(n)])
                for name, (p, n) in AUDIO_PROMPTS.items()}
    return {name: (p, [MediaInput(make_test_image(i + 1), "image/png") for i in range(n)])
            for name, (p, n) in IMAGE_PROMPTS.items()}


class HFReference:
    """``transformers`` model + processor of a checkpoint, for greedy references."""

    def __init__(self, path):
        from transformers import AutoConfig, AutoProcessor

        from models.tiny import reference_model_class

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.processor = AutoProcessor.from_pretrained(path)
        cls = reference_model_class(AutoConfig.from_pretrained(path).model_type)
        self.model = cls.from_pretrained(path, dtype=torch.float32).eval()

    def inputs(self, prompt: str, media: list[MediaInput]):
        """The processor's inputs: images as PIL, audio as samples, videos as every frame that
        transformers' own PyAV loader reads, with its metadata (the processor samples them)."""
        kwargs = {}
        images = [Image.open(io.BytesIO(m.data)).convert("RGB") for m in media if m.modality == "image"]
        videos = [_load_video(m.data) for m in media if m.modality == "video"]
        audio = [sf.read(io.BytesIO(m.data), dtype="float32")[0] for m in media if m.modality == "audio"]
        if images:
            kwargs["images"] = images
        if videos:  # sampled by the processor itself, at the rate Tessera samples (its fps, else 2)
            kwargs["videos"] = [frames for frames, _ in videos]
            kwargs["video_metadata"] = [meta for _, meta in videos]
            kwargs["do_sample_frames"] = True
            kwargs["fps"] = self.processor.video_processor.fps or 2.0
        if audio:
            kwargs["audio"], kwargs["sampling_rate"] = audio, 16000
        return self.processor(text=prompt, return_tensors="pt", **kwargs)

    @torch.no_grad()
    def greedy(self, prompt: str, media: list[MediaInput], max_new_tokens: int) -> list[int]:
        inputs = self.inputs(prompt, media)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    @torch.no_grad()
    def greedy_with(self, prompt: str, media: list[MediaInput], max_new_tokens: int, **generate_kwargs) -> list[int]:
        """Greedy ``generate`` with extra logits processors' kwargs (repetition_penalty, ...)."""
        inputs = self.inputs(prompt, media)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **generate_kwargs)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    @torch.no_grad()
    def prefill_logits(self, prompt: str, media: list[MediaInput]) -> torch.Tensor:
        return self.model(**self.inputs(prompt, media)).logits[0, -1].float()


def _load_video(data: bytes):
    """(all frames [T, H, W, 3], VideoMetadata): by ``transformers.video_utils.load_video`` where
    the container stores a frame count (MP4); Matroska/WebM store none, which that loader cannot
    handle, so there every frame is decoded here with PyAV, the metadata as that loader builds it."""
    import tempfile

    import av
    from transformers.video_utils import VideoMetadata, load_video

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if not stream.frames:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
            fps = float(stream.average_rate)
            return frames, VideoMetadata(total_num_frames=len(frames), fps=fps, duration=len(frames) / fps,
                                         video_backend="pyav", height=stream.height, width=stream.width)
    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        return load_video(f.name, backend="pyav")


def first_audio(data: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype="float32")[0]
