"""Multimodal input processing: media decoding, preprocessing, and the token plan.

Two halves, used by different processes of the cluster:

* **Router side** (cheap, no tensors): ``decode_media`` checks and decodes client bytes (the
  header first: image format, pixel cap and aspect ratio; audio sample rate, channels and length;
  then the data), ``num_media_tokens`` says how many placeholder tokens each
  item becomes, and ``build_token_plan`` tokenizes the prompt and expands every placeholder to
  that many tokens, exactly as the Hugging Face processor does (``<image>`` x N; ``<|AUDIO|>`` x
  tokens-of-this-clip). A test checks our ids equal the HF processor's.
* **Encoder side**: ``preprocess`` turns decoded media into the tower's input tensors with the
  model's own HF image / video processor or feature extractor.

Modalities: ``image`` (LLaVA, Qwen-VL), ``video`` (Qwen-VL: frames sampled as its video processor
does, ``models/video.py``), ``audio`` (Qwen2-Audio).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from cluster.request_types import MODALITIES, MediaInput
from models.encoders import AudioEncoder
from models.model import QWEN_VL_ARCHITECTURES
from models.mrope import MRopeSpec, mrope_positions
from models.video import SampledVideo, VideoError, VideoLimits, decode_video


class MediaError(ValueError):
    """Media a client sent is unusable (corrupt, too large, wrong kind); INVALID_ARGUMENT."""


# What client bytes may reach. Images: only these PIL decoders (not every plugin PIL has, e.g. EPS
# runs Ghostscript). Audio: whatever libsndfile reads (WAV, FLAC, OGG, MP3), within these bounds,
# mixed down to mono and resampled to the feature extractor's rate.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
AUDIO_SAMPLE_RATES = (8_000, 192_000)  # Hz, inclusive: telephone .. studio
MAX_AUDIO_CHANNELS = 8  # 7.1 surround


@dataclass(frozen=True)
class MediaLimits:
    max_media_per_request: int = 8
    max_media_bytes: int = 20 * 1024 * 1024  # per item, encoded
    max_image_pixels: int = 4096 * 4096  # decompression-bomb guard, checked before decoding
    max_audio_seconds: float = 30.0  # Qwen2-Audio's encoder window
    # long side / short side, checked before decoding: a shortest-edge resize (CLIP) of a 1x5000
    # image would make a 224x1120000 one
    max_image_aspect_ratio: float = 200.0
    max_video_seconds: float = 600.0  # from the container header, before decoding
    max_video_frames: int = 768  # frames the model sees after sampling (Qwen2-VL's max_frames)
    max_video_pixels: int = 2**28  # width x height x sampled frames: the decoded frames' memory
    max_media_tokens: int = 0  # placeholder tokens of all media of one request; 0: the context bounds them

    def video(self) -> VideoLimits:
        return VideoLimits(self.max_video_seconds, self.max_image_pixels, self.max_image_aspect_ratio,
                           self.max_video_frames, self.max_video_pixels)


# architecture -> the media it takes (the first names the model's placeholder in messages)
_ARCH_MODALITIES = {"LlavaForConditionalGeneration": ("image",),
                    "Qwen2VLForConditionalGeneration": ("image", "video"),
                    "Qwen2_5_VLForConditionalGeneration": ("image", "video"),
                    "Qwen3VLForConditionalGeneration": ("image", "video"),
                    "Qwen2AudioForConditionalGeneration": ("audio",)}


@dataclass
class DecodedMedia:
    modality: str  # "image" | "video" | "audio"
    content_hash: str  # hash of the bytes + preprocessing parameters: the encoder-cache key
    image: Image.Image | None = None
    audio: np.ndarray | None = None  # float32 mono at the feature extractor's sampling rate
    video: SampledVideo | None = None  # the sampled RGB frames
    num_tokens: int = 0
    grid_thw: tuple[int, int, int] | None = None  # Qwen-VL: patch grid after the smart resize


# Where one media item's embedding rows go in the prompt: (first token index, tokens) runs, the
# rows consumed in order. One run per item, except a Qwen3-VL video: one per temporal patch, each
# run preceded by its timestamp text ("<1.3 seconds>") and wrapped in vision start/end tokens.
MediaRuns = tuple[tuple[int, int], ...]


@dataclass
class TokenPlan:
    """The prompt as the LM sees it: placeholders expanded to one token per media embedding."""

    prompt_token_ids: list[int]
    media_runs: list[MediaRuns] = field(default_factory=list)  # per item, in prompt order
    # M-RoPE models (models/mrope.py): [3, len(prompt)] positions and the delta of every later
    # token (position = index + delta); None / 0 for the others
    mrope_positions: torch.Tensor | None = None
    position_delta: int = 0

    @property
    def media_offsets(self) -> list[int]:
        """First placeholder index per item."""
        return [runs[0][0] for runs in self.media_runs]

    @property
    def media_lengths(self) -> list[int]:
        """Placeholder tokens per item (its embedding rows; timestamp text not counted)."""
        return [sum(n for _, n in runs) for runs in self.media_runs]


class MultimodalProcessor:
    def __init__(self, model_dir: str | Path, config):
        self.config = config
        arch = (getattr(config, "architectures", None) or [""])[0]
        self.modalities: tuple[str, ...] = _ARCH_MODALITIES.get(arch, ())
        self.modality = self.modalities[0] if self.modalities else None  # the model's first
        self.mrope = MRopeSpec.from_config(config) if arch in QWEN_VL_ARCHITECTURES else None
        self.hf_processor = self.image_processor = self.video_processor = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.modality is None:
                self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            else:
                self.hf_processor = AutoProcessor.from_pretrained(model_dir)
                self.tokenizer = self.hf_processor.tokenizer
                self.image_processor = getattr(self.hf_processor, "image_processor", None)
                self.video_processor = getattr(self.hf_processor, "video_processor", None)
        # modality -> (placeholder token, its id): one per item in the prompt, expanded by the plan
        token_ids = {"image": "image_token_id", "video": "video_token_id", "audio": "audio_token_id"}
        self.placeholders: dict[str, tuple[str, int]] = {
            m: (getattr(self.hf_processor, f"{m}_token"), getattr(config, token_ids[m])) for m in self.modalities}
        self.placeholder, self.placeholder_id = self.placeholders.get(self.modality, (None, None))
        # sampling rate of video frames (frames per second the model sees): the processor's, else 2
        self.video_fps = float(getattr(self.video_processor, "fps", None) or 2.0)
        self._preprocess_key = self._preprocessing_fingerprint()
        # Ids chat text can never make (InputPreparer.render_chat): the special tokens (BOS/EOS, chat
        # markers) and the media placeholders.
        added = self.tokenizer.added_tokens_decoder.values()
        special = {t.content for t in added if t.special} | set(self.tokenizer.all_special_tokens)
        self.control_token_ids = frozenset(self.tokenizer.convert_tokens_to_ids(sorted(special))) | {
            pid for _, pid in self.placeholders.values()}
        # what tokenizing a raw prompt adds around its text (a BOS, ...): chat prompts get the same
        with_specials = self.tokenizer("a")["input_ids"]
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        i = next(i for i in range(len(with_specials) - len(bare) + 1) if with_specials[i: i + len(bare)] == bare)
        self._prompt_prefix, self._prompt_suffix = with_specials[:i], with_specials[i + len(bare):]

    # -- router side -------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        """LLaVA: fixed per image (the processor resizes and crops to the tower's input size);
        0 for dynamic-resolution models (``image_grid``)."""
        if self.mrope is not None:
            return 0
        proc = self.hf_processor
        size = self.config.vision_config.image_size
        n = (size // proc.patch_size) ** 2 + proc.num_additional_image_tokens
        return n - 1 if proc.vision_feature_select_strategy == "default" else n

    @property
    def sampling_rate(self) -> int:
        return self.hf_processor.feature_extractor.sampling_rate

    def decode_media(self, item: MediaInput, limits: MediaLimits) -> DecodedMedia:
        if not item.data:
            raise MediaError("the data is empty (0 bytes)")
        if len(item.data) > limits.max_media_bytes:
            raise MediaError(f"the data is {len(item.data)} bytes; the limit is {limits.max_media_bytes}")
        if item.mime_type and not item.mime_type.startswith(tuple(m + "/" for m in MODALITIES)):
            raise MediaError(f"mime type {item.mime_type[:64]!r} is not image/*, video/* or audio/*")
        modality = item.modality
        if modality not in self.modalities:
            what = " and ".join(self.modalities) or "text only"
            raise MediaError(f"this model does not accept {modality} input (it takes {what})")
        digest = hashlib.blake2b(item.data, digest_size=16, key=self._preprocess_key).hexdigest()
        if modality == "image":
            image = _decode_image(item.data, limits)
            if self.mrope is None:
                return DecodedMedia("image", digest, image=image, num_tokens=self.tokens_per_image)
            grid = self.image_grid(image.height, image.width)
            return DecodedMedia("image", digest, image=image, grid_thw=grid, num_tokens=self._grid_tokens(grid))
        if modality == "video":
            try:
                video = decode_video(item.data, limits.video(), self._sample_frames)
            except VideoError as exc:
                raise MediaError(str(exc)) from None
            _, height, width, _ = video.frames.shape
            grid = self.video_grid(len(video.indices), height, width)
            return DecodedMedia("video", digest, video=video, grid_thw=grid, num_tokens=self._grid_tokens(grid))
        audio = _decode_audio(item.data, self.sampling_rate, limits.max_audio_seconds)
        num_tokens = self.audio_tokens(len(audio))
        if num_tokens < 1:  # the placeholder would expand to nothing: the model would not hear it
            ms = 1000 / self.sampling_rate
            raise MediaError(f"audio is {len(audio) * ms:.1f} ms long, too short to give the audio encoder any "
                             f"output; send at least {math.ceil(self.min_audio_samples * ms)} ms")
        return DecodedMedia("audio", digest, audio=audio, num_tokens=num_tokens)

    def _grid_tokens(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.mrope.spatial_merge_size ** 2

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """Qwen-VL: the (t, h, w) patch grid of a ``height`` x ``width`` image, as the image
        processor resizes it (``smart_resize``: multiples of patch x merge, pixels within
        min/max)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.image_processor
        h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size,
                            min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        return 1, h // ip.patch_size, w // ip.patch_size

    def video_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Qwen-VL: the (t, h, w) patch grid of ``num_frames`` sampled frames of ``height`` x
        ``width``, as the video processor resizes them (its ``resize``: ``smart_resize``, the
        per-frame pixel cap where ``cap_pixels_per_frame`` is set) and pads time to whole patches.
        Qwen3-VL's resize bounds the pixels of all frames together and needs a whole temporal patch."""
        vp = self.video_processor
        factor, tps = vp.patch_size * vp.merge_size, vp.temporal_patch_size
        min_pixels, max_pixels = vp.size["shortest_edge"], vp.size["longest_edge"]
        if self.mrope.frame_runs:  # Qwen3VLVideoProcessor
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as resize_video

            if num_frames < tps:
                raise MediaError(f"video has {num_frames} frame(s) to sample; this model needs at least {tps}")
            if vp.cap_pixels_per_frame:
                per_frame = max(min(vp.max_video_tokens * factor * factor, max_pixels // num_frames),
                                int(min_pixels * 1.05))
                max_pixels = per_frame * num_frames
            h, w = resize_video(num_frames, height, width, temporal_factor=tps, factor=factor,
                                min_pixels=min_pixels, max_pixels=max_pixels)
        else:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

            if vp.cap_pixels_per_frame:
                total_pixels = int(vp.max_video_tokens * factor * factor * 0.9)
                max_pixels = max(min(max_pixels, total_pixels * tps // num_frames), int(min_pixels * 1.05))
            h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return -(-num_frames // tps), h // vp.patch_size, w // vp.patch_size

    def seconds_per_grid(self, item: DecodedMedia) -> float | None:
        """A video's seconds per temporal patch (Qwen2.5-VL's ``second_per_grid_ts``:
        ``temporal_patch_size / sampled fps``); None for other media."""
        if item.video is None:
            return None
        return self.video_processor.temporal_patch_size / item.video.sampled_fps

    def _sample_frames(self, total_frames: int, fps: float) -> list[int]:
        """Indices of the frames the model sees: the video processor's own ``sample_frames`` at
        ``video_fps``, the source's frame count and rate as transformers' PyAV loader reads them."""
        from transformers.video_utils import VideoMetadata

        meta = VideoMetadata(total_num_frames=total_frames, fps=fps, duration=total_frames / fps)
        return self.video_processor.sample_frames(meta, fps=self.video_fps).tolist()

    @property
    def min_audio_samples(self) -> int:
        """The shortest clip (samples at ``sampling_rate``) that gives at least one audio token."""
        hop = self.hf_processor.feature_extractor.hop_length
        frames = next((f for f in range(1, 64) if self.audio_tokens(f * hop) >= 1), 1)
        return (frames - 1) * hop + 1

    def audio_tokens(self, num_samples: int) -> int:
        fe = self.hf_processor.feature_extractor
        frames = min(math.ceil(num_samples / fe.hop_length), fe.nb_max_frames)
        return int(AudioEncoder.output_lengths(torch.tensor(frames))[1])

    @property
    def chat_template(self) -> str | None:
        """The model folder's chat template, if it has one."""
        return getattr(self.hf_processor or self.tokenizer, "chat_template", None) or None

    def tokenize_chat(self, messages: list[dict], template: str, **kwargs) -> list[int]:
        """Token ids of ``messages`` rendered by ``template`` with the generation prompt, control
        tokens inside the messages and ``kwargs`` encoded as text (transformers'
        ``sanitize_control_tokens``), framed as a raw prompt's tokenization frames its text."""
        ids = self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False, sanitize_control_tokens=True,
                                                 **kwargs)
        return self._prompt_prefix + list(ids) + self._prompt_suffix

    def apply_chat_template(self, messages: list[dict], template: str | None = None, **kwargs) -> str:
        """``messages`` rendered by ``template`` (default: the folder's), with the generation prompt;
        ``kwargs`` reach the template as variables (``chat_template_kwargs``)."""
        target = self.hf_processor or self.tokenizer
        return target.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                          tokenize=False, **kwargs)

    def build_token_plan(self, prompt: str | list[int], media: list[DecodedMedia]) -> TokenPlan:
        """``prompt``: raw text (tokenized here, its placeholders parsed) or token ids."""
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not self.placeholders:
            if media:
                raise MediaError("this model is text-only; remove the media items")
            return TokenPlan(ids)
        kind_of = {pid: m for m, (_, pid) in self.placeholders.items()}
        found = [(i, kind_of[t]) for i, t in enumerate(ids) if t in kind_of]
        if len(found) != len(media):
            names = " / ".join(tok for tok, _ in self.placeholders.values())
            raise MediaError(
                f"the prompt has {len(found)} {names} placeholder(s) but "
                f"{len(media)} media item(s) were sent; use one placeholder per item, in order"
            )
        plan = TokenPlan([])
        prev = 0
        for n, ((pos, kind), item) in enumerate(zip(found, media)):
            if kind != item.modality:
                raise MediaError(f"placeholder {n} of the prompt is {self.placeholders[kind][0]} ({kind}) but "
                                 f"media item {n} is {item.modality}; send the media in placeholder order")
            plan.prompt_token_ids.extend(ids[prev:pos])
            plan.media_runs.append(self._expand(item, ids[pos], plan.prompt_token_ids))
            prev = pos + 1
        plan.prompt_token_ids.extend(ids[prev:])
        if self.mrope is not None and media:
            plan.mrope_positions, plan.position_delta = mrope_positions(
                self.mrope, plan.prompt_token_ids, [m.grid_thw for m in media],
                [self.seconds_per_grid(m) for m in media])
        return plan

    def _expand(self, item: DecodedMedia, placeholder_id: int, out: list[int]) -> MediaRuns:
        """Append ``item``'s tokens to ``out`` in place of its placeholder; returns its runs. A
        Qwen3-VL video: per temporal patch, its timestamp text then vision start, the patch's
        placeholders, vision end (Qwen3VLProcessor.replace_video_token)."""
        if item.video is None or not self.mrope.frame_runs:
            out.extend([placeholder_id] * item.num_tokens)
            return ((len(out) - item.num_tokens, item.num_tokens),)
        per_frame = item.num_tokens // item.grid_thw[0]
        video = item.video
        seconds = self.hf_processor._calculate_timestamps(list(video.indices), video.source_fps,
                                                          self.video_processor.temporal_patch_size)
        runs = []
        for t in seconds[: item.grid_thw[0]]:
            out.extend(self.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False))
            out.append(self.hf_processor.vision_start_token_id)
            runs.append((len(out), per_frame))
            out.extend([placeholder_id] * per_frame)
            out.append(self.hf_processor.vision_end_token_id)
        return tuple(runs)

    # -- encoder side ------------------------------------------------------------------------
    def preprocess(self, items: list[DecodedMedia]) -> dict[str, torch.Tensor]:
        """Decoded media of one modality -> the encoder's batched input tensors."""
        modality = items[0].modality
        if modality == "image":
            out = self.image_processor([m.image for m in items], return_tensors="pt")
            if self.mrope is not None:  # [sum of patches, C * temporal_patch * patch^2], [N, 3]
                return {"pixel_values": out["pixel_values"], "grid_thw": out["image_grid_thw"]}
            return {"pixel_values": out["pixel_values"]}  # [N, 3, H, W]
        if modality == "video":  # frames already sampled (decode_media): the processor keeps them all
            out = self.video_processor([m.video.frames for m in items], do_sample_frames=False, return_tensors="pt")
            return {"pixel_values": out["pixel_values_videos"], "grid_thw": out["video_grid_thw"]}
        fe = self.hf_processor.feature_extractor
        out = fe([m.audio for m in items], sampling_rate=fe.sampling_rate, return_attention_mask=True,
                 padding="max_length", return_tensors="pt")
        # input_features [N, num_mel_bins, 3000], feature_attention_mask [N, 3000]
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def _preprocessing_fingerprint(self) -> bytes:
        """Key for content hashes: the same bytes under different preprocessing differ."""
        if self.modality is None:
            return b""
        subs = [self.image_processor, self.video_processor, self.hf_processor.feature_extractor
                if self.modality == "audio" else None]
        blob = json.dumps([sub.to_dict() for sub in subs if sub is not None] + [self.video_fps],
                          sort_keys=True, default=str).encode()
        return hashlib.blake2b(blob, digest_size=32).digest()


# Decoding failures name the exception type only: decoders' messages can hold object addresses.
def _decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            _check_image_header(*img.size, limits)  # header only: nothing decoded yet
            img.load()
            return img.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError:  # PIL's own header check (2x its MAX_IMAGE_PIXELS)
        raise MediaError(f"image is over the limit of {limits.max_image_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"cannot decode image: the bytes are not a {', '.join(IMAGE_FORMATS[:-1])} or "
                         f"{IMAGE_FORMATS[-1]} image") from None
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on client bytes is the client's
        raise MediaError(f"cannot decode image: the data is corrupt or truncated ({type(exc).__name__})") from None


def _check_image_header(width: int, height: int, limits: MediaLimits) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"image is {width}x{height} pixels: it has no pixels")
    if width * height > limits.max_image_pixels:
        raise MediaError(f"image is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels")
    if max(width, height) / min(width, height) > limits.max_image_aspect_ratio:
        raise MediaError(f"image is {width}x{height} pixels, an aspect ratio over the limit of "
                         f"{limits.max_image_aspect_ratio:g}:1; crop or pad it")


def _decode_audio(data: bytes, sampling_rate: int, max_seconds: float) -> np.ndarray:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            _check_audio_header(f.samplerate, f.channels, f.frames, max_seconds)
            # mono block by block: memory follows the samples really there, not the header's claim
            audio = np.concatenate([b.mean(axis=1) for b in f.blocks(65536, dtype="float32", always_2d=True)]
                                   or [np.zeros(0, np.float32)])
            rate = f.samplerate
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on client bytes is the client's
        raise MediaError(f"cannot decode audio: not a WAV, FLAC, OGG or MP3 file, or corrupt "
                         f"({type(exc).__name__})") from None
    if audio.size == 0:
        raise MediaError("audio has no samples")
    if not np.isfinite(audio).all():
        raise MediaError("audio has NaN or infinite samples")
    if rate != sampling_rate:
        import soxr

        audio = soxr.resample(audio, rate, sampling_rate).astype(np.float32)
    return audio


def _check_audio_header(rate: int, channels: int, frames: int, max_seconds: float) -> None:
    low, high = AUDIO_SAMPLE_RATES
    if not low <= rate <= high:
        raise MediaError(f"audio sample rate is {rate} Hz; accepted: {low}..{high} Hz")
    if not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise MediaError(f"audio has {channels} channels; accepted: 1..{MAX_AUDIO_CHANNELS}")
    if frames <= 0:
        raise MediaError("audio has no samples")
    if frames / rate > max_seconds:
        raise MediaError(f"audio is {frames / rate:.1f} s long; the limit is {max_seconds:g} s")
