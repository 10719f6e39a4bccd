"""Tiny random-weight checkpoints of the real multimodal architectures Tessera serves.

Tests and the embedded default model need a checkpoint that *is* the real architecture (same
config schema, same weight names, same processor and chat template behaviour) but small enough to
build in a second and run on a laptop CPU, without downloading anything. `build_tiny_model` writes
one into a folder in Hugging Face format, loadable offline with `AutoProcessor`, `AutoTokenizer`
and `LlavaForConditionalGeneration` / `Qwen2AudioForConditionalGeneration`:

    config.json  generation_config.json
    model.safetensors  (or model-0000K-of-0000N.safetensors + model.safetensors.index.json)
    tokenizer.json  tokenizer_config.json  chat_template.jinja
    processor_config.json  preprocessor_config.json

Architectures (`ARCHS`):

- ``llava-clip-llama``   LLaVA-1.5 shape: CLIP ViT (224 px, patch 14, CLS) -> 2-layer GELU MLP
                         projector -> Llama LM (GQA, untied). 256 image tokens per image
                         (layer -2 features, CLS dropped).
- ``llava-siglip-qwen2`` SigLIP ViT (224 px, patch 14, no CLS) -> projector -> Qwen2 LM (qkv
                         bias, tied embeddings). 256 image tokens per image (last layer, all).
- ``qwen2-vl``           Qwen2-VL: ViT with 2-D rotary positions over 14 px patches (2 frames a
                         patch), 2x2 patch merger -> Qwen2 LM with M-RoPE (mrope_section
                         [8, 12, 12] of head_dim 64). Dynamic resolution: an image becomes
                         (h / 28) x (w / 28) tokens after the processor's smart resize.
- ``qwen2.5-vl``         Qwen2.5-VL: the same shape with its tower (RMSNorm, SwiGLU, window
                         attention over 4x4 merged patches, full attention in block 1) and
                         time-aligned M-RoPE for video (2 position ids per second).
- ``qwen3-vl``           Qwen3-VL: 16 px patches, interpolated position table, DeepStack (tower
                         blocks 0 and 1 feed LM layers 0 and 1) -> Qwen3 LM (q/k RMSNorm, no qkv
                         bias) with interleaved M-RoPE ([12, 10, 10] of 32 frequencies); its
                         video processor caps pixels per frame (cap_pixels_per_frame).
- ``qwen2-audio``        Qwen2-Audio: Whisper-style encoder (128 mel bins, 30 s window) -> linear
                         projector -> Qwen2 LM (untied, as Qwen2-Audio-7B). One audio token per
                         40 ms of audio: ((frames - 1) // 2 + 1 - 2) // 2 + 1 with frames = 100/s.

The tokenizer is a byte-level BPE trained here on the small corpus below (so decoding round-trips
any text) with each family's special tokens. Weights are random but deterministic: the same arch
and seed give byte-identical files. They are initialised wider than transformers' default
(`initializer_range`) so greedy decoding is varied and its top-2 logits are well apart: tests
compare our engine with transformers token for token, and near-ties would make that flaky.

`hub_layout=True` writes the weight names of the published Hugging Face hub checkpoints
(``vision_tower.vision_model.*`` ...) instead of what transformers 5 ``save_pretrained`` writes
(``vision_tower.*`` ...; see `_HUB_KEY_PREFIXES`): our loader must accept both, as transformers
does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import models as bpe_models

ARCHS = ("llava-clip-llama", "llava-siglip-qwen2", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen2-audio")
QWEN_VL_ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")

# Bump when the output of build_tiny_model changes: it names the cache folder.
TINY_MODEL_VERSION = "v3"

# Language-model sizes (`build_tiny_model(size=...)`): "tiny" for tests; "100m" for engine
# benchmarks, where a step must move enough weight bytes to be bound by memory bandwidth, as a
# real model's is (98M parameters in the LLaVA build: hidden 1024, 8 layers, 16 q / 4 kv heads).
TEXT_SIZES: dict[str, dict] = {
    "tiny": {},
    "100m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
             "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64},
}

_BPE_VOCAB_SIZE = 1536  # cap incl. 256 byte tokens; the corpus runs out first, at ~1.1k
_INIT_STD = 0.15  # transformers' default 0.02 gives near-flat logits and loops at hidden 256
_QK_NORM_GAIN = 2.5
_FINAL_NORM_GAIN = 3.0  # spreads the logits apart: fewer greedy near-ties
_NEVER_GENERATED_ROW_SCALE = 0.01  # LM-head rows of specials / vocab padding: logits ~0

TINY_MODEL_DIR_ENV = "TESSERA_TINY_MODEL_DIR"  # overrides the cache root of ensure_tiny_model

# A few KB of plain English, written for this file. Byte-level BPE needs no coverage guarantee
# (every byte is in the base vocabulary); the corpus only decides which merges exist.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture shows a small red boat on a calm lake at
sunrise, with mountains in the background and a few clouds in the sky. The water is still and
reflects the light. Describe the image in one sentence. What do you see in this picture? There is
a cat sitting on a wooden table next to a cup of coffee and an open book.

Listen to the audio and tell me what you hear. The sound is a dog barking in the distance, then a
car passes by on a wet road. Someone is speaking in a quiet voice; they say hello and ask about
the weather. The recording is about two seconds long and the music starts near the end.

The user asked the assistant a question, and the assistant answered with a short, helpful reply.
USER: What is the capital of France? ASSISTANT: The capital of France is Paris.
USER: How many legs does a spider have? ASSISTANT: A spider has eight legs.
You are a helpful assistant. Please answer the question below as clearly as you can.

A serving system receives requests from many clients at the same time. Each request carries a
prompt, some images or audio clips, and the parameters for sampling. The router checks every
request, turns the text into tokens, and sends the media to an encoder. The encoder turns each
image into a sequence of embeddings. The prefill worker runs the language model over the whole
prompt and writes the key and value cache. The decode worker then generates one token at a time
until it reaches the end of the answer or the maximum number of tokens.

Numbers and dates appear in text as well: 1, 2, 3, 4, 5, 10, 16, 32, 64, 100, 256, 1024, 2024.
On Monday, March 3rd, the team met at 9:30 in the morning to plan the next release. They wrote
down three goals: make the system faster, make it simpler, and make it easier to test. The first
goal was measured in milliseconds per token, the second in lines of code, and the third in the
time it takes to run the tests on a single laptop.

In the garden there are apple trees, green grass, yellow flowers and a narrow stone path. Birds
sing in the morning and the children play outside in the afternoon. In the evening the family
eats dinner together and talks about the day. Later, they read stories, look at photographs from
old trips, and listen to songs on the radio before going to sleep.

The model looks at the image and writes a caption. A person in a blue jacket is riding a bicycle
down a busy street. Two people are walking a dog in the park. A plate of food with rice,
vegetables and chicken sits on a white table. A train is waiting at the station while passengers
get on and off. The photo was taken at night, so the colors are dark and the street lights glow.

Scientists study the world by asking questions, making careful observations and testing ideas
with experiments. Water boils at one hundred degrees Celsius at sea level. The earth moves around
the sun once every year, and the moon moves around the earth about once every month. Light
travels very fast, but sound travels much more slowly, which is why thunder follows lightning.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

"Where are you going?" she asked. "To the market," he said, "to buy bread, milk and eggs."
It's a long way, isn't it? Yes, but the weather is nice, and walking is good for you!
"""

