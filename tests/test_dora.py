"""The core's DoRA (apply_lora with magnitude, dora_weight_norm, merge/unmerge) against PEFT."""

from __future__ import annotations

import pytest
import torch
from helpers import BITS, DTYPES, assert_close_rel, dense_reference, make_layer, random_adapter
from peft import LoraConfig
from peft.tuners.lora.hqq import HqqLoraLinear as PeftHqq
from test_lora import assert_term_close

import hqqlora
from hqqlora import (
    apply_lora,
    base_forward,
    dequantize,
    dora_weight_norm,
    init_lora,
    merge,
    unmerge,
)


def _peft_dora(layer, r=4, lora_alpha=8, dropout=0.0):
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, use_dora=True, init_lora_weights=False, lora_dropout=dropout
    )
    return PeftHqq(layer, "a", config=config, r=r, lora_alpha=lora_alpha).eval()


def _params_of(peft, name="a"):
    return {
        "lora_A": peft.lora_A[name].weight.detach(),
        "lora_B": peft.lora_B[name].weight.detach(),
        "scaling": torch.tensor(peft.scaling[name]),
        "magnitude": peft.lora_magnitude_vector[name].weight.detach(),
    }


def _perturb_magnitude(peft):
    # PEFT initializes magnitude = n, which makes c = 1; move it so that DoRA matters.
    with torch.no_grad():
        m = peft.lora_magnitude_vector["a"].weight
        m.mul_(1 + 0.1 * torch.linspace(-1, 1, m.shape[0]))


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_weight_norm_match_peft(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = _peft_dora(layer)
    params = _params_of(peft)
    # PEFT's magnitude at init is exactly the weight norm
    torch.testing.assert_close(
        dora_weight_norm(layer, params), params["magnitude"], rtol=1e-6, atol=0
    )
    _perturb_magnitude(peft)
    params = _params_of(peft)
    x = torch.randn(4, 3, 64).to(dtype)
    with torch.no_grad():
        expected = peft(x)
    got = apply_lora(layer, params, x)
    cached = apply_lora(layer, params, x, weight_norm=dora_weight_norm(layer, params))
    assert got.dtype == expected.dtype
    assert_close_rel(got, expected, dtype)
    assert torch.equal(got, cached)
    assert_close_rel(got, dense_reference(layer, params, x), dtype, factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_lora_magnitude_is_the_row_norm(dtype):
    layer = make_layer(dtype=dtype)
    params = init_lora(
        layer,
        4,
        8,
        use_dora=True,
        init_lora_weights=False,
        generator=torch.Generator().manual_seed(0),
    )
    W = dequantize(layer).double()
    expected = torch.linalg.norm(
        W + params["scaling"].double() * params["lora_B"].double() @ params["lora_A"].double(),
        dim=1,
    )
    assert_close_rel(params["magnitude"], expected, torch.float32, factor=10)


@pytest.mark.parametrize(
    ("nbits", "dtype", "bias"),
    [
        (4, torch.float32, True),
        (8, torch.float32, False),
        (2, torch.float16, True),
        (3, torch.float32, True),
    ],
)
def test_merge_matches_peft_and_keeps_bias(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = _peft_dora(layer)
    _perturb_magnitude(peft)
    params = _params_of(peft)
    ours = merge(layer, params)
    peft.merge()
    W_peft, W_ours = dequantize(peft.base_layer).float(), dequantize(ours).float()
    step = (W_ours.max() - W_ours.min()).item() / 2**nbits
    # The same dense weight gives the same codes, up to rare rounding ties. In half precision
    # PEFT casts the merged weight to fp16 before quantizing (we quantize it unrounded), which
    # moves HQQ's optimized scale/zero of a few groups.
    allowed = 0.01 if dtype == torch.float32 else 0.05
    assert ((W_peft - W_ours).abs() > 1e-3 * step).float().mean().item() < allowed
    if bias:
        assert torch.equal(ours.bias, layer.bias)  # PEFT drops it


def test_unmerge_with_weight_norm_matches_peft():
    layer = make_layer(nbits=8)
    peft = _peft_dora(layer)
    _perturb_magnitude(peft)
    params = _params_of(peft)
    norm = dora_weight_norm(layer, params)
    merged = merge(layer, params)
    restored = unmerge(merged, params, weight_norm=norm)
    peft.merge()
    peft.unmerge()
    torch.testing.assert_close(dequantize(restored), dequantize(peft.base_layer), rtol=0, atol=1e-5)
    # 8 bits: the round trip lands near the original weight
    W = dequantize(layer)
    assert (dequantize(restored) - W).norm() / W.norm() < 0.02
    with pytest.raises(ValueError, match="weight_norm"):
        unmerge(merged, params)


def test_training_dropout_recomputes_base_term_as_peft():
    # With dropout, PEFT adds (c - 1) ⊙ (dropout(x) @ Wᵀ) + c ⊙ lora(dropout(x)); with p -> 0 in
    # the limit of an all-ones mask, both reduce to the eval formula. Check the formula with a
    # fixed mask by comparing against the float64 reference on the dropped input.
    layer = make_layer()
    peft = _peft_dora(layer)
    _perturb_magnitude(peft)
    params = _params_of(peft)
    x = torch.randn(6, 64)
    gen = torch.Generator().manual_seed(3)
    y = apply_lora(layer, params, x, dropout=0.3, generator=gen)
    keep = torch.bernoulli(torch.full_like(x, 0.7), generator=torch.Generator().manual_seed(3))
    xd = (x * keep / 0.7).double()
    W = dequantize(layer).double()
    A, B, s = params["lora_A"].double(), params["lora_B"].double(), params["scaling"].double()
    c = params["magnitude"].double() / torch.linalg.norm(W + s * B @ A, dim=1)
    expected = (
        x.double() @ W.T + layer.bias.double() + (c - 1) * (xd @ W.T) + c * s * (xd @ A.T @ B.T)
    )
    assert_close_rel(y, expected, torch.float32, factor=5)


@pytest.mark.parametrize("nbits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_away_from_init_matches_peft_and_reference(nbits, dtype, bias):
    # PEFT's init sets magnitude = n (c = 1), where every (c - 1) term vanishes. Move it to
    # m = n·(1 + 0.3·u), u ~ U(-1, 1), and compare the adapter term itself (output minus
    # base output): PEFT's random B makes it about as large as the base output.
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = _peft_dora(layer)
    with torch.no_grad():
        m = peft.lora_magnitude_vector["a"].weight
        u = 2 * torch.rand(m.shape, generator=torch.Generator().manual_seed(5)) - 1
        m.mul_(1 + 0.3 * u)
    params = _params_of(peft)
    n = dora_weight_norm(layer, params)
    assert ((params["magnitude"] / n - 1).abs().max()) > 0.2
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    with torch.no_grad():
        expected_peft = peft(x)
    y, y_base = apply_lora(layer, params, x), base_forward(layer, x)
    expected, expected_base = dense_reference(layer, params, x), dense_reference(layer, [], x)
    assert_term_close(y, y_base, expected, expected_base, dtype)
    # PEFT rounds on its own path: twice the tolerance of one computation.
    assert_term_close(y, y_base, expected_peft, y_base, dtype, factor=2)
    assert_term_close(expected_peft, y_base, expected, expected_base, dtype, factor=2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_weight_norm_must_be_positive_and_finite(bad):
    # n = ‖W + ΔW‖ row-wise: a zero gives c = inf, a negative entry flips the row's DoRA term.
    layer = make_layer()
    p = _params_of(_peft_dora(layer))
    n = dora_weight_norm(layer, p).clone()
    n[3] = bad
    before = n.clone()
    x = torch.randn(2, 64)
    merged = merge(layer, p)
    match = r"Expected `weight_norm\[0\]` with positive finite entries"
    with pytest.raises(ValueError, match=match):
        apply_lora(layer, p, x, weight_norm=n)
    with pytest.raises(ValueError, match=match):
        apply_lora(layer, [p], x, weight_norm=[n])
    with pytest.raises(ValueError, match=match):
        unmerge(merged, p, weight_norm=n)
    # Under vmap the whole batch of norms is checked.
    good = dora_weight_norm(layer, p)
    with pytest.raises(ValueError, match=match):
        torch.func.vmap(lambda nn: apply_lora(layer, p, x, weight_norm=nn))(torch.stack([good, n]))
    torch.testing.assert_close(n, before, rtol=0, atol=0, equal_nan=True)
    torch.func.vmap(lambda nn: apply_lora(layer, p, x, weight_norm=nn))(torch.stack([good, good]))


def test_weight_norm_on_the_meta_device_is_refused():
    layer = make_layer()
    p = _params_of(_peft_dora(layer))
    with pytest.raises(ValueError, match="meta device"):
        apply_lora(layer, p, torch.randn(2, 64), weight_norm=torch.ones(48, device="meta"))


def test_weight_norm_sequence_matches_adapters():
    layer = make_layer()
    dora = _params_of(_peft_dora(layer))
    lora = {k: v for k, v in dora.items() if k != "magnitude"}
    n = dora_weight_norm(layer, dora)
    x = torch.randn(2, 64)
    # None for the LoRA adapter; a tensor for the DoRA one.
    y = apply_lora(layer, [lora, dora], x, weight_norm=[None, n])
    torch.testing.assert_close(y, apply_lora(layer, [lora, dora], x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"one `weight_norm` entry per adapter \(2\), got 1"):
        apply_lora(layer, [lora, dora], x, weight_norm=[n])
    with pytest.raises(TypeError, match=r"`weight_norm\[1\]` to be a tensor or None, got float"):
        apply_lora(layer, [lora, dora], x, weight_norm=[None, 1.0])
    with pytest.raises(TypeError, match=r"`weight_norm` to be a tensor, None or a sequence"):
        apply_lora(layer, dora, x, weight_norm={"a": n})


def test_a_held_weight_norm_changed_in_place_is_checked_again():
    # Valid norms are remembered by identity and version counter (to spare the host
    # sync on every call); an in-place write must bring the check back.
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    n = hqqlora.dora_weight_norm(layer, p)
    x = torch.randn(3, 64)
    hqqlora.apply_lora(layer, p, x, weight_norm=n)
    hqqlora.apply_lora(layer, p, x, weight_norm=n)  # remembered: no second check needed
    n[5] = -1.0
    with pytest.raises(ValueError, match="positive finite entries"):
        hqqlora.apply_lora(layer, p, x, weight_norm=n)
    bank = hqqlora.stack_adapters({"a": p, "b": random_adapter(layer, seed=3)})
    norms = hqqlora.bank_weight_norm(layer, bank)
    hqqlora.mixed_batch_indexed(x[:2], bank, torch.tensor([0, 1]), base=layer, weight_norm=norms)
    norms[0, 2] = float("nan")
    with pytest.raises(ValueError, match="positive finite entries"):
        hqqlora.mixed_batch_indexed(
            x[:2], bank, torch.tensor([0, 1]), base=layer, weight_norm=norms
        )
