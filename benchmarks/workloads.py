"""Workload mixes, defined in YAML files (``benchmarks/workloads/*.yaml``), turned into requests.

A workload is one or more weighted *components* (a request shape: prompt words, output tokens,
images per request and their sizes, audio clips and their lengths). ``generate_requests(spec, n,
seed)`` draws ``n`` requests from it:

* **reproducible**: the same spec, ``n`` and seed give byte-identical requests (the media bytes
  are pure functions of their seeds, ``models/media_samples.py``; ``BenchRequest.digest``);
* **no accidental cache hits**: every media item gets its own seed, so an encoder cache only
  hits when the workload asks for repeats (``media_pool_size``: items drawn from that many
  distinct ones). Runs meant to miss the cache against the same server use different seeds.

Output lengths are exact by default (``ignore_eos``): random-weight models stop at random.

    spec = load_workload("multi_image")              # or a path to a YAML file
    requests = generate_requests(spec, 100, seed=0)   # list[BenchRequest]
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

WORKLOAD_DIR = Path(__file__).parent / "workloads"

# Prompt words: plain English, so any tokenizer splits them into a few tokens each.
_WORDS = tuple("""
the a of to and in is it you that he was for on are with as his they be at one have this from or had
by word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
""".split())
_QUESTIONS = ("Describe what you see.", "What is shown here?", "Summarize the content.",
              "Answer briefly.", "Explain in detail.", "List the main points.")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(name: str, value: tuple, low: float = 0) -> None:
    if not low <= value[0] <= value[1]:
        raise ValueError(f"{name}: need {low} <= min <= max, got {list(value)}")


class ComponentSpec(_Closed):
    """One request shape of a workload. Ranges are [min, max], inclusive, drawn uniformly."""

    name: str = Field(min_length=1, description="label of the requests of this shape in results")
    weight: float = Field(1.0, gt=0, description="relative share of the requests")
    prompt_words: tuple[int, int] = Field((8, 32), description="words of text in the prompt")
    output_tokens: tuple[int, int] = Field((64, 256), description="max_tokens (exact with ignore_eos)")
    images: tuple[int, int] = Field((0, 0), description="images per request")
    image_sizes: tuple[tuple[int, int], ...] = Field(
        ((256, 192),), min_length=1, description="(width, height) choices, one drawn per image")
    audios: tuple[int, int] = Field((0, 0), description="audio clips per request")
    audio_seconds: tuple[float, float] = Field((1.0, 4.0), description="length of each clip, seconds")

    @model_validator(mode="after")
    def _check(self) -> "ComponentSpec":
        _check_range("prompt_words", self.prompt_words, 1)
        _check_range("output_tokens", self.output_tokens, 1)
        _check_range("images", self.images)
        _check_range("audios", self.audios)
        _check_range("audio_seconds", self.audio_seconds, 0.1)
        for w, h in self.image_sizes:
            if not (16 <= w <= 4096 and 16 <= h <= 4096):
                raise ValueError(f"image size {w}x{h} out of [16, 4096]")
        return self


class WorkloadSpec(_Closed):
    """A workload file: a name, what it stands for, and its components."""

    name: str = Field(min_length=1)
    description: str = ""
    components: tuple[ComponentSpec, ...] = Field(min_length=1)
    media_pool_size: int = Field(
        0, ge=0, description="0: every media item is new; N: items are drawn from N distinct ones (cache hits)")
    ignore_eos: bool = Field(True, description="generate exactly max_tokens (random-weight models stop at random)")
    temperature: float = Field(0.0, ge=0, description="0: greedy")

    @property
    def modality(self) -> str:
        """What the served model must accept: "text", "image", "audio" (or "image+audio")."""
        has_image = any(c.images[1] > 0 for c in self.components)
        has_audio = any(c.audios[1] > 0 for c in self.components)
        return "+".join(m for m, on in (("image", has_image), ("audio", has_audio)) if on) or "text"


@dataclass(frozen=True)
class MediaItem:
    kind: str  # "image" | "audio"
    mime_type: str  # "image/png" | "audio/wav"
    data: bytes  # encoded file bytes, as a client sends them
    seed: int  # make_test_image / make_test_audio seed: same seed (and size), same bytes


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: a user turn (media parts first, then the text) and sampling."""

    index: int  # position in the workload's request list
    component: str  # ComponentSpec.name
    text: str
    media: tuple[MediaItem, ...]
    max_tokens: int
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int | None = None  # sampling seed (only matters with temperature > 0)

    @property
    def num_images(self) -> int:
        return sum(m.kind == "image" for m in self.media)

    @property
    def num_audios(self) -> int:
        return sum(m.kind == "audio" for m in self.media)

    def digest(self) -> str:
        """sha256 of everything a client sends for this request (text, sampling, media bytes)."""
        h = hashlib.sha256(json.dumps([self.index, self.component, self.text, self.max_tokens, self.ignore_eos,
                                       self.temperature, self.seed], sort_keys=True).encode())
        for m in self.media:
            h.update(m.kind.encode() + b"\0" + m.mime_type.encode() + b"\0")
            h.update(hashlib.sha256(m.data).digest())
        return h.hexdigest()


