"""Layers with ``offload_meta=True``, built on the CPU by HQQ's own code path.

HQQ keeps such a layer's scale and zero stacked in ``meta["zero_scale"]`` and pins
that tensor with ``Tensor.pin_memory``, which needs CUDA. Pinning only page-locks
host memory; the values are the same. The fixture below makes it the identity while
a test runs, so that HQQ itself builds (and, in merges, rebuilds) the offloaded
layout on a CPU-only machine.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import BITS, DTYPES, random_adapter
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from test_merge import METHODS, adapter_for, assert_plain_data, assert_unchanged, snapshot

import hqqlora


@pytest.fixture
def cpu_pinning(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)


def layer_pair(*, nbits=4, dtype=torch.float32, axis=1, bias=True, seed=0):
    """``(offloaded, plain)``: the same weight quantized by HQQ with and without offload_meta."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 64, generator=gen) / 8
    b = torch.randn(48, generator=gen) * 0.1 if bias else None
    layers = []
    for offload in (True, False):
        linear = torch.nn.Linear(64, 48, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias:
                linear.bias.copy_(b)
        config = BaseQuantizeConfig(nbits=nbits, group_size=16, axis=axis, offload_meta=offload)
        layers.append(HQQLinear(linear, config, compute_dtype=dtype, device="cpu"))
    return tuple(layers)


def assert_offloaded(layer):
    assert layer.offload_meta is True
    assert "zero_scale" in layer.meta and "scale" not in layer.meta and "zero" not in layer.meta
    assert layer.meta["zero_scale"].device.type == "cpu"


@pytest.mark.usefixtures("cpu_pinning")
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", BITS)
def test_offloaded_layer_reads_as_the_plain_one(nbits, dtype, axis):
    off, plain = layer_pair(nbits=nbits, dtype=dtype, axis=axis)
    assert_offloaded(off)
    assert plain.offload_meta is False and "zero_scale" not in plain.meta
    assert torch.equal(hqqlora.dequantize(off), plain.dequantize())
    assert torch.equal(hqqlora.dequantize(off), off.dequantize())
    p = random_adapter(plain, dora=True)
    x = torch.randn(3, 64)
    assert torch.equal(hqqlora.apply_lora(off, p, x), hqqlora.apply_lora(plain, p, x))
    assert torch.equal(hqqlora.dora_weight_norm(off, p), hqqlora.dora_weight_norm(plain, p))


@pytest.mark.usefixtures("cpu_pinning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_like_keeps_offload_meta(dtype):
    off, plain = layer_pair(dtype=dtype)
    W = hqqlora.dequantize(plain).float() + 0.01
    new_off = hqqlora.quantize_like(W, off, off.bias)
    new_plain = hqqlora.quantize_like(W, plain, plain.bias)
    assert_offloaded(new_off)
    assert new_off.quant_config == off.quant_config and new_off.compute_dtype == dtype
    assert torch.equal(new_off.W_q, new_plain.W_q)
    assert torch.equal(new_off.meta["zero_scale"][0], new_plain.meta["zero"])
    assert torch.equal(new_off.meta["zero_scale"][1], new_plain.meta["scale"])
    assert torch.equal(new_off.bias, plain.bias)


@pytest.mark.usefixtures("cpu_pinning")
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unmerge_keep_offload_meta_and_the_numbers(method, dtype, dora):
    off, plain = layer_pair(nbits=3, dtype=dtype)
    p = adapter_for(method, plain, dora=dora)
    n = hqqlora.dora_weight_norm(plain, p) if dora else None
    before = snapshot(off)
    merged = hqqlora.merge(off, p, method=method, warn=False)
    assert_unchanged(off, before)
    expected = hqqlora.merge(plain, p, method=method, warn=False)
    assert_offloaded(merged)
    assert merged.quant_config == off.quant_config and merged.compute_dtype == dtype
    assert torch.equal(merged.bias, off.bias)
    assert torch.equal(hqqlora.dequantize(merged), hqqlora.dequantize(expected))
    assert torch.equal(merged.dequantize(), expected.dequantize())  # HQQ's own reading
    assert not torch.equal(hqqlora.dequantize(merged), hqqlora.dequantize(off))

    before = snapshot(merged)
    unmerged = hqqlora.unmerge(merged, p, method=method, weight_norm=n)
    assert_unchanged(merged, before)
    assert_offloaded(unmerged)
    expected_back = hqqlora.unmerge(expected, p, method=method, weight_norm=n)
    assert torch.equal(hqqlora.dequantize(unmerged), hqqlora.dequantize(expected_back))
    assert torch.equal(unmerged.bias, off.bias)

    report = hqqlora.merge_report(off, p, merged)
    assert report == hqqlora.merge_report(plain, p, expected)
    assert report == hqqlora.merge_report(off, p, method=method)


@pytest.mark.usefixtures("cpu_pinning")
@pytest.mark.parametrize("method", METHODS)
def test_offloaded_merge_of_trainable_adapters_is_plain_data(method):
    off, _ = layer_pair()
    p = adapter_for(method, off, dora=True)
    p = {k: torch.nn.Parameter(v) if k != "scaling" else v for k, v in p.items()}
    n = hqqlora.dora_weight_norm(off, p)
    ref = weakref.ref(p["lora_B"])
    merged = hqqlora.merge(off, p, method=method, warn=False)
    unmerged = hqqlora.unmerge(merged, p, method=method, weight_norm=n)
    assert_plain_data(merged)
    assert_plain_data(unmerged)
    del p, n
    gc.collect()
    assert ref() is None


@pytest.mark.usefixtures("cpu_pinning")
def test_snapshot_sees_the_stacked_zero_scale():
    off, _ = layer_pair()
    before = snapshot(off)
    off.meta["zero_scale"] = off.meta["zero_scale"].clone()
    off.meta["zero_scale"][1, 0] += 1
    with pytest.raises(AssertionError):
        assert_unchanged(off, before)
