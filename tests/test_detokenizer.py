import pytest

from cluster.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llava-siglip-qwen2"])


def test_streamed_text_equals_full_decode(tokenizer):
    text = "Héllo wörld — multimodal serving ✓ 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer)
    pieces = []
    for t in ids:
        d.push([t])
        pieces.append(d.take())
    pieces.append(d.take(final=True))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_truncates_and_is_never_partially_sent(tokenizer):
    ids = tokenizer("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer, stop=("STOP",))
    sent = ""
    for t in ids:
        d.push([t])
        sent += d.take()
        assert "ST" not in sent
        if d.stopped:
            break
    sent += d.take(final=True)
    assert d.stopped and sent == "alpha beta "
