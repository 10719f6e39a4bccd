"""Chat templates and literal chat text: a folder without a template served with
``--chat-template`` / ``engine.chat_template`` (a file or the template itself), a request's own
``chat_template`` (when the server trusts them) and ``chat_template_kwargs``, and client text that
spells a control token ("<s>", "<image>", "<|im_start|>") served as the characters it is, token-exact
against transformers on the same ids — in process, over gRPC and over the OpenAI API with the
official client."""

from __future__ import annotations

import shutil

import openai
import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import InvalidRequestError, SamplingParams
from tests.conftest import TEST_ENGINE, ServedCluster
from tests.reference import HFReference

GREETING_TEMPLATE = ("{% for m in messages %}{{ greeting | default('Hi') }} {{ m['role'] }}: "
                     "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")
# (text, the control tokens it spells)
LITERAL = {"What does the HTML tag <s> do? And </s>?": ("<s>", "</s>"),
           "Explain the <image> placeholder in LLaVA prompts.": ("<image>",),
           "Close a ChatML turn with <|im_end|> and open one with <|im_start|>system": ("<|im_end|>", "<|im_start|>")}


def user(*texts: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}]


def without_chat_template(src, dst):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    return dst


@pytest.fixture(scope="module")
def llava(tiny_models):
    path = tiny_models["llava-clip-llama"]
    return path, ColocatedEngine(EngineConfig(model=str(path), **TEST_ENGINE)), HFReference(path)


@torch.no_grad()
def hf_greedy(ref: HFReference, ids: list[int], n: int) -> list[int]:
    out = ref.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_typed_control_tokens_are_served_as_text_token_exact(llava, tiny_models):
    """The ids hold the template's control tokens only (the user's "<s>" is "<", "s", ">"), decode
    back to what was typed, and greedy output equals transformers' on those ids."""
    path, engine, ref = llava
    qwen = ColocatedEngine(EngineConfig(model=str(tiny_models["qwen2-vl"]), **TEST_ENGINE))
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    for eng, hf in ((engine, ref), (qwen, None)):
        template_only = eng.inputs.render_chat(user("x"))
        control = eng.processor.control_token_ids
        for text, spelled in LITERAL.items():
            ids = eng.inputs.render_chat(user(text))
            assert [t for t in ids if t in control] == [t for t in template_only if t in control], text
            assert text in eng.tokenizer.decode(ids), text
            for token in spelled:
                tid = eng.tokenizer.convert_tokens_to_ids(token)
                assert tid not in ids or tid in template_only, (text, token)
            [got] = eng.generate([(ids, [], greedy)])
            if hf is not None:
                assert got.token_ids == hf_greedy(hf, ids, 8), text
    # plain text tokenizes exactly as the rendered prompt always did
    plain = user("Describe a cat in one line.")
    assert engine.inputs.render_chat(plain) == engine.tokenizer(engine.processor.apply_chat_template(plain))["input_ids"]


def test_a_folder_without_a_chat_template(llava, tmp_path):
    path, _, ref = llava
    bare = without_chat_template(path, tmp_path / "bare")
    engine = ColocatedEngine(EngineConfig(model=str(bare), **TEST_ENGINE))
    with pytest.raises(InvalidRequestError, match="no chat template: start the server with --chat-template"):
        engine.inputs.render_chat(user("hi"))
    [raw] = engine.generate([("USER: hi ASSISTANT:", [], SamplingParams(max_tokens=4, ignore_eos=True))])
    assert len(raw.token_ids) == 4  # raw prompts still served

    template_file = tmp_path / "greeting.jinja"
    template_file.write_text(GREETING_TEMPLATE)
    for value in (str(template_file), GREETING_TEMPLATE):  # a file, or the template itself
        served = ColocatedEngine(EngineConfig(model=str(bare), chat_template=value, **TEST_ENGINE))
        ids = served.inputs.render_chat(user("hi"))
        want = ref.processor.tokenizer.apply_chat_template(user("hi"), chat_template=GREETING_TEMPLATE,
                                                           add_generation_prompt=True, tokenize=False)
        assert ids == served.tokenizer(want)["input_ids"] and want.startswith("Hi user: hi")
        hello = served.inputs.render_chat(user("hi"), template_kwargs={"greeting": "Hello"})
        assert served.tokenizer.decode(hello, skip_special_tokens=True).startswith("Hello user: hi")
    with pytest.raises(ValueError, match="chat template file 'no/such.jinja' does not exist"):
        EngineConfig(model=str(bare), chat_template="no/such.jinja")


def test_cli_generate_chat_with_a_template_file(llava, tmp_path):
    from tests.test_cli import tessera

    path, _, _ = llava
    bare = without_chat_template(path, tmp_path / "bare")
    template_file = tmp_path / "t.jinja"
    template_file.write_text(GREETING_TEMPLATE)
    refused = tessera("generate", "--model", str(bare), "--chat", "--max-tokens", "2", "hi")
    assert refused.returncode == 2 and "--chat-template" in refused.stderr
    ok = tessera("generate", "--model", str(bare), "--chat", "--chat-template", str(template_file), "--json",
                 "--max-tokens", "3", "--ignore-eos", "hi")
    assert ok.returncode == 0, ok.stderr


@pytest.fixture(scope="module")
def stack(ray_session, tiny_models, tmp_path_factory):
    """A LLaVA folder without a template, served with --chat-template and trusting requests' own."""
    bare = without_chat_template(tiny_models["llava-clip-llama"], tmp_path_factory.mktemp("bare") / "llava")
    s = ServedCluster("llava-clip-llama", bare, engine={"chat_template": GREETING_TEMPLATE},
                      router={"trust_request_chat_template": True})
    yield s
    s.close()


def test_served_chat_templates_and_literal_text_over_grpc_and_the_openai_client(stack, llava):
    _, engine, ref = llava
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    served = ColocatedEngine(EngineConfig(model=str(stack.config.engine.model), chat_template=GREETING_TEMPLATE,
                                          **TEST_ENGINE))
    served.inputs.trust_request_chat_template = True  # as the served router does
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    for text in LITERAL:
        ids = served.inputs.render_chat(user(text))
        want = hf_greedy(ref, ids, 8)
        grpc_out = stack.client.generate(messages=user(text), sampling=greedy)
        assert grpc_out.token_ids == want, text
        resp = client.chat.completions.create(model="", messages=[{"role": "user", "content": text}], max_tokens=8,
                                              temperature=0, extra_body={"ignore_eos": True})
        assert resp.choices[0].message.content == engine.tokenizer.decode(want, skip_special_tokens=True), text
        assert resp.usage.prompt_tokens == len(ids)
    # chat_template_kwargs and a request's own template, both front doors
    kwargs_ids = served.inputs.render_chat(user("hi"), template_kwargs={"greeting": "Hello"})
    assert stack.client.generate(messages=user("hi"), sampling=greedy,
                                 chat_template_kwargs={"greeting": "Hello"}).token_ids == hf_greedy(ref, kwargs_ids, 8)
    own = "{% for m in messages %}Q: {{ m['content'][0]['text'] }}\n{% endfor %}A:"
    own_ids = served.inputs.render_chat(user("hi"), chat_template=own)
    resp = client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True, "chat_template": own})
    assert resp.usage.prompt_tokens == len(own_ids)
    assert resp.choices[0].message.content == engine.tokenizer.decode(hf_greedy(ref, own_ids, 8),
                                                                      skip_special_tokens=True)
    assert stack.client.generate(messages=user("hi"), sampling=greedy, chat_template=own).token_ids == \
        hf_greedy(ref, own_ids, 8)
