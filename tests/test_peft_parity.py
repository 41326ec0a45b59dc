"""hqqlora against PEFT's HqqLoraLinear (the oracle), on the CPU."""

import pytest
import torch
from helpers import BITS, DTYPES, RTOL, assert_close_rel, make_layer, random_adapter

import hqqlora

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.hqq import HqqLoraLinear as PeftHqqLoraLinear  # noqa: E402


def peft_layer(layer, params, *, r, lora_alpha, use_dora=False, use_rslora=False):
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_dora=use_dora,
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    module = PeftHqqLoraLinear(layer, "default", config=config, r=r, lora_alpha=lora_alpha)
    with torch.no_grad():
        module.lora_A["default"].weight.copy_(params["lora_A"])
        module.lora_B["default"].weight.copy_(params["lora_B"])
        if use_dora:
            module.lora_magnitude_vector["default"].weight.copy_(params["magnitude"])
    return module.eval()


def adapter_for(layer, *, r=4, lora_alpha=8, use_dora=False, use_rslora=False, seed=1):
    p = random_adapter(layer, r=r, dora=use_dora, seed=seed)
    p["scaling"] = torch.tensor(hqqlora._params.lora_scaling(r, lora_alpha, use_rslora))
    return p


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", BITS)
def test_forward_delta_and_merge_match_peft(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    p = adapter_for(layer)
    ref = peft_layer(layer, p, r=4, lora_alpha=8)
    x = torch.randn(2, 3, 64).to(dtype)
    with torch.no_grad():
        expected = ref(x)
        ours = hqqlora.apply_lora(layer, p, x)
        assert ours.dtype == expected.dtype
        assert_close_rel(ours, expected, dtype)
        # PEFT 0.21.0 returns the delta in the layer's dtype, 0.21.2 in the adapters'.
        ref_delta = ref.get_delta_weight("default")
        tol = 1e-6 if ref_delta.dtype == torch.float32 else RTOL[ref_delta.dtype]
        torch.testing.assert_close(
            hqqlora.delta_weight(p).to(ref_delta.dtype), ref_delta, rtol=tol, atol=tol * 1e-1
        )
        ref.merge()
        merged = hqqlora.merge(layer, p, warn=False)
    # PEFT drops the bias on merge; we keep it.
    assert ref.base_layer.bias is None
    if bias:
        assert torch.equal(merged.bias, layer.bias)
    else:
        assert merged.bias is None
    if ref_delta.dtype != p["lora_B"].dtype:
        # This PEFT rounds the delta to the layer's dtype before merging: other codes.
        # Ours must be at least as close to the exact merged weight W + ΔW.
        target = hqqlora.dequantize(layer).double() + hqqlora.delta_weight(p).double()
        ours_err = (hqqlora.dequantize(merged).double() - target).norm()
        assert ours_err <= 1.02 * (ref.base_layer.dequantize().double() - target).norm() + 1e-12
        return
    assert torch.equal(hqqlora.dequantize(merged), ref.base_layer.dequantize())
    with torch.no_grad():
        expected_merged = ref(x) + layer.bias if bias else ref(x)
        assert torch.equal(merged(x), expected_merged)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_dora_forward_and_merge_match_peft(nbits, dtype, use_rslora):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=True)
    p = adapter_for(layer, r=4, lora_alpha=16, use_dora=True, use_rslora=use_rslora)
    ref = peft_layer(layer, p, r=4, lora_alpha=16, use_dora=True, use_rslora=use_rslora)
    x = torch.randn(5, 64).to(dtype)
    with torch.no_grad():
        assert_close_rel(hqqlora.apply_lora(layer, p, x), ref(x), dtype)
        n = hqqlora.dora_weight_norm(layer, p)
        assert_close_rel(hqqlora.apply_lora(layer, p, x, weight_norm=n), ref(x), dtype)
        ref.merge()
    merged_ref = ref.base_layer.dequantize().double()
    ours = hqqlora.dequantize(hqqlora.merge(layer, p, warn=False)).double()
    # PEFT casts the DoRA-merged weight to the compute dtype before quantizing; we
    # quantize the float32 weight, so the two quantizations differ slightly. Ours is
    # at least as close to the exact merged weight c ⊙ (W + ΔW).
    target = hqqlora.merged_weight(layer, p).double()
    assert (ours - target).norm() <= 1.02 * (merged_ref - target).norm() + 1e-12


def test_rslora_forward_matches_peft():
    layer = make_layer()
    p = adapter_for(layer, r=16, lora_alpha=8, use_rslora=True)
    ref = peft_layer(layer, p, r=16, lora_alpha=8, use_rslora=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert_close_rel(hqqlora.apply_lora(layer, p, x), ref(x), torch.float32)
