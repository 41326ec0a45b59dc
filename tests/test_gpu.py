"""CUDA checks: skipped on machines without a GPU (CI has none)."""

import pytest
import torch
from helpers import BITS, DTYPES, assert_close_rel, dense_reference, random_adapter

import hqqlora
from hqqlora import _triton
from hqqlora._base import quant_layout, quant_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_layer(nbits, dtype, *, axis=1, bias=True, offload_meta=False, size=(256, 128)):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    gen = torch.Generator().manual_seed(0)
    out_features, in_features = size
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(
            torch.randn(out_features, in_features, generator=gen) / in_features**0.5
        )
    config = BaseQuantizeConfig(nbits=nbits, group_size=64, axis=axis, offload_meta=offload_meta)
    return HQQLinear(linear, config, compute_dtype=dtype, device="cuda")


def to_cuda(p):
    return {k: v.cuda() for k, v in p.items()}


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", BITS)
def test_dequantize_paths_are_bit_identical_on_cuda(nbits, dtype, axis):
    layer = cuda_layer(nbits, dtype, axis=axis)
    expected = layer.dequantize()
    assert torch.equal(hqqlora.dequantize(layer), expected)
    if _triton.triton is not None:
        W_q, scale, zero = quant_tensors(layer)
        assert torch.equal(_triton.dequantize_cuda(W_q, scale, zero, quant_layout(layer)), expected)
    x = torch.randn(7, 128, device="cuda", dtype=dtype)
    assert torch.equal(hqqlora.base_forward(layer, x, exact=True), layer(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_apply_lora_and_merge_on_cuda(nbits, dtype):
    layer = cuda_layer(nbits, dtype)
    p = to_cuda(random_adapter(layer, dora=True))
    x = torch.randn(3, 5, 128, device="cuda", dtype=dtype)
    y = hqqlora.apply_lora(layer, p, x, weight_norm=hqqlora.dora_weight_norm(layer, p))
    assert y.device.type == "cuda" and y.dtype == dtype
    assert_close_rel(y, dense_reference(layer, p, x), dtype)
    merged = hqqlora.merge(layer, p)
    assert merged.W_q.device.type == "cuda" and torch.equal(merged.bias, layer.bias)


def test_offload_meta_layers_work_and_keep_their_setting():
    layer = cuda_layer(4, torch.bfloat16, offload_meta=True)
    assert "zero_scale" in layer.meta
    assert torch.equal(hqqlora.dequantize(layer), layer.dequantize())
    p = to_cuda(random_adapter(layer))
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    assert_close_rel(hqqlora.apply_lora(layer, p, x), dense_reference(layer, p, x), torch.bfloat16)
    merged = hqqlora.merge(layer, p)
    assert merged.offload_meta and "zero_scale" in merged.meta


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_on_cuda_equals_per_row(dtype):
    layer = cuda_layer(4, dtype)
    bank = {
        "a": to_cuda(random_adapter(layer, r=2, seed=1, dtype=dtype)),
        "b": to_cuda(random_adapter(layer, r=5, dora=True, seed=2, dtype=dtype)),
    }
    names = ["a", "__base__", "b", "a", "b"]
    x = torch.randn(5, 3, 128, device="cuda", dtype=dtype)
    y = hqqlora.mixed_batch(x, bank, names, base=layer)
    for i, name in enumerate(names):
        row = layer(x[i]) if name == "__base__" else hqqlora.apply_lora(layer, bank[name], x[i])
        assert_close_rel(y[i], row, dtype, factor=2)
