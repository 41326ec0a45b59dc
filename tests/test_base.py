import pytest
import torch
from helpers import BITS, DTYPES, make_layer

import hqqlora
from hqqlora._base import pure_forward, quant_layout, unpack


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", BITS)
def test_dequantize_is_bit_identical_to_hqq(nbits, dtype, axis):
    layer = make_layer(nbits=nbits, dtype=dtype, axis=axis)
    assert torch.equal(hqqlora.dequantize(layer), layer.dequantize())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nbits", BITS)
def test_pure_forward_equals_hqq_forward_bitwise_fp32(nbits, bias):
    layer = make_layer(nbits=nbits, bias=bias)
    x = torch.randn(2, 5, 64)
    assert torch.equal(pure_forward(layer, x), layer(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_base_forward_casts_input_to_compute_dtype(dtype):
    layer = make_layer(dtype=dtype)
    x = torch.randn(3, 64)
    y = hqqlora.base_forward(layer, x)
    assert y.dtype == dtype
    assert torch.equal(y, layer(x.to(dtype)))


@pytest.mark.parametrize("nbits", BITS)
def test_unpack_inverts_hqq_packing(nbits):
    from hqq.core.quantize import Quantizer

    packing = Quantizer.bit_to_packing[nbits]
    codes = torch.randint(0, 2**nbits, (40, 6), dtype=torch.int32)
    packed = Quantizer.pack[packing](codes)
    assert torch.equal(unpack(packed, packing, torch.int32)[:40], codes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_like_keeps_config_bias_and_dtype(dtype):
    layer = make_layer(nbits=3, group_size=32, dtype=dtype)
    W = hqqlora.dequantize(layer).float()
    new = hqqlora.quantize_like(W, layer, layer.bias)
    assert new.quant_config == layer.quant_config
    assert new.compute_dtype == layer.compute_dtype == quant_layout(new).compute_dtype
    assert quant_layout(new) == quant_layout(layer)
    assert torch.equal(new.bias, layer.bias) and new.bias is not layer.bias
    assert new.offload_meta == layer.offload_meta


def test_rejects_non_hqq_base():
    with pytest.raises(
        TypeError, match="Expected `base` to be an hqq.core.quantize.HQQLinear, got Linear"
    ):
        hqqlora.dequantize(torch.nn.Linear(4, 4))


def test_quantize_like_is_plain_data_and_leaves_its_inputs_alone():
    import copy

    layer = make_layer()
    weight = torch.nn.Parameter(hqqlora.dequantize(layer) + 0.01)
    bias = torch.nn.Parameter(layer.bias.clone())
    before = weight.detach().clone()
    new = hqqlora.quantize_like(weight * 2, layer, bias)
    tensors = [new.W_q, new.bias, *(v for v in new.meta.values() if isinstance(v, torch.Tensor))]
    assert all(not t.requires_grad and t.grad_fn is None for t in tensors)
    copy.deepcopy(new)
    assert torch.equal(weight.detach(), before)
    expected = hqqlora.quantize_like((weight * 2).detach(), layer, layer.bias)
    assert torch.equal(new.W_q, expected.W_q) and torch.equal(new.bias, bias.detach())


def test_quantize_like_casts_the_bias_to_the_compute_dtype():
    layer = make_layer(dtype=torch.bfloat16)
    bias = torch.randn(48, dtype=torch.float64)
    new = hqqlora.quantize_like(hqqlora.dequantize(layer), layer, bias)
    assert new.bias.dtype == torch.bfloat16
    assert torch.equal(new.bias, bias.to(torch.bfloat16))