# Chat templates, written to match their families' published ones (content may be a string or a
# list of {"type": "text" | "image" | "audio"} parts).
# LLaVA-1.5 (llava-hf): "USER: <image>\n<text> ASSISTANT:"; the BOS comes from the tokenizer.
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# ChatML (Qwen2 / LLaVA-OneVision-Qwen2 style); images in place as "<image>".
_CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-VL-Instruct's template: each image part is "<|vision_start|><|image_pad|><|vision_end|>"
# (the processor expands <|image_pad|> to the image's token count).
_QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-Audio-7B-Instruct's template: each audio part becomes "Audio N: <|audio_bos|><|AUDIO|>
# <|audio_eos|>\n" (the processor then expands <|AUDIO|> to the clip's token count).
_QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{{ 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, spaces).
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _train_bpe(*, leading_specials: list[str], qwen_style: bool) -> Tokenizer:
    """Byte-level BPE trained on `_CORPUS`. `leading_specials` take ids 0.. (Llama puts <unk>,
    <s>, </s> first); family specials that real vocabularies put at the end are added later."""
    tok = Tokenizer(bpe_models.BPE())
    if qwen_style:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,  # a few KB of text: let single-occurrence pairs merge too
        special_tokens=leading_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _build_tokenizer(arch: str):
    """The arch's tokenizer, special tokens at the positions its family uses.

    Llama (llava-1.5-hf):  <unk>=0 <s>=1 </s>=2, BPE ..., <image>, <pad> last; BOS prepended.
    Qwen2:                 BPE ..., <|endoftext|> <|im_start|> <|im_end|>, then the media tokens
                           (<image>, or <|AUDIO|> <|audio_bos|> <|audio_eos|> as Qwen2-Audio).
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    def special(content: str) -> AddedToken:
        return AddedToken(content, special=True, normalized=False)

    if arch == "llava-clip-llama":
        tok = _train_bpe(leading_specials=["<unk>", "<s>", "</s>"], qwen_style=False)
        tok.add_special_tokens([special("<image>"), special("<pad>")])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
            add_bos_token=True,  # Llama prepends <s>; the chat template does not write it
            padding_side="left",
        )

    tok = _train_bpe(leading_specials=[], qwen_style=True)
    tok.add_special_tokens([special(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    if arch == "llava-siglip-qwen2":
        media_tokens = {"image_token": "<image>"}
    elif arch in QWEN_VL_ARCHS:  # Qwen2-VL's order: vision_start, vision_end, ..., image_pad, video_pad
        media_tokens = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    else:
        media_tokens = {
            "audio_token": "<|AUDIO|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        }
    tok.add_special_tokens([special(t) for t in media_tokens.values()])
    # Qwen2: no BOS; <|endoftext|> pads and ends plain text, <|im_end|> ends a chat turn.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=media_tokens,
        padding_side="left",
    )


# --------------------------------------------------------------------------------------------
# Config, processor
# --------------------------------------------------------------------------------------------


def _padded_vocab_size(num_tokens: int) -> int:
    # Real checkpoints pad the embedding past the tokenizer (llava-1.5: 32064 for 32002 tokens,
    # Qwen2: 151936 for 151665); keep that quirk so the engine never assumes equality.
    return (num_tokens + 63) // 64 * 64


def _qwen2_text_config(tokenizer, *, tie_word_embeddings: bool, cls=None, **extra):
    from transformers import Qwen2Config

    return (cls or Qwen2Config)(**{**dict(
        vocab_size=_padded_vocab_size(len(tokenizer)),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        initializer_range=_INIT_STD,
        # As Qwen2-*-Instruct: bos <|endoftext|> (never prepended), eos <|im_end|>.
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    ), **extra})


def _build_config(arch: str, tokenizer):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        SiglipVisionConfig,
    )

    if arch == "llava-clip-llama":
        text_config = LlamaConfig(
            vocab_size=_padded_vocab_size(len(tokenizer)),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA: 2 query heads per KV head
            hidden_act="silu",
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            initializer_range=_INIT_STD,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        vision_config = CLIPVisionConfig(
            image_size=224,
            patch_size=14,  # (224 / 14)^2 = 256 patches + CLS = 257 positions
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=128,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
        return LlavaConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=256,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",  # drop CLS
            vision_feature_layer=-2,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    if arch == "llava-siglip-qwen2":
        vision_config = SiglipVisionConfig(
            image_size=224,
            patch_size=14,  # 256 patches, no CLS
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=False,  # LLaVA reads hidden states; the pooling head is never used
        )
        return LlavaConfig(
            vision_config=vision_config,
            text_config=_qwen2_text_config(tokenizer, tie_word_embeddings=True),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=256,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )

    if arch == "qwen3-vl":
        from transformers import Qwen3VLConfig, Qwen3VLTextConfig

        text_config = _qwen2_text_config(
            tokenizer, tie_word_embeddings=False, cls=Qwen3VLTextConfig, head_dim=64, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [12, 10, 10],
                             "mrope_interleaved": True})
        vision = {"depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                  "out_hidden_size": text_config.hidden_size, "patch_size": 16, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1],
                  "initializer_range": _INIT_STD}
        return Qwen3VLConfig(text_config=text_config.to_dict(), vision_config=vision, tie_word_embeddings=False,
                             **_qwen_vl_token_ids(tokenizer))
    if arch in QWEN_VL_ARCHS:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2VLConfig, Qwen2VLTextConfig

        qwen25 = arch == "qwen2.5-vl"
        text_config = _qwen2_text_config(
            tokenizer, tie_word_embeddings=False, cls=Qwen2_5_VLTextConfig if qwen25 else Qwen2VLTextConfig,
            # head_dim 64: 32 rotary frequencies, split temporal / height / width as Qwen2-VL's 16/24/24 of 64
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]})
        ids = _qwen_vl_token_ids(tokenizer)
        common = {"num_heads": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "initializer_range": _INIT_STD}
        if qwen25:  # windows of 112 px = 4x4 merged patches; block 1 attends over the whole image
            vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "out_hidden_size": text_config.hidden_size,
                      "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2, **common}
            return Qwen2_5_VLConfig(text_config=text_config.to_dict(), vision_config=vision,
                                    tie_word_embeddings=False, **ids)
        return Qwen2VLConfig(
            text_config=text_config.to_dict(),
            vision_config={"depth": 2, "embed_dim": 64, "hidden_size": text_config.hidden_size, "mlp_ratio": 2,
                           **common},
            tie_word_embeddings=False, **ids)

    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=128,
        d_model=128,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        max_source_positions=1500,  # 30 s = 3000 mel frames, /2 by the stride-2 conv
        activation_function="gelu",
        scale_embedding=False,
        initializer_range=_INIT_STD,
    )
    return Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=_qwen2_text_config(tokenizer, tie_word_embeddings=False),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen_vl_token_ids(tokenizer) -> dict[str, int]:
    """The config's media token ids of every Qwen-VL generation (one tokenizer layout)."""
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def _build_processor(arch: str, tokenizer):
    """LLaVA: PIL-backend image processors; Qwen2-VL: the torch ones (they need torchvision)."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaProcessor,
        Qwen2AudioProcessor,
        SiglipImageProcessorPil,
        WhisperFeatureExtractor,
    )

    if arch == "llava-clip-llama":
        # CLIP: resize shortest edge to 224, center-crop 224x224, OpenAI CLIP mean/std.
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # the CLS token (dropped again by "default")
            image_token="<image>",
            chat_template=_LLAVA_CHAT_TEMPLATE,
        )
    if arch == "llava-siglip-qwen2":
        # SigLIP: squash-resize to 224x224, mean/std 0.5.
        image_processor = SiglipImageProcessorPil(size={"height": 224, "width": 224})
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="full",
            num_additional_image_tokens=0,
            image_token="<image>",
            chat_template=_CHATML_IMAGE_TEMPLATE,
        )
    if arch in QWEN_VL_ARCHS:
        from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor,
                                  Qwen2VLVideoProcessor)

        # The torch (torchvision) processors, as the hub's Qwen2-VL folders load. Real image bounds
        # are 56^2 .. 28^2 x 1280 pixels; tiny ones keep tests fast while still resizing both ways
        # (a 224x224 image is 64 tokens, the cap 256); video frames at most 28^2 x 64 pixels,
        # sampled at 2 fps (the fps qwen-vl-utils and vLLM use). do_sample_frames stays off, as in the
        # hub's folders: callers (Tessera, vLLM) sample the frames they pass.
        if arch == "qwen3-vl":  # 16 px patches (32 px per token), mean/std 0.5, as the hub's folders
            from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

            half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 16}
            return Qwen3VLProcessor(
                image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 256},
                                                      **half),
                video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 64},
                                                      cap_pixels_per_frame=True, **half),
                tokenizer=tokenizer, chat_template=_QWEN2_VL_CHAT_TEMPLATE)
        size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}
        video = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}, fps=2.0,
                                      cap_pixels_per_frame=False)
        cls = Qwen2_5_VLProcessor if arch == "qwen2.5-vl" else Qwen2VLProcessor
        return cls(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tokenizer,
                   video_processor=video, chat_template=_QWEN2_VL_CHAT_TEMPLATE)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,  # 10 ms per mel frame: 30 s -> 3000 frames
        chunk_length=30,
        n_fft=400,
        return_attention_mask=True,  # as Qwen2-Audio's preprocessor_config.json
    )
    return Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=_QWEN2_AUDIO_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

# Weight names, three layouts in the wild (LLaVA shown; Qwen2-Audio has audio_tower.* instead):
#
#   in memory (transformers 5 state_dict)   model.language_model.*   lm_head.*
#                                            model.vision_tower.*     model.multi_modal_projector.*
#   save_pretrained (transformers 5.23)     language_model.model.*   language_model.lm_head.*
#                                            vision_tower.*           multi_modal_projector.*
#   hub checkpoints (llava-hf, Qwen)        language_model.model.*   language_model.lm_head.*
#                                            vision_tower.vision_model.*  multi_modal_projector.*
#
# transformers 5 saves by reversing its load-time renames, which gives the hub names except that
# the CLIP/SigLIP vision tower stays flattened (no `vision_model.`). Qwen2-Audio saves exactly the
# hub names. Tied models (llava-siglip-qwen2) store no LM head in any layout.
# Saved name prefix -> hub name prefix; every saved key must match one.
_HUB_KEY_PREFIXES = {
    "llava": (
        ("language_model.", "language_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("vision_tower.", "vision_tower.vision_model."),
    ),
    # Qwen2-VL: transformers 5 saves the hub names (visual.*, model.* for the LM, lm_head.*); in
    # memory it has model.visual.*, model.language_model.* (tests write that layout too).
    "qwen2_vl": (("visual.", "visual."), ("model.", "model."), ("lm_head.", "lm_head.")),
    "qwen2_5_vl": (("visual.", "visual."), ("model.", "model."), ("lm_head.", "lm_head.")),
    "qwen3_vl": (("model.visual.", "model.visual."), ("model.language_model.", "model.language_model."),
                 ("lm_head.", "lm_head.")),
    "qwen2_audio": (
        ("language_model.", "language_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("audio_tower.", "audio_tower."),
    ),
}


def to_hub_key(model_type: str, saved_key: str) -> str:
    """Rename one weight name as transformers 5 saves it to the hub checkpoint's name."""
    for saved_prefix, hub_prefix in _HUB_KEY_PREFIXES[model_type]:
        if saved_key.startswith(saved_prefix):
            return hub_prefix + saved_key[len(saved_prefix) :]
    raise KeyError(f"unexpected saved weight name {saved_key!r} for {model_type}")


def reference_model_class(model_type: str):
    """The transformers class of a checkpoint's ``model_type`` (what builds the tiny weights, and
    the tests' reference)."""
    import transformers

    return getattr(transformers, {"qwen2_audio": "Qwen2AudioForConditionalGeneration",
                                  "qwen2_vl": "Qwen2VLForConditionalGeneration",
                                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                  "qwen3_vl": "Qwen3VLForConditionalGeneration"}.get(
        model_type, "LlavaForConditionalGeneration"))


def _build_model(config, seed: int, *, never_generated_ids: list[int]):
    """Random model, deterministic in `seed`: transformers' own init under a fixed torch seed
    (with `initializer_range` widened in the text config), then a larger final-norm gain and
    silenced LM-head rows for `never_generated_ids`."""
    cls = reference_model_class(config.model_type)
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Logits = lm_head(norm(h)): the final RMSNorm output has RMS ~ its gain, so std(logit) ~
    # gain * std(W) * sqrt(hidden) = 3 * 0.15 * 16 ~ 7. The top two of ~1k logits are then
    # typically ~1 apart (smallest seen over a few hundred greedy steps: ~5e-3), far above fp32
    # engine-vs-reference differences (~1e-5). Which token wins is unchanged by the gain.
    # Scaling the norm gain rather than the LM head keeps a tied model's input embeddings at the
    # same scale as its layers' outputs (a dominant embedding makes greedy decoding loop).
    with torch.no_grad():
        model.get_decoder().norm.weight.fill_(_FINAL_NORM_GAIN)
        # Qwen3: q and k are RMS-normalised per head, so with unit gains every attention logit is
        # ~N(0, 1) and the random model attends almost uniformly (greedy output loops on two
        # tokens); a wider gain gives it the sharp attention the other families get from their init.
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")) and "visual" not in name:
                param.fill_(_QK_NORM_GAIN)
        lm_head = model.get_output_embeddings().weight  # [vocab_size, hidden]
        # Special, media and vocab-padding tokens: shrink their rows so their logits are ~0 and
        # greedy decoding never emits them (generation always runs to max_new_tokens, output
        # always decodes to text). Shrunk rather than zeroed: with tied embeddings these rows are
        # also the specials' input embeddings, which the first RMSNorm scales back up.
        lm_head[never_generated_ids] *= _NEVER_GENERATED_ROW_SCALE
    return model


def _rewrite_hub_layout(out_dir: Path, model_type: str) -> None:
    """Rename the keys of every saved safetensors file (and the shard index) in place."""
    index_path = out_dir / "model.safetensors.index.json"
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(path)
        save_file(
            {to_hub_key(model_type, k): v for k, v in sorted(tensors.items())},
            path,
            metadata={"format": "pt"},
        )
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {
            to_hub_key(model_type, k): v for k, v in sorted(index["weight_map"].items())
        }
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _generation_config(arch: str, tokenizer):
    from transformers import GenerationConfig

    if arch == "llava-clip-llama":
        eos_token_ids = [tokenizer.eos_token_id]
        bos_token_id = tokenizer.bos_token_id
    else:
        # Qwen2 chat models stop on either <|im_end|> or <|endoftext|>.
        eos_token_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    hub_layout: bool = False,
    size: str = "tiny",
) -> Path:
    """Write a tiny random-weight `arch` checkpoint (HF format, fp32) into `out_dir`.

    Deterministic: the same (arch, seed, max_shard_size, hub_layout, size) gives byte-identical
    files. `max_shard_size` (e.g. "200KB") splits the weights into shards plus
    `model.safetensors.index.json`; `hub_layout` writes the hub checkpoints' weight names; `size`
    (a `TEXT_SIZES` key) scales the language model up for benchmarks.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {ARCHS}")
    if size not in TEXT_SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(TEXT_SIZES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(arch)
    config = _build_config(arch, tokenizer)
    if TEXT_SIZES[size]:
        text = config.get_text_config()
        config.text_config = type(text)(**{**text.to_dict(), **TEXT_SIZES[size]})
    # Never generated: every added/special token and the vocab padding past the tokenizer.
    never_generated_ids = sorted(tokenizer.added_tokens_decoder) + list(
        range(len(tokenizer), config.get_text_config().vocab_size)
    )
    model = _build_model(config, seed, never_generated_ids=never_generated_ids)
    model.generation_config = _generation_config(arch, tokenizer)

    # Rebuilding into a used folder: drop old weights (save_pretrained only removes stale shards,
    # not a stale single file or index), so no file from a previous layout lingers.
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    if hub_layout:
        _rewrite_hub_layout(out_dir, config.model_type)
    processor = _build_processor(arch, tokenizer)
    # transformers 5 nests the image processor / feature extractor in processor_config.json;
    # hub checkpoints (and non-transformers readers) also have it standalone.
    processor.save_pretrained(out_dir)
    media_processor = getattr(processor, "image_processor", None) or processor.feature_extractor
    media_processor.save_pretrained(out_dir)
    return out_dir


def default_model_dir(arch: str = "llava-clip-llama") -> Path:
    """Where `ensure_tiny_model` caches `arch`: `$TESSERA_TINY_MODEL_DIR/<arch>-<version>`, else
    `~/.cache/tessera/tiny/<arch>-<version>` (`$XDG_CACHE_HOME` respected)."""
    root = os.environ.get(TINY_MODEL_DIR_ENV)
    if root:
        cache_root = Path(root).expanduser()
    else:
        xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_root = Path(xdg_cache).expanduser() / "tessera" / "tiny"
    return cache_root / f"{arch}-{TINY_MODEL_VERSION}"


def ensure_tiny_model(arch: str = "llava-clip-llama", out_dir: str | Path | None = None) -> Path:
    """Path of a built tiny `arch` model (seed 0), building it on first use.

    Builds into a temporary sibling folder and renames it into place, so a reader never sees a
    half-written model; if another process wins the race, its copy is used (they are identical).
    """
    target = Path(out_dir) if out_dir is not None else default_model_dir(arch)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny_model(arch, tmp_dir)
        try:
            os.rename(tmp_dir, target)
        except OSError:
            if not (target / "config.json").exists():
                raise  # not a lost race: a stray non-model folder is in the way
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
