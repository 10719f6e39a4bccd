"""Prefix caching: media-aware block hashes, and the colocated engine's greedy output with the
cache on equal to the cache off (which ``test_engine_parity.py`` ties to transformers)."""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.block_hash import extend_block_hashes, hash_block
from cluster.engine.colocated import ColocatedEngine
from cluster.engine.request import MediaSlot, Request
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_audio, make_test_image

BLOCK = 16
NUM_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True)


def image(seed: int) -> MediaInput:
    return MediaInput(make_test_image(seed), "image/png")


# -- block hashes ------------------------------------------------------------------------------

def request_with_media(content_hash: str, offset: int = 3, length: int = 40, prompt_len: int = 64) -> Request:
    slot = MediaSlot(offset, torch.zeros(length, 2), content_hash)
    return Request("r", [5] * prompt_len, SamplingParams(), [slot])


def hashes(req: Request) -> list[bytes]:
    extend_block_hashes(req, BLOCK, req.num_tokens)
    return req.block_hashes


def test_block_hashes_tell_images_apart_by_content_hash_only():
    a, a_again, b = hashes(request_with_media("aa")), hashes(request_with_media("aa")), hashes(request_with_media("bb"))
    assert len(a) == 4 and a == a_again  # deterministic: no Python hash(), no per-process salt
    assert all(x != y for x, y in zip(a, b))  # the image starts in block 0: every block differs
    text_only = Request("t", [5] * 64, SamplingParams())
    assert hashes(text_only)[0] != a[0]  # same token ids, but a media item in the block


def test_block_hashes_depend_on_the_whole_prefix_and_where_the_media_sits():
    assert hashes(request_with_media("aa", offset=3)) != hashes(request_with_media("aa", offset=4))
    before = hashes(request_with_media("aa", offset=40, length=8))
    other = hashes(request_with_media("bb", offset=40, length=8))
    assert before[:2] == other[:2] and before[2:] != other[2:]  # blocks 0-1 precede the media
    assert hash_block(b"p", [1, 2], []) != hash_block(b"p", [1, 2, 0], [])  # lengths are part of the hash
    assert hash_block(b"p", [1], [(0, 0, 1, "ab")]) != hash_block(b"p", [1], [(0, 0, 1, "a"), (0, 0, 1, "b")])


def test_media_without_a_content_hash_stops_the_hashes():
    req = request_with_media("", offset=40, length=8)
    assert len(hashes(req)) == 2  # blocks 0-1 only: block 2 holds the unknown media


# -- the engine, prefix caching on vs off ------------------------------------------------------

@pytest.fixture(scope="module")
def engines(tiny_models):
    path = str(tiny_models["llava-clip-llama"])
    on = ColocatedEngine(EngineConfig(model=path, block_size=BLOCK, max_num_batched_tokens=512))
    off = ColocatedEngine(EngineConfig(model=path, block_size=BLOCK, max_num_batched_tokens=512,
                                       enable_prefix_caching=False))
    return on, off


def generate_one(engine: ColocatedEngine, prompt: str, media: list[MediaInput]) -> tuple[list[int], int]:
    """(greedy tokens, prompt tokens this request took from the prefix cache)."""
    hits = engine.scheduler.num_prefix_hit_tokens
    [c] = engine.generate([(prompt, media, GREEDY)])
    return c.token_ids, engine.scheduler.num_prefix_hit_tokens - hits


def image_offset(engine: ColocatedEngine, prompt: str, media) -> tuple[int, int]:
    plan = engine.inputs.prepare("x", prompt, media, GREEDY).plan
    return plan.media_offsets[0], len(plan.prompt_token_ids)


def test_repeated_image_with_other_text_hits_and_is_token_exact(engines):
    on, off = engines
    first = ("USER: <image>\nWhat is in the picture? ASSISTANT:", [image(1)])
    other_text = ("USER: <image>\nDescribe the colours, one by one. ASSISTANT:", [image(1)])
    tokens, hit = generate_one(on, *first)
    assert hit == 0 and tokens == generate_one(off, *first)[0]
    tokens, hit = generate_one(on, *first)  # the same prompt again: all but the last block
    offset, n = image_offset(on, *first)
    assert hit == (n - 1) // BLOCK * BLOCK and tokens == generate_one(off, *first)[0]
    tokens, hit = generate_one(on, *other_text)  # same image, other text: the blocks up to the text
    offset, n = image_offset(on, *other_text)
    assert hit == (offset + 256) // BLOCK * BLOCK  # ends inside the image: the rest is spliced from there
    assert tokens == generate_one(off, *other_text)[0]
    assert on.kv_blocks_in_use == 0 and on.blocks.num_free_blocks == on.blocks.num_blocks
    assert on.blocks.num_cached_blocks > 0


def test_another_image_with_the_same_text_hits_only_the_text_before_it(engines):
    on, off = engines
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    generate_one(on, prompt, [image(11)])
    tokens, hit = generate_one(on, prompt, [image(12)])
    offset, _ = image_offset(on, prompt, [image(12)])
    assert hit <= offset  # nothing of the image (nor after it) came from image 11's blocks
    assert tokens == generate_one(off, prompt, [image(12)])[0]
    # A long text prefix before the image is shared; the image is not.
    long_prompt = "SYSTEM: " + "You are a careful assistant. " * 8 + "USER: <image>\nWhat is it? ASSISTANT:"
    generate_one(on, long_prompt, [image(13)])
    tokens, hit = generate_one(on, long_prompt, [image(14)])
    offset, _ = image_offset(on, long_prompt, [image(14)])
    assert hit == offset // BLOCK * BLOCK and hit >= BLOCK
    assert tokens == generate_one(off, long_prompt, [image(14)])[0]


def test_batched_requests_sharing_a_prefix_are_token_exact(engines):
    """Same image, several texts, all in one continuous batch after a first request: chunked
    prefills start mid-image on shared blocks while the others decode."""
    on, off = engines
    texts = ["What is it?", "Name three colours in it.", "Is it day or night? Say why.", "Count the shapes."]
    requests = [(f"USER: <image>\n{t} ASSISTANT:", [image(21)], GREEDY) for t in texts]
    expected = [c.token_ids for c in off.generate(requests)]
    on.generate(requests[:1])
    hits = on.scheduler.num_prefix_hit_tokens
    assert [c.token_ids for c in on.generate(requests)] == expected
    assert on.scheduler.num_prefix_hit_tokens - hits >= 256 * len(requests)
    assert on.kv_blocks_in_use == 0


def test_audio_prefix_hits_are_token_exact(tiny_models):
    path = str(tiny_models["qwen2-audio"])
    on = ColocatedEngine(EngineConfig(model=path, block_size=BLOCK))
    off = ColocatedEngine(EngineConfig(model=path, block_size=BLOCK, enable_prefix_caching=False))
    clip = [MediaInput(make_test_audio(3, 1.5), "audio/wav")]
    prompts = ["Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat do you hear?",
               "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nIs it music or speech?"]
    for prompt in prompts:
        assert generate_one(on, prompt, clip)[0] == generate_one(off, prompt, clip)[0]
    assert on.scheduler.num_prefix_hit_tokens > 0
