"""benchmarks.engine_throughput on the tiny model (Tessera and transformers; vLLM needs its venv)."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import engine_throughput as et


def test_prompt_ids_are_exact_and_round_trip():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(et.model_dir("tiny"))
    for n in (16, 300):
        ids = et.prompt_ids(tok, n)
        assert len(ids) == n
        assert tok(tok.decode(ids, skip_special_tokens=True))["input_ids"] == ids


def test_tiny_run_reports_every_engine_against_the_bandwidth_bound(tmp_path):
    args = argparse.Namespace(size="tiny", dtypes=["float32"], batches=[1, 2], prompt_len=16, output_len=5,
                              prefill_len=64, repeats=1, core=0, peer_venv=None, transformers=True,
                              linear_backend="auto")
    result = et.bench(args)
    [run] = result["runs"]
    assert run["weight_bytes"] > 0 and result["read_bandwidth_gb_s"] > 0
    for row in run["rows"]:
        assert row["tessera_decode_tok_s"] > 0 and row["transformers_decode_tok_s"] > 0
        assert row["bound_tok_s"] == pytest.approx(row["batch"] * run["rows"][0]["bound_tok_s"])
    assert set(run["prefill_s"]) == {"tessera", "transformers"}
    et.write_report(result, tmp_path, "test")
    md = (tmp_path / "engine_throughput-tiny.md").read_text()
    assert "## float32" in md and "share of bound" in md and "Prefill of a 64-token prompt" in md
    assert json.loads((tmp_path / "engine_throughput-tiny.json").read_text())["runs"][0]["rows"][1]["batch"] == 2


def test_unknown_model_size_is_refused(tmp_path):
    from models.tiny import build_tiny_model

    with pytest.raises(ValueError, match="unknown size"):
        build_tiny_model("llava-clip-llama", tmp_path, size="7b")
