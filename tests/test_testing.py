"""The hypothesis strategies of hqqlora.testing, and a merge/unmerge property test built on them."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import make_layer
from hqq.core.quantize import HQQLinear
from hypothesis import given, settings
from hypothesis import strategies as st

import hqqlora
from hqqlora import check_params, delta_weight, dequantize, dora_weight_norm, quant_layout
from hqqlora.testing import BASE, adapter_banks, adapter_names, adapters, quantized_layers

LAYER = make_layer(32, 16, nbits=4, group_size=16)

# Relative Frobenius drift of unmerge(merge(base, p), p) from base, per nbits: two
# requantizations (measured up to ~0.7, 0.37, 0.2, 0.09, 0.005 on these sizes).
ROUND_TRIP_DRIFT = {1: 1.5, 2: 0.8, 3: 0.45, 4: 0.25, 8: 0.03}


@given(
    quantized_layers(
        in_features=(16, 48),
        out_features=32,
        nbits=(2, 8),
        group_sizes=(16,),
        axes=0,
        dtypes=(torch.float16,),
        bias=False,
    )
)
def test_quantized_layers_follow_the_options(layer):
    layout = quant_layout(layer)
    assert layout.shape[0] == 32 and layout.shape[1] in (16, 48)
    assert layout.nbits in (2, 8)
    assert (layout.group_size, layout.axis, layout.compute_dtype) == (16, 0, torch.float16)
    assert layer.bias is None


@settings(max_examples=10)
@given(quantized_layers(group_sizes=st.just(32), in_features=(16, 32), out_features=(16, 24)))
def test_quantized_layers_only_draw_sizes_that_fit_the_group(layer):
    out_features, in_features = quant_layout(layer).shape
    assert (out_features * in_features) % 32 == 0
    assert torch.isfinite(dequantize(layer)).all()


@given(adapters(LAYER, ranks=(1, 3), dora=(False, True), dtypes=(torch.float32, torch.bfloat16)))
def test_adapters_fit_the_layer_and_are_not_a_no_op(p):
    check_params(p, in_features=32, out_features=16)
    assert p["lora_A"].shape[0] in (1, 3)
    assert p["lora_A"].dtype in (torch.float32, torch.bfloat16)
    assert p["scaling"].item() in (0.5, 1.0, 2.0)
    assert delta_weight(p).abs().max() > 0
    if "magnitude" in p:
        assert (p["magnitude"] > 0).all()
        ratio = p["magnitude"].float() / dora_weight_norm(LAYER, p).float()
        assert ((ratio > 0.75) & (ratio < 1.25)).all()


@settings(max_examples=5)
@given(adapters(make_layer(32, 16, dtype=torch.bfloat16)))
def test_adapters_default_to_the_layer_compute_dtype(p):
    assert p["lora_A"].dtype == p["lora_B"].dtype == torch.bfloat16


@given(st.data())
def test_banks_and_names_make_mixed_batches(data):
    bank = data.draw(adapter_banks(LAYER, min_size=2, max_size=3, ranks=(2,)))
    assert 2 <= len(bank) <= 3 and BASE not in bank
    assert all(p["lora_A"].shape == (2, 32) for p in bank.values())
    names = data.draw(adapter_names(bank, 5))
    assert len(names) == 5 and set(names) <= {*bank, BASE}
    names = data.draw(adapter_names(bank, st.integers(1, 4), base=False))
    assert 1 <= len(names) <= 4 and set(names) <= set(bank)


def test_bad_strategy_options_raise():
    with pytest.raises(ValueError, match=r"Expected `nbits` to hold at least one value"):
        quantized_layers(nbits=())
    with pytest.raises(ValueError, match=r"Expected a non-empty adapter `bank`"):
        adapter_names({}, 3)
    with pytest.raises(ValueError, match=r"Expected 1 <= min_size <= max_size, got 3 and 2"):
        adapter_banks(LAYER, min_size=3, max_size=2)
    with pytest.raises(TypeError, match=r"Expected `layer`"):
        adapters(torch.nn.Linear(4, 4))


@settings(max_examples=15)
@given(st.data())
def test_merge_unmerge_round_trip(data):
    layer = data.draw(quantized_layers())
    params = data.draw(adapters(layer))
    before = dequantize(layer).clone()
    merged = hqqlora.merge(layer, params, warn=False)
    restored = hqqlora.unmerge(merged, params)
    W, W2 = before.double(), dequantize(restored).double()
    assert torch.equal(dequantize(layer), before)  # merge and unmerge leave the base alone
    # The drift bound alone passes a merge that ignores the adapter; each step must equal
    # HQQ's own quantization of the dense target, computed here from HQQ's dequantize.
    delta = (params["lora_B"] @ params["lora_A"]) * params["scaling"]
    assert torch.equal(dequantize(merged), _hqq_requantize(layer, layer.dequantize() + delta))
    undone = merged.dequantize() - delta
    assert torch.equal(dequantize(restored), _hqq_requantize(layer, undone))
    assert (W2 - W).norm() <= ROUND_TRIP_DRIFT[quant_layout(layer).nbits] * W.norm()
    if layer.bias is not None:
        assert torch.equal(restored.bias, layer.bias)


def test_importing_hqqlora_does_not_import_hypothesis():
    code = "import sys, hqqlora; assert 'hypothesis' not in sys.modules; assert 'hqqlora.testing' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _hqq_requantize(layer, weight):
    """HQQ's own quantization of `weight` with `layer`'s settings, dequantized by HQQ."""
    config = {**copy.deepcopy(layer.quant_config), "offload_meta": layer.offload_meta}
    fresh = HQQLinear(None, config, compute_dtype=layer.compute_dtype, device="cpu")
    config.pop("offload_meta")
    fresh.quantize(weight.to(layer.compute_dtype), **config)
    return fresh.dequantize()