def load_workload(name_or_path: str | Path) -> WorkloadSpec:
    """A workload by name (``benchmarks/workloads/<name>.yaml``) or by path; ValueError if invalid."""
    path = Path(name_or_path)
    if not path.suffix:
        path = WORKLOAD_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"no workload {str(name_or_path)!r}; known: {', '.join(list_workloads())}")
    try:
        return WorkloadSpec.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: invalid workload: {exc}") from None


def list_workloads() -> list[str]:
    return sorted(p.stem for p in WORKLOAD_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=512)
def _image(seed: int, size: tuple[int, int]) -> bytes:
    from models.media_samples import make_test_image

    return make_test_image(seed, size)


@functools.lru_cache(maxsize=256)
def _audio(seed: int, seconds: float) -> bytes:
    from models.media_samples import make_test_audio

    return make_test_audio(seed, seconds)


def _rng(seed: int, name: str, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *stream])


def _uniform_int(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def generate_requests(spec: WorkloadSpec, num_requests: int, seed: int = 0) -> list[BenchRequest]:
    """``num_requests`` requests of ``spec``; a pure function of its arguments."""
    rng = _rng(seed, spec.name)
    weights = np.array([c.weight for c in spec.components], dtype=np.float64)
    weights /= weights.sum()
    # Repeats: a fixed pool of (seed, size) per kind, drawn from its own stream.
    pool_rng = _rng(seed, spec.name, 1)
    image_pool = [(int(pool_rng.integers(2**31)), spec.components[0].image_sizes[0])
                  for _ in range(spec.media_pool_size)]
    audio_pool = [(int(pool_rng.integers(2**31)), float(spec.components[0].audio_seconds[0]))
                  for _ in range(spec.media_pool_size)]
    out = []
    for index in range(num_requests):
        comp = spec.components[int(rng.choice(len(weights), p=weights))]
        num_words = _uniform_int(rng, comp.prompt_words)
        words = [_WORDS[int(i)] for i in rng.integers(len(_WORDS), size=num_words)]
        text = " ".join(words).capitalize() + ". " + _QUESTIONS[int(rng.integers(len(_QUESTIONS)))]
        media: list[MediaItem] = []
        for _ in range(_uniform_int(rng, comp.images)):
            size = tuple(comp.image_sizes[int(rng.integers(len(comp.image_sizes)))])
            media_seed = int(rng.integers(2**31))
            if image_pool:
                media_seed, size = image_pool[int(rng.integers(len(image_pool)))]
            media.append(MediaItem("image", "image/png", _image(media_seed, tuple(size)), media_seed))
        for _ in range(_uniform_int(rng, comp.audios)):
            seconds = round(float(rng.uniform(*comp.audio_seconds)), 2)
            media_seed = int(rng.integers(2**31))
            if audio_pool:
                media_seed, seconds = audio_pool[int(rng.integers(len(audio_pool)))]
            media.append(MediaItem("audio", "audio/wav", _audio(media_seed, seconds), media_seed))
        out.append(BenchRequest(index=index, component=comp.name, text=text, media=tuple(media),
                                max_tokens=_uniform_int(rng, comp.output_tokens), ignore_eos=spec.ignore_eos,
                                temperature=spec.temperature, seed=int(rng.integers(2**31))))
    return out


def with_repeated_media(requests: list[BenchRequest]) -> list[BenchRequest]:
    """Pairs for the encoder-cache comparison: each request (a miss: new media) followed by a copy
    with the same media bytes but different text (a hit only if the encoder cache works; the text
    differs, so a prefix cache can serve only the KV before it: the image's, as the chat template
    puts media first)."""
    out = []
    for req in requests:
        out.append(BenchRequest(len(out), "miss", req.text, req.media, req.max_tokens, req.ignore_eos,
                                req.temperature, req.seed))
        out.append(BenchRequest(len(out), "hit", "Once more: " + req.text, req.media, req.max_tokens,
                                req.ignore_eos, req.temperature, req.seed))
    return out


def workload_digest(requests: list[BenchRequest]) -> str:
    """One sha256 over a request list (to record what a run sent)."""
    h = hashlib.sha256()
    for req in requests:
        h.update(req.digest().encode())
    return h.hexdigest()
