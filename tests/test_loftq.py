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


def loftq_iterates(weight, config, r, num_iters):
    """The documented alternation, run here with HQQ and SVD directly: each iterate's
    ``‖W - (dequant(Q_t) + ΔW_t)‖`` (float64)."""
    delta, errors = torch.zeros_like(weight), []
    for _ in range(num_iters):
        layer = HQQLinear.from_weights(
            (weight - delta).clone(), None, dict(config), compute_dtype=torch.float32, device="cpu"
        )
        residual = weight - layer.dequantize()
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        delta = (U[:, :r] * S[:r]) @ Vh[:r]
        errors.append(float(torch.linalg.norm(residual.double() - delta.double())))
    return errors


def test_loftq_returns_its_best_iterate_not_its_last():
    weight = gaussian_weight(32, 64, 1)
    config = BaseQuantizeConfig(nbits=2, group_size=16)
    errors = loftq_iterates(weight, config, 8, 4)
    best = min(range(4), key=errors.__getitem__)
    assert best < 3 and errors[3] > errors[best] * 1.01  # here the last iterate is worse
    layer, params = loftq(
        weight, config, r=8, lora_alpha=16, compute_dtype=torch.float32, num_iters=4
    )
    fit = dequantize(layer).double() + delta_weight(params).double()
    error = float(torch.linalg.norm(weight.double() - fit))
    assert error == pytest.approx(errors[best], rel=1e-4)


def test_loftq_takes_its_options_by_name():
    weight = gaussian_weight(32, 64, 0)
    config = BaseQuantizeConfig(nbits=4, group_size=16)
    kw = {"compute_dtype": torch.float32, "num_iters": 1}
    positional = loftq(weight, config, 4, 8, **kw)
    for call in (
        lambda: loftq(weight, config, r=4, lora_alpha=8, **kw),
        lambda: loftq(weight, quant_config=config, r=4, lora_alpha=8, **kw),
    ):
        layer, params = call()
        assert torch.equal(layer.W_q, positional[0].W_q)
        assert all(torch.equal(params[k], positional[1][k]) for k in params)
    with pytest.raises(TypeError):
        loftq(weight=weight, quant_config=config, r=4, **kw)  # the weight stays positional


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"Expected `r` an int in \[1, 32\]"),
        ({"r": 33}, r"Expected `r` an int in \[1, 32\]"),
        ({"r": True}, r"Expected `r` an int in \[1, 32\], got True"),
        ({"r": 4.0}, r"Expected `r` an int in \[1, 32\], got 4.0"),
        ({"lora_alpha": 0}, r"Expected `lora_alpha` a finite number > 0, got 0"),
        ({"lora_alpha": -8}, r"Expected `lora_alpha` a finite number > 0, got -8"),
        ({"lora_alpha": float("inf")}, r"Expected `lora_alpha` a finite number > 0, got inf"),
        ({"lora_alpha": float("nan")}, r"Expected `lora_alpha` a finite number > 0, got nan"),
        ({"lora_alpha": True}, r"Expected `lora_alpha` a finite number > 0, got True"),
        ({"lora_alpha": "8"}, r"Expected `lora_alpha` a finite number > 0, got '8'"),
        ({"num_iters": 0}, r"Expected `num_iters` a positive int"),
        ({"num_iters": True}, r"Expected `num_iters` a positive int, got True"),
        ({"use_rslora": "false"}, r"Expected `use_rslora` a bool, got 'false'"),
        ({"bias": torch.zeros(3)}, r"Expected `bias` of shape \(32,\)"),
        ({"weight": torch.zeros(64)}, r"Expected `weight` of shape \(out, in\)"),
    ],
)
def test_loftq_rejects_bad_input(kwargs, match):
    args = {"weight": gaussian_weight(32, 64, 0), "r": 4, "lora_alpha": 8, **kwargs}
    weight = args.pop("weight")
    with pytest.raises(ValueError, match=match):
        loftq(
            weight,
            BaseQuantizeConfig(nbits=4, group_size=16),
            compute_dtype=torch.float32,
            **args,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": torch.zeros(4, 4, dtype=torch.int64)}, r"Expected `weight` to be a floating"),
        ({"quant_config": [("nbits", 4)]}, r"Expected `quant_config` to be a dict"),
        ({"compute_dtype": torch.int8}, r"Expected `compute_dtype` a floating-point torch.dtype"),
        ({"compute_dtype": None}, r"Expected `compute_dtype` a floating-point torch.dtype"),
        ({"dtype": "float32"}, r"Expected `dtype` a floating-point torch.dtype"),
    ],
)
def test_loftq_rejects_wrong_types(kwargs, match):
    args = {
        "weight": gaussian_weight(8, 16, 0),
        "quant_config": BaseQuantizeConfig(nbits=4, group_size=8),
        "compute_dtype": torch.float32,
        **kwargs,
    }
    weight = args.pop("weight")
    with pytest.raises(TypeError, match=match):
        loftq(weight, r=1, **args)


def test_loftq_honours_its_dtypes():
    weight = gaussian_weight(32, 64, 2)
    config = BaseQuantizeConfig(nbits=4, group_size=16)
    bias = torch.randn(32)
    layer, params = loftq(
        weight,
        config,
        r=4,
        lora_alpha=8,
        compute_dtype=torch.bfloat16,
        dtype=torch.float16,
        bias=bias,
        num_iters=1,
    )
    assert layer.compute_dtype == quant_layout(layer).compute_dtype == torch.bfloat16
    assert dequantize(layer).dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, bias.bfloat16())
    assert params["lora_A"].dtype == params["lora_B"].dtype == torch.float16
    fit = dequantize(layer).double() + delta_weight(params).double()
    error = float(torch.linalg.norm(weight.double() - fit))
    assert error < plain_error(weight, config, torch.bfloat16)
