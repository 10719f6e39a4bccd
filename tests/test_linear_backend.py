"""models/linear.py: every linear backend this machine can run computes what nn.Linear does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.linear import OneDnnLinear, apply_linear_backend, onednn_supports, resolve_linear_backend

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not onednn_supports(torch.float32, CPU), reason="no oneDNN float32 kernel")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 33, 300])
def test_onednn_linear_matches_nn_linear(rows, bias):
    torch.manual_seed(rows)
    lin = nn.Linear(96, 160, bias=bias).requires_grad_(False)
    x = torch.randn(rows, 96)
    ref = lin(x)
    with torch.inference_mode():
        out = OneDnnLinear(lin)(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_apply_swaps_every_linear_and_keeps_the_output():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Sequential(nn.Linear(64, 32, bias=False)))
    x = torch.randn(5, 32)
    ref = block(x)
    assert apply_linear_backend(block, "auto", torch.float32, CPU) == "onednn"
    assert not any(type(m) is nn.Linear for m in block.modules())
    assert sum(isinstance(m, OneDnnLinear) for m in block.modules()) == 2
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_torch_backend_leaves_the_modules_and_bad_names_are_refused():
    block = nn.Sequential(nn.Linear(4, 4))
    assert apply_linear_backend(block, "torch", torch.float32, CPU) == "torch"
    assert type(block[0]) is nn.Linear
    with pytest.raises(ValueError, match="unknown linear backend"):
        resolve_linear_backend("cutlass", torch.float32, CPU)
    assert resolve_linear_backend("auto", torch.float16, torch.device("meta")) == "torch"


def test_onednn_without_a_kernel_is_refused_not_silently_slow():
    if onednn_supports(torch.bfloat16, CPU):
        pytest.skip("this CPU has a bfloat16 oneDNN kernel")
    assert resolve_linear_backend("auto", torch.bfloat16, CPU) == "torch"
    with pytest.raises(ValueError, match="no kernel"):
        resolve_linear_backend("onednn", torch.bfloat16, CPU)
