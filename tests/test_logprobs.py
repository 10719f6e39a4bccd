"""Log-probabilities: each output token's and its top alternatives, from the model's float32
log-softmax before penalties and temperature (vLLM's default), exact against transformers'
log-softmax over the same sequence — in process, over gRPC and with the official ``openai``
client (chat ``logprobs`` / ``top_logprobs``, completions ``logprobs: k``), streamed and not."""

from __future__ import annotations

import openai
import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_image
from tests.conftest import TEST_ENGINE
from tests.reference import HFReference, prompt_cases


@torch.no_grad()
def hf_logprobs(ref: HFReference, prompt: str, media: list[MediaInput], output: list[int]) -> torch.Tensor:
    """[len(output), vocab]: transformers' float32 log-softmax at each output position."""
    inputs = ref.inputs(prompt, media)
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([output])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    logits = ref.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
    return torch.log_softmax(logits[n - 1: n - 1 + len(output)], dim=-1)


def assert_logprobs_match(logprobs, output: list[int], want: torch.Tensor, k: int) -> None:
    assert len(logprobs) == len(output)
    for i, ((lp, top), tok) in enumerate(zip(logprobs, output)):
        assert abs(lp - float(want[i, tok])) < 1e-4, i
        values, ids = want[i].topk(k)
        assert [t for t, _ in top] == ids.tolist(), i
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llava(tiny_models):
    path = tiny_models["llava-clip-llama"]
    return ColocatedEngine(EngineConfig(model=str(path), **TEST_ENGINE)), HFReference(path)


def test_logprobs_equal_transformers_log_softmax(llava):
    engine, ref = llava
    for name in ("text", "one-image"):
        prompt, media = prompt_cases("llava-clip-llama")[name]
        for params in (SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5),
                       # sampled, with a penalty: logprobs stay the raw model's
                       SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3, temperature=0.7, seed=1,
                                      repetition_penalty=1.5)):
            [c] = engine.generate([(prompt, media, params)])
            assert_logprobs_match(c.logprobs, c.token_ids, hf_logprobs(ref, prompt, media, c.token_ids),
                                  params.logprobs)
    [plain] = engine.generate([("hi", [], SamplingParams(max_tokens=2))])
    assert plain.logprobs is None
    [zero] = engine.generate([("hi", [], SamplingParams(max_tokens=2, logprobs=0))])
    assert [top for _, top in zero.logprobs] == [[], []]


def test_logprobs_through_grpc_and_the_openai_client(served_cluster, llava):
    engine, ref = llava
    stack = served_cluster("llava-clip-llama")
    image = make_test_image(4)
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=4)
    [want] = engine.generate([(prompt, [MediaInput(image, "image/png")], params)])
    got = stack.client.generate(prompt, [MediaInput(image, "image/png")], params)
    assert got.token_ids == want.token_ids
    assert [(round(lp, 4), [t for t, _ in top]) for lp, top in got.logprobs] == \
        [(round(lp, 4), [t for t, _ in top]) for lp, top in want.logprobs]

    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    text = "The capital of France is"
    [ref_c] = engine.generate([(text, [], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))])
    tok = engine.tokenizer
    chat_ids = engine.inputs.render_chat([{"role": "user", "content": [{"type": "text", "text": text}]}])
    [chat_ref] = engine.generate([(chat_ids, [], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))])
    for stream in (False, True):
        resp = client.chat.completions.create(model="", messages=[{"role": "user", "content": text}], max_tokens=6,
                                              temperature=0, logprobs=True, top_logprobs=3, stream=stream,
                                              extra_body={"ignore_eos": True})
        content = ([x for chunk in resp for ch in chunk.choices if ch.logprobs for x in ch.logprobs.content]
                   if stream else resp.choices[0].logprobs.content)
        assert [c.token for c in content] == [tok.decode([t]) for t in chat_ref.token_ids]
        for c, (lp, top) in zip(content, chat_ref.logprobs):
            assert abs(c.logprob - lp) < 1e-4 and c.bytes == list(c.token.encode())
            assert [a.token for a in c.top_logprobs] == [tok.decode([t]) for t, _ in top]
    done = client.completions.create(model="", prompt=text, max_tokens=6, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in ref_c.token_ids]
    assert all(abs(a - b) < 1e-4 for a, (b, _) in zip(lp.token_logprobs, ref_c.logprobs))
    assert [list(d) for d in lp.top_logprobs] == [[tok.decode([t]) for t, _ in top] for _, top in ref_c.logprobs]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="", messages=[{"role": "user", "content": text}], logprobs=True,
                                       top_logprobs=21)
