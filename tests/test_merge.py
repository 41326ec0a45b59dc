import pytest
import torch
from helpers import BITS, DTYPES, make_layer, random_adapter
from hypothesis import given
from hypothesis import strategies as st

import hqqlora


def snapshot(layer):
    return (
        layer.W_q.clone(),
        layer.meta["scale"].clone(),
        layer.meta["zero"].clone(),
        None if layer.bias is None else layer.bias.clone(),
        dict(layer.meta),
        repr(layer.quant_config),
    )


def assert_unchanged(layer, before):
    after = snapshot(layer)
    for a, b in zip(after[:4], before[:4], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert after[4].keys() == before[4].keys() and after[5] == before[5]


def codes_equal(a, b):
    return (
        torch.equal(a.W_q, b.W_q)
        and torch.equal(a.meta["scale"], b.meta["scale"])
        and torch.equal(a.meta["zero"], b.meta["zero"])
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", BITS)
def test_merge_requantizes_once_keeps_bias_and_config(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    p1, p2 = random_adapter(layer, seed=1), random_adapter(layer, r=2, seed=2)
    before = snapshot(layer)
    merged = hqqlora.merge(layer, [p1, p2], warn=False)
    assert_unchanged(layer, before)
    W = hqqlora.dequantize(layer) + hqqlora.delta_weight(p1) + hqqlora.delta_weight(p2)
    assert codes_equal(merged, hqqlora.quantize_like(W, layer, layer.bias))
    assert merged.quant_config == layer.quant_config and merged.compute_dtype == dtype
    assert merged.offload_meta == layer.offload_meta and merged.device == layer.device
    if bias:
        assert torch.equal(merged.bias, layer.bias)
    else:
        assert merged.bias is None


def test_merged_layer_carries_the_delta_at_8_bits():
    layer = make_layer(nbits=8, group_size=64)
    p = random_adapter(layer, scaling=20.0)
    merged = hqqlora.merge(layer, p, warn=False)
    expected = hqqlora.dequantize(layer) + hqqlora.delta_weight(p)
    err = (hqqlora.dequantize(merged) - expected).norm() / hqqlora.delta_weight(p).norm()
    assert err < 0.2


def test_dora_merge_is_c_times_w_plus_delta():
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    W = hqqlora.dequantize(layer).double()
    dW = hqqlora.delta_weight(p).double()
    c = p["magnitude"].double() / torch.linalg.norm(W + dW, dim=1)
    torch.testing.assert_close(hqqlora.merged_weight(layer, p).double(), c[:, None] * (W + dW))
    merged = hqqlora.merge(layer, p, warn=False)
    assert codes_equal(
        merged, hqqlora.quantize_like(hqqlora.merged_weight(layer, p), layer, layer.bias)
    )


def test_sequence_merge_applies_in_order_with_norms_from_the_base():
    layer = make_layer()
    p1, p2 = random_adapter(layer, seed=1), random_adapter(layer, dora=True, seed=2)
    W = hqqlora.dequantize(layer).double()
    d1, d2 = hqqlora.delta_weight(p1).double(), hqqlora.delta_weight(p2).double()
    c2 = p2["magnitude"].double() / torch.linalg.norm(W + d2, dim=1)
    torch.testing.assert_close(
        hqqlora.merged_weight(layer, [p1, p2]).double(), c2[:, None] * (W + d1 + d2)
    )


def test_unmerge_is_last_in_first_out_with_one_requantization():
    layer = make_layer()
    p1, p2 = random_adapter(layer, seed=1), random_adapter(layer, dora=True, seed=2)
    n2 = hqqlora.dora_weight_norm(layer, p2)
    merged = hqqlora.merge(layer, [p1, p2], warn=False)
    before = snapshot(merged)
    un = hqqlora.unmerge(merged, [p1, p2], weight_norm=[None, n2])
    assert_unchanged(merged, before)
    c2 = (p2["magnitude"] / n2)[:, None]
    W = (hqqlora.dequantize(merged) / c2 - hqqlora.delta_weight(p2)) - hqqlora.delta_weight(p1)
    assert codes_equal(un, hqqlora.quantize_like(W, merged, merged.bias))
    assert torch.equal(un.bias, layer.bias)


def test_unmerge_of_dora_needs_the_weight_norm():
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    merged = hqqlora.merge(layer, p, warn=False)
    with pytest.raises(ValueError, match="Expected `weight_norm` for DoRA adapter 0"):
        hqqlora.unmerge(merged, p)


def test_safe_merge_rejects_non_finite_and_changes_nothing():
    layer = make_layer()
    p = random_adapter(layer)
    p["lora_B"][0, 0] = float("nan")
    before = snapshot(layer)
    with pytest.raises(ValueError, match="Expected finite merged weights, got 64 NaN/inf entries"):
        hqqlora.merge(layer, p, safe_merge=True)
    assert_unchanged(layer, before)
    assert torch.isnan(p["lora_B"][0, 0])


def test_merge_rejects_non_hqq_base():
    with pytest.raises(TypeError, match="Expected `base` to be an hqq.core.quantize.HQQLinear"):
        hqqlora.merge(torch.nn.Linear(64, 48), random_adapter(make_layer()))


@given(
    nbits=st.sampled_from((2, 3, 4, 8)),
    dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)),
    bias=st.booleans(),
    dora=st.booleans(),
    r=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_property_merge_never_mutates_its_inputs(nbits, dtype, bias, dora, r, seed):
    layer = make_layer(32, 16, nbits=nbits, dtype=dtype, bias=bias, seed=seed)
    p = random_adapter(layer, r=r, dora=dora, seed=seed)
    p_before = {k: v.clone() for k, v in p.items()}
    before = snapshot(layer)
    merged = hqqlora.merge(layer, p, warn=False)
    kw = {"weight_norm": hqqlora.dora_weight_norm(layer, p)} if dora else {}
    hqqlora.unmerge(merged, p, **kw)
    assert_unchanged(layer, before)
    assert all(torch.equal(p[k], p_before[k]) for k in p)
