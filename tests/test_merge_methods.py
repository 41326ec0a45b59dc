"""merge/unmerge methods, merge_report and group-constant adapters, against float64 references."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_layer, random_adapter
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_merge import assert_unchanged, snapshot

from hqqlora import (
    apply_lora,
    check_params,
    delta_weight,
    dequantize,
    dora_weight_norm,
    expand_group_constant,
    init_lora,
    merge,
    merge_report,
    quant_layout,
    trainable_params,
    unmerge,
)
from hqqlora._merge import grid

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def hqq_codes(layer):
    """The codes in HQQ's grouped layout, float64, unpacked by HQQ's own functions."""
    meta = layer.meta
    codes = Quantizer.unpack[meta["packing"]](layer.W_q, dtype=torch.float64)
    if meta["nbits"] == 3:
        codes = codes[: meta["shape"][0] * meta["shape"][1] // meta["group_size"]]
    return codes


def as_double(p):
    return {k: v.double() for k, v in p.items()}


def grouped(weight, layer):
    layout = quant_layout(layer)
    view = (-1, layout.group_size) if layout.axis == 1 else (layout.group_size, -1)
    return weight.reshape(view)


def group_constant_adapter(layer, r=4, seed=1, dora=False, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    p = init_lora(
        layer, r, 8, init_lora_weights=False, group_constant=True, generator=gen, use_dora=dora
    )
    p["lora_B"] = p["lora_B"] * scale
    if dora:
        p["magnitude"] = p["magnitude"] * (
            1 + 0.1 * torch.rand(p["magnitude"].shape, generator=gen)
        )
    return p


# ---- same_grid --------------------------------------------------------------------


@settings(max_examples=15)
@given(
    nbits=st.sampled_from((1, 2, 3, 4, 8)),
    axis=st.sampled_from((0, 1)),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from((0.1, 1.0, 5.0)),
    seed=st.integers(0, 2**16),
)
def test_same_grid_roundtrip_restores_codes_outside_clamps(nbits, axis, dtype, scale, seed):
    base = make_layer(48, 32, nbits=nbits, group_size=16, axis=axis, dtype=dtype, seed=seed)
    p = random_adapter(base, scaling=scale, seed=seed + 1)
    snap = snapshot(base)
    merged = merge(base, p, method="same_grid", warn=False)
    assert_unchanged(base, snap)
    codes, s, z = grid(base)
    # Float64 reference of the merge on the base's own grid.
    target = (codes - z) * s + grouped(delta_weight(as_double(p)), base)
    ref = torch.round(target / s + z)
    top = round(2**nbits - 1)
    inside = (ref >= 0) & (ref <= top)
    merged_codes, s_m, z_m = grid(merged)
    assert torch.equal(s_m, s) and torch.equal(z_m, z)
    assert torch.equal(merged_codes, ref.clamp(0, top))
    assert merge_report(base, p, merged)["clamped"] == int((~inside).sum())
    unmerged = unmerge(merged, p, method="same_grid")
    back, _, _ = grid(unmerged)
    assert torch.equal(back[inside], codes[inside])
    assert torch.equal(unmerged.bias, base.bias)


def test_same_grid_sequence_roundtrip():
    base = make_layer(64, 32, nbits=4)
    ps = [random_adapter(base, scaling=0.3, seed=s) for s in (1, 2, 3)]
    merged = merge(base, ps, method="same_grid", warn=False)
    back = unmerge(merged, ps, method="same_grid")
    # Float64 reference from HQQ's own codes, scales and zeros (axis=1: groups of 16).
    codes, s, z = hqq_codes(base), base.meta["scale"].double(), base.meta["zero"].double()
    delta = sum(delta_weight(as_double(p)) for p in ps).reshape(-1, 16)
    ref = torch.round(((codes - z) * s + delta) / s + z)
    inside = (ref >= 0) & (ref <= 15)
    assert 0 < int((~inside).sum()) < inside.numel() // 10  # some clamp: both branches run
    assert merge_report(base, ps, merged)["clamped"] == int((~inside).sum())
    assert torch.equal(hqq_codes(merged), ref.clamp(0, 15))
    assert not torch.equal(hqq_codes(merged), codes)  # the update arrived
    assert torch.equal(hqq_codes(back)[inside], codes[inside])
    assert torch.equal(back.bias, base.bias)


def test_same_grid_keeps_layer_usable():
    base = make_layer(64, 32, nbits=4)
    merged = merge(base, random_adapter(base, scaling=0.5), method="same_grid", warn=False)
    x = torch.randn(3, 64)
    assert torch.allclose(merged(x), x @ dequantize(merged).T + merged.bias, atol=1e-5)


# ---- zero_point -------------------------------------------------------------------


@settings(max_examples=15)
@given(
    nbits=st.sampled_from((1, 2, 3, 4, 8)),
    dtype=st.sampled_from(DTYPES),
    group_size=st.sampled_from((8, 16, 64)),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_zero_point_merge_is_w_plus_delta(nbits, dtype, group_size, dora, seed):
    base = make_layer(64, 32, nbits=nbits, group_size=group_size, dtype=dtype, seed=seed)
    p = group_constant_adapter(base, seed=seed, dora=dora)
    snap = snapshot(base)
    merged = merge(base, p, method="zero_point")
    assert_unchanged(base, snap)
    assert torch.equal(merged.W_q, base.W_q)
    codes, s, z = grid(base)
    delta = grouped(delta_weight(as_double(p), in_features=64), base)
    expected = (codes - z) * s + delta
    if dora:
        c = p["magnitude"].double() / dora_weight_norm(base, p).double()
        expected = grouped(c[:, None] * expected.reshape(32, 64), base)
    _, s_m, z_m = grid(merged)
    actual = grouped(dequantize(merged).double(), base)
    # (codes - z')·s' in the zero dtype: a few roundings of |codes| + |z'| code units.
    eps = torch.finfo(dtype).eps
    tol = 4 * eps * (codes.abs() + z_m.abs() + 1) * s_m.abs()
    if dora:  # n is computed in the adapters' float32
        tol = tol + 1e-5 * expected.abs()
    assert ((actual - expected).abs() <= tol).all()
    report = merge_report(base, p, merged)
    assert abs(report["captured"] - 1) < 50 * eps
    assert report["rel_error"] < 200 * eps


def test_zero_point_unmerge_restores_the_layer():
    base = make_layer(64, 32, nbits=3)
    p = group_constant_adapter(base, dora=True)
    n = dora_weight_norm(base, p)
    merged = merge(base, p, method="zero_point")
    back = unmerge(merged, p, method="zero_point", weight_norm=n)
    assert torch.equal(back.W_q, base.W_q)
    torch.testing.assert_close(back.meta["zero"], base.meta["zero"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.meta["scale"], base.meta["scale"], rtol=1e-6, atol=0)
    torch.testing.assert_close(dequantize(back), dequantize(base), rtol=0, atol=1e-5)


def test_zero_point_rejects_a_delta_that_is_not_group_constant():
    base = make_layer(64, 32)
    snap = snapshot(base)
    with pytest.raises(ValueError, match="constant within each quantization group"):
        merge(base, random_adapter(base), method="zero_point")
    assert_unchanged(base, snap)


def test_zero_point_accepts_an_expanded_group_constant_adapter():
    base = make_layer(64, 32)
    p = expand_group_constant(group_constant_adapter(base), 64)
    assert p["lora_A"].shape == (4, 64)
    merged = merge(base, p, method="zero_point")
    assert merge_report(base, p, merged)["captured"] == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize(
    ("axis", "in_features", "group_size"), [(0, 64, 16), (1, 48, 32)], ids=["axis0", "ragged"]
)
def test_zero_point_rejects_layouts(axis, in_features, group_size):
    base = make_layer(in_features, 48, group_size=group_size, axis=axis)
    p = random_adapter(base)
    with pytest.raises(ValueError, match=r"Expected an axis=1 layer whose group size divides"):
        merge(base, p, method="zero_point")
    with pytest.raises(ValueError, match=r"Expected an axis=1 layer whose group size divides"):
        unmerge(base, p, method="zero_point")


# ---- merge_report and the warning -------------------------------------------------


def test_captured_is_zero_far_below_one_step():
    base = make_layer(64, 32, nbits=2)
    p = random_adapter(base, scaling=1e-3)
    report = merge_report(base, p, method="same_grid")
    assert report["step_ratio"] < 0.05
    assert report["captured"] == 0.0
    assert report["rel_error"] == pytest.approx(1.0)
    assert abs(merge_report(base, p)["captured"]) < 0.3  # requantize: noise, not the delta
    with pytest.warns(UserWarning, match=r"captured=-?0\.000"):
        merge(base, p, method="same_grid")


def test_report_keys_and_no_warning_when_kept():
    base = make_layer(64, 32, nbits=8)
    p = random_adapter(base, scaling=4.0)
    report = merge_report(base, p)
    assert set(report) == {"captured", "rel_error", "delta_norm", "step_ratio", "clamped", "numel"}
    assert report["captured"] > 0.9
    assert report["delta_norm"] == pytest.approx(float(torch.linalg.norm(delta_weight(p).double())))
    merge(base, p)  # no warning (filterwarnings=error would fail)


def test_report_of_zero_adapter_is_nan_and_silent():
    base = make_layer(64, 32, nbits=2)
    report = merge_report(base, init_lora(base, 4))
    assert report["delta_norm"] == 0
    assert report["captured"] != report["captured"]  # NaN
    merge(base, init_lora(base, 4))


def test_report_rejects_a_merged_layer_of_another_shape():
    base = make_layer(64, 32)
    with pytest.raises(ValueError, match=r"Expected `merged` of weight shape"):
        merge_report(base, random_adapter(base), make_layer(32, 64))


def test_unknown_method():
    base = make_layer(64, 32)
    with pytest.raises(ValueError, match=r"Expected `method` in"):
        merge(base, random_adapter(base), method="nearest")
    with pytest.raises(ValueError, match=r"Expected `method` in"):
        unmerge(base, random_adapter(base), method="nearest")


def test_report_takes_merged_by_name_or_position():
    base = make_layer(64, 32, nbits=8)
    p = random_adapter(base, scaling=4.0)
    merged = merge(base, p, method="same_grid")
    by_name = merge_report(base, p, merged=merged)
    assert by_name == merge_report(base, p, merged)
    assert by_name != merge_report(base, p)  # merges with "requantize" itself
    with pytest.raises(TypeError):
        merge_report(base=base, params=p)  # the layer and adapters stay positional-only


def _update_capturing(base, share):
    """A same_grid update (as a rank-in adapter) of which about ``share`` survives.

    On a grid point, an entry of one step moves its code by one (it all arrives); an
    entry of 0.3 step rounds back (nothing arrives). With a fraction ρ of whole-step
    entries, captured ≈ ρ / (ρ + 0.09 (1 - ρ)).
    """
    out_features, in_features = base.meta["shape"]
    codes = hqq_codes(base)  # (groups, 16) for axis=1
    s = base.meta["scale"].double()
    rho = 0.09 * share / (1 - share + 0.09 * share)
    gen = torch.Generator().manual_seed(0)
    whole = torch.rand(codes.shape, generator=gen, dtype=torch.float64) < rho
    sign = torch.where(codes < 2 ** base.meta["nbits"] - 1, 1.0, -1.0).double()
    delta = (sign * s * torch.where(whole, 1.0, 0.3)).reshape(out_features, in_features)
    return {
        "lora_A": torch.eye(in_features),
        "lora_B": delta.float(),
        "scaling": torch.tensor(1.0),
    }


def measured_captured(base, merged, p):
    """⟨M - W, ΔW⟩ / ‖ΔW‖² in float64, from HQQ's own dequantization."""
    W, M = base.dequantize().double(), merged.dequantize().double()
    delta = (p["lora_B"].double() @ p["lora_A"].double()) * float(p["scaling"])
    return float(((M - W) * delta).sum() / (delta * delta).sum())


