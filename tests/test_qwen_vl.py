"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution token plans, M-RoPE positions, weight layouts, and parity with
transformers under chunked prefill and prefix caching (plain parity: test_engine_parity.py;
through the disaggregated cluster, where only the position delta reaches decode:
test_cluster_e2e.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import MediaInput, SamplingParams
from models.loader import load_model
from models.media_samples import make_test_image
from models.mrope import MRopeSpec, mrope_positions, step_positions
from tests.reference import HFReference, prompt_cases


@pytest.fixture(scope="module", params=("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
def qwen_vl(request, tiny_models):
    path = tiny_models[request.param]
    return path, HFReference(path)


def request_arch(ref) -> str:
    return {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}[ref.model.config.model_type]


def test_plan_token_counts_follow_the_image_size(qwen_vl):
    """Each image becomes as many tokens as its resized grid: more pixels, more tokens, within
    the processor's min/max pixel bounds; the counts equal the image processor's own grids."""
    path, ref = qwen_vl
    engine = ColocatedEngine(EngineConfig(model=str(path)))
    sizes = [(28, 28), (224, 224), (330, 150), (150, 330), (2000, 1500)]
    media = [MediaInput(make_test_image(i, size), "image/png") for i, size in enumerate(sizes)]
    prompt = "<|vision_start|><|image_pad|><|vision_end|>" * len(media)
    plan = engine.inputs.prepare("x", prompt, media, SamplingParams()).plan
    expected = ref.processor(text=prompt, images=[_pil(m) for m in media], return_tensors="pt")
    assert plan.prompt_token_ids == expected["input_ids"][0].tolist()
    grids = expected["image_grid_thw"]
    assert plan.media_lengths == (grids.prod(-1) // 4).tolist()
    assert len(set(plan.media_lengths)) >= 4  # dynamic: not one fixed count
    ip = ref.processor.image_processor
    assert min(plan.media_lengths) * 4 * ip.patch_size ** 2 >= ip.size["shortest_edge"]
    assert max(plan.media_lengths) * 4 * ip.patch_size ** 2 <= ip.size["longest_edge"]


def test_plans_equal_the_processor_for_every_prompt_case(qwen_vl):
    """Prompt ids, media token counts and where each item's rows go, against the HF processor. A
    Qwen3-VL video is one run per temporal patch, each after its timestamp text and vision start."""
    path, ref = qwen_vl
    engine = ColocatedEngine(EngineConfig(model=str(path)))
    tok = ref.processor.tokenizer
    for name, (prompt, media) in prompt_cases(request_arch(ref)).items():
        plan = engine.inputs.prepare("x", prompt, media, SamplingParams()).plan
        inputs = ref.inputs(prompt, media)
        ids = inputs["input_ids"][0].tolist()
        assert plan.prompt_token_ids == ids, name
        grids = iter(torch.cat([inputs.get("image_grid_thw", torch.zeros(0, 3)), inputs.get("video_grid_thw",
                                torch.zeros(0, 3))]).long().tolist())
        kinds = [m.modality for m in media]
        order = [*(i for i, k in enumerate(kinds) if k == "image"), *(i for i, k in enumerate(kinds) if k == "video")]
        per_item = dict(zip(order, grids))
        for i, (runs, kind) in enumerate(zip(plan.media_runs, kinds)):
            t, h, w = per_item[i]
            assert plan.media_lengths[i] == t * h * w // 4, name
            pad = tok.convert_tokens_to_ids(f"<|{kind}_pad|>")
            assert all(ids[o: o + n] == [pad] * n for o, n in runs), name
            split = kind == "video" and request_arch(ref) == "qwen3-vl"
            assert len(runs) == (t if split else 1), name
            if split:  # "<0.3 seconds><|vision_start|>" before each run
                for o, _ in runs:
                    assert tok.decode(ids[o - 7: o]).endswith(" seconds><|vision_start|>"), name


def test_positions_equal_transformers_rope_index(qwen_vl):
    path, ref = qwen_vl
    spec = MRopeSpec.from_config(ref.model.config)
    for name, (prompt, media) in prompt_cases(request_arch(ref)).items():
        inputs = ref.inputs(prompt, media)
        ids = inputs["input_ids"]
        image_grids = iter(inputs.get("image_grid_thw", []))
        video_grids = iter(inputs.get("video_grid_thw", []))
        grids = [tuple(int(x) for x in next(image_grids if m.modality == "image" else video_grids)) for m in media]
        seconds = iter(inputs.get("second_per_grid_ts", []))  # Qwen2.5-VL: seconds per temporal patch
        per_item = [float(next(seconds)) if m.modality == "video" and spec.tokens_per_second else None for m in media]
        ours, delta = mrope_positions(spec, ids[0].tolist(), grids, per_item)
        if media:
            extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
            want, want_delta = ref.model.model.get_rope_index(
                ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"), **extra)
            assert torch.equal(ours, want[:, 0]), name
            assert delta == int(want_delta) < 0, name  # media take fewer positions than tokens
        else:
            assert torch.equal(ours, torch.arange(ids.shape[1]).expand(3, -1)) and delta == 0
    # after the prompt, every token sits at index + delta on all three axes
    positions, delta = mrope_positions(spec, ids[0].tolist(), grids, per_item)
    n = positions.shape[1]
    tail = step_positions(positions, delta, n - 2, n + 3)
    assert torch.equal(tail[:, :2], positions[:, -2:])
    assert torch.equal(tail[:, 2:], torch.arange(n, n + 3).add(delta).expand(3, -1))


def test_chunked_prefill_and_prefix_cache_keep_parity(qwen_vl):
    """Chunks that cut through an image's tokens take the right slice of its 3-D positions; a
    prefix-cache hit (same prompt and image again) gives the same tokens."""
    path, ref = qwen_vl
    engine = ColocatedEngine(EngineConfig(model=str(path), max_num_batched_tokens=32, enable_prefix_caching=True))
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    for name, (prompt, media) in prompt_cases(request_arch(ref)).items():
        want = ref.greedy(prompt, media, 12)
        first = engine.generate([(prompt, media, greedy)])[0]
        again = engine.generate([(prompt, media, greedy)])[0]
        assert first.token_ids == want == again.token_ids, name
    assert engine.scheduler.num_prefix_hit_tokens > 0  # the second runs did hit
    assert engine.kv_blocks_in_use == 0


def test_preemption_by_recompute_keeps_parity(qwen_vl):
    """A KV cache too small for every prompt case at once: the scheduler preempts running requests
    and recomputes them (prompt at its 3-D positions, the outputs so far at index + delta)."""
    path, ref = qwen_vl
    probe = ColocatedEngine(EngineConfig(model=str(path), kv_cache_memory_gb=0.01))
    length = {name: len(probe.inputs.prepare("x", p, m, SamplingParams()).plan.prompt_token_ids)
              for name, (p, m) in prompt_cases(request_arch(ref)).items()}
    longest = max(length, key=length.get)
    # text and the longest prompt run first, side by side: both prompts fit, both outputs do not
    order = ["text", longest] + [n for n in length if n not in ("text", longest)]
    cases = {n: prompt_cases(request_arch(ref))[n] for n in order}
    blocks = -(-(length[longest] + 40) // 16)
    engine = ColocatedEngine(EngineConfig(model=str(path), kv_cache_memory_gb=0.01 * blocks / probe.blocks.num_blocks,
                                          enable_prefix_caching=False))
    assert engine.blocks.num_blocks == blocks
    preempted = []
    preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda req: (preempted.append(req.request_id), preempt(req))
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    got = engine.generate([(p, m, greedy) for p, m in cases.values()])
    assert preempted
    for (name, (p, m)), c in zip(cases.items(), got):
        assert c.token_ids == ref.greedy(p, m, 40), name
    assert engine.kv_blocks_in_use == 0


def test_loads_the_transformers_5_weight_layout(qwen_vl, tmp_path):
    """The hub's names (visual.*, model.*) as saved, and transformers 5's in-memory names
    (model.visual.*, model.language_model.*): the same weights either way."""
    path, ref = qwen_vl
    if ref.model.config.model_type == "qwen3_vl":
        pytest.skip("Qwen3-VL has one layout: its hub checkpoints are saved as transformers 5 names them")
    path, _ = qwen_vl
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(path / "model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else
                "model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    a, b = load_model(path), load_model(tmp_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refuses_interleaved_mrope(qwen_vl, tmp_path):
    """A rotary layout this code does not implement is refused, never served approximately."""
    path, ref = qwen_vl
    if ref.model.config.model_type == "qwen3_vl":
        pytest.skip("Qwen3-VL's M-RoPE is interleaved: it is implemented")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_interleaved"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="interleaved M-RoPE"):
        load_model(tmp_path)


def _pil(media: MediaInput):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(media.data)).convert("RGB")


def test_torchvision_imports_in_a_fresh_interpreter_and_its_missing_ops_stay_errors():
    """The compat shim: torchvision's transforms import on this torch, and an op whose kernel
    did not load raises instead of returning garbage."""
    import subprocess
    import sys

    code = (
        "from models.torchvision_compat import ensure_torchvision\n"
        "assert ensure_torchvision()\n"
        "import torch, torchvision.transforms.v2 as T\n"
        "assert T.functional.resize(torch.zeros(3, 8, 8), [4, 4]).shape == (3, 4, 4)\n"
        "import torchvision.ops\n"
        "try:\n"
        "    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "    loaded = True\n"
        "except (RuntimeError, NotImplementedError):\n"
        "    loaded = False\n"
        "print('ops', loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("ops True", "ops False")
