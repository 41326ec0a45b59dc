"""loftq: dequant(Q) + ΔW ≈ W, better than plain quantization."""

from __future__ import annotations

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hypothesis import given, settings
from hypothesis import strategies as st

from hqqlora import apply_lora, check_params, delta_weight, dequantize, loftq, quant_layout


def gaussian_weight(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) / in_features**0.5


def plain_error(weight, config, dtype):
    layer = HQQLinear.from_weights(weight.clone(), None, config, compute_dtype=dtype, device="cpu")
    return float(torch.linalg.norm(weight.double() - dequantize(layer).double()))


@settings(max_examples=8)
@given(
    nbits=st.sampled_from((2, 3, 4)),
    r=st.integers(1, 8),
    use_rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loftq_beats_plain_quantization(nbits, r, use_rslora, seed):
    weight = gaussian_weight(48, 64, seed)
    before = weight.clone()
    config = BaseQuantizeConfig(nbits=nbits, group_size=16)
    layer, params = loftq(
        weight, config, r, 16, compute_dtype=torch.float32, num_iters=2, use_rslora=use_rslora
    )
    assert torch.equal(weight, before)
    check_params(params, in_features=64, out_features=48)
    layout = quant_layout(layer)
    assert (layout.nbits, layout.group_size, layout.shape) == (nbits, 16, (48, 64))
    scaling = 16 / r**0.5 if use_rslora else 16 / r
    assert float(params["scaling"]) == pytest.approx(scaling)
    fit = dequantize(layer).double() + delta_weight(params).double()
    error = float(torch.linalg.norm(weight.double() - fit))
    assert error < plain_error(weight, config, torch.float32)
    assert params["lora_A"].shape == (r, 64) and params["lora_B"].shape == (48, r)


def test_loftq_adapter_reproduces_the_weight_in_the_forward():
    weight = gaussian_weight(32, 64, 0)
    bias = torch.randn(32)
    layer, params = loftq(
        weight,
        BaseQuantizeConfig(nbits=4, group_size=16),
        8,
        16,
        compute_dtype=torch.float32,
        bias=bias,
    )
    assert torch.equal(layer.bias, bias)
    x = torch.randn(5, 64)
    fit = dequantize(layer) + delta_weight(params)
    torch.testing.assert_close(apply_lora(layer, params, x), x @ fit.T + bias, rtol=1e-5, atol=1e-5)


def test_loftq_more_rank_fits_better():
    weight = gaussian_weight(32, 64, 1)
    config = BaseQuantizeConfig(nbits=2, group_size=16)
    errors = []
    for r in (1, 8, 32):
        layer, params = loftq(weight, config, r, 8, compute_dtype=torch.float32, num_iters=1)
        errors.append(float(torch.linalg.norm(weight - dequantize(layer) - delta_weight(params))))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"Expected `r` an int in \[1, 32\]"),
        ({"r": 33}, r"Expected `r` an int in \[1, 32\]"),
        ({"num_iters": 0}, r"Expected `num_iters` a positive int"),
        ({"bias": torch.zeros(3)}, r"Expected `bias` of shape \(32,\)"),
        ({"weight": torch.zeros(64)}, r"Expected `weight` of shape \(out, in\)"),
    ],
)
def test_loftq_rejects_bad_input(kwargs, match):
    args = {"weight": gaussian_weight(32, 64, 0), "r": 4, **kwargs}
    weight, r = args.pop("weight"), args.pop("r")
    with pytest.raises(ValueError, match=match):
        loftq(
            weight,
            BaseQuantizeConfig(nbits=4, group_size=16),
            r,
            8,
            compute_dtype=torch.float32,
            **args,
        )


def test_loftq_rejects_integer_weight():
    with pytest.raises(TypeError, match="Expected `weight` to be a floating-point tensor"):
        loftq(
            torch.zeros(4, 4, dtype=torch.int64),
            BaseQuantizeConfig(nbits=4, group_size=8),
            1,
            compute_dtype=torch.float32,
        )