def test_merge_warns_below_half_captured_and_not_above():
    base = make_layer(64, 48, nbits=4)
    low, high = _update_capturing(base, 0.3), _update_capturing(base, 0.7)
    with pytest.warns(UserWarning, match=r"merge kept only .* \(captured=0\.[23]"):
        merged = merge(base, low, method="same_grid")
    assert 0.2 < measured_captured(base, merged, low) < 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merge(base, high, method="same_grid")
    assert 0.6 < measured_captured(base, merged, high) < 0.8


def test_report_step_ratio_and_numel():
    base = make_layer(64, 32, nbits=3)
    p = random_adapter(base, scaling=1.5)
    report = merge_report(base, p)
    delta = (p["lora_B"].double() @ p["lora_A"].double()) * 1.5
    step = base.meta["scale"].double().abs().median()
    assert report["step_ratio"] == pytest.approx(float(delta.abs().max() / step), rel=1e-6)
    assert report["numel"] == 64 * 32


def view_as_float_pair(nbits, dtype):
    """The same weight quantized by HQQ with W_q stored viewed as ``dtype``, and without."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(32, 64, generator=gen) / 8, torch.randn(32, generator=gen)
    layers = []
    for view_as_float in (True, False):
        linear = torch.nn.Linear(64, 32)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        config = BaseQuantizeConfig(nbits=nbits, group_size=16, view_as_float=view_as_float)
        layers.append(HQQLinear(linear, config, compute_dtype=dtype, device="cpu"))
    return tuple(layers)


@pytest.mark.parametrize("method", ["requantize", "same_grid", "zero_point"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", [1, 3, 4])
def test_merges_keep_w_q_viewed_as_float(nbits, dtype, method):
    viewed, plain = view_as_float_pair(nbits, dtype)
    assert viewed.W_q.dtype == dtype
    p = group_constant_adapter(plain, scale=3.0)
    merged = merge(viewed, p, method=method, warn=False)
    expected = merge(plain, p, method=method, warn=False)
    assert merged.W_q.dtype == dtype and merged.meta["view_as_float"]
    assert torch.equal(merged.dequantize(), expected.dequantize())
    back = unmerge(merged, p, method=method)
    assert back.W_q.dtype == dtype
    assert torch.equal(back.dequantize(), unmerge(expected, p, method=method).dequantize())


# ---- group-constant adapters ------------------------------------------------------


def test_group_constant_init_shapes_and_equivalence():
    base = make_layer(64, 32, group_size=16)
    p = init_lora(base, 4, group_constant=True, init_lora_weights=False)
    assert p["lora_A"].shape == (4, 4)
    check_params(p, in_features=64, out_features=32, group_size=16)
    full = expand_group_constant(p, 64)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(apply_lora(base, p, x), apply_lora(base, full, x))
    delta = delta_weight(p, in_features=64)
    torch.testing.assert_close(delta, delta_weight(full))
    assert torch.equal(
        delta.reshape(32, 4, 16), delta.reshape(32, 4, 16)[..., :1].expand(-1, -1, 16)
    )
    dora = init_lora(base, 4, group_constant=True, use_dora=True)
    torch.testing.assert_close(dora["magnitude"], torch.linalg.norm(dequantize(base), dim=1))
    torch.testing.assert_close(apply_lora(base, dora, x), base(x))


def test_group_constant_init_scale_matches_plain_lora():
    base = make_layer(256, 8, group_size=64)
    gen = torch.Generator().manual_seed(0)
    A = init_lora(base, 64, group_constant=True, generator=gen)["lora_A"]
    assert A.abs().max() <= 1 / 256**0.5
    assert A.abs().max() > 0.8 / 256**0.5


def test_group_constant_rejects_layouts():
    with pytest.raises(ValueError, match=r"group_constant=True"):
        init_lora(make_layer(64, 32, axis=0), 4, group_constant=True)
    base = make_layer(64, 32, group_size=16)
    bad = {"lora_A": torch.zeros(4, 8), "lora_B": torch.zeros(32, 4), "scaling": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"lora_A'\]` of shape \(r, 64\) to fit the layer"):
        apply_lora(base, bad, torch.randn(2, 64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_trained_group_constant_adapter_merges_losslessly(dtype):
    base = make_layer(64, 32, nbits=2, group_size=16, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    params = init_lora(base, 4, 16, group_constant=True, generator=gen)
    x = torch.randn(32, 64, generator=gen)
    y = torch.randn(32, 32, generator=gen)

    def loss(trainable):
        out = apply_lora(base, {**params, **trainable}, x)
        return torch.mean((out.float() - y) ** 2)

    trainable = trainable_params(params)
    for _ in range(5):
        grads = torch.func.grad(loss)(trainable)
        trainable = {k: v - 0.1 * grads[k] for k, v in trainable.items()}
    trained = {**params, **trainable}
    assert trained["lora_B"].abs().max() > 0
    merged = merge(base, trained, method="zero_point")
    expected = apply_lora(base, trained, x).double()
    actual = merged(x.to(dtype)).double()
    scale = expected.abs().max()
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    assert (actual - expected).abs().max() <= tol * scale
    assert merge_report(base, trained, merged)["captured"] == pytest.approx(1, abs=10 * tol)
