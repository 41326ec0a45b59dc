import copy
import gc
import weakref

import pytest
import torch
from helpers import BITS, DTYPES, make_layer, random_adapter
from hypothesis import given
from hypothesis import strategies as st

import hqqlora

METHODS = ("requantize", "same_grid", "zero_point")


def snapshot(layer):
    """Everything a layer holds, copied: W_q, every meta entry (tensors cloned), bias, config."""
    return {
        "W_q": layer.W_q.detach().clone(),
        "meta": {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in layer.meta.items()
        },
        "bias": None if layer.bias is None else layer.bias.detach().clone(),
        "config": repr(layer.quant_config),
        "settings": (layer.offload_meta, layer.compute_dtype, layer.device),
    }


def assert_unchanged(layer, before):
    """``layer`` still holds ``before`` bitwise: W_q, scale, zero, zero_scale, bias, config."""
    after = snapshot(layer)
    assert torch.equal(after["W_q"], before["W_q"])
    assert after["meta"].keys() == before["meta"].keys()
    for k, v in before["meta"].items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == after["meta"][k].dtype and torch.equal(after["meta"][k], v), k
        else:
            assert after["meta"][k] == v, k
    assert (after["bias"] is None) == (before["bias"] is None)
    if before["bias"] is not None:
        assert torch.equal(after["bias"], before["bias"])
    assert after["config"] == before["config"] and after["settings"] == before["settings"]


def test_snapshot_sees_every_tensor():
    # The guard itself: a change to any meta tensor or to the bias must show.
    layer = make_layer()
    for key in ("scale", "zero"):
        before = snapshot(layer)
        layer.meta[key] = layer.meta[key].clone()
        layer.meta[key].view(-1)[0] += 1
        with pytest.raises(AssertionError):
            assert_unchanged(layer, before)
    before = snapshot(layer)
    layer.bias = layer.bias.clone()
    layer.bias[0] += 1
    with pytest.raises(AssertionError):
        assert_unchanged(layer, before)


def codes_equal(a, b):
    return (
        torch.equal(a.W_q, b.W_q)
        and torch.equal(a.meta["scale"], b.meta["scale"])
        and torch.equal(a.meta["zero"], b.meta["zero"])
    )


def group_constant_adapter(layer, r=4, seed=1, dora=False):
    gen = torch.Generator().manual_seed(seed)
    return hqqlora.init_lora(
        layer, r, 8, init_lora_weights=False, group_constant=True, generator=gen, use_dora=dora
    )


def adapter_for(method, layer, **kw):
    """An adapter every ``method`` can merge (zero_point needs a group-constant one)."""
    if method == "zero_point":
        return group_constant_adapter(layer, **kw)
    return random_adapter(layer, **kw)


def rms(t):
    return float(t.double().pow(2).mean().sqrt())


def steps(layer):
    """Each weight's quantization step ``(out, in)``, float64, from HQQ's meta (axis=1)."""
    out_features, in_features = layer.meta["shape"]
    return (
        layer.meta["scale"]
        .double()
        .abs()
        .expand(-1, layer.meta["group_size"])
        .reshape(out_features, in_features)
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


def test_unmerged_weight_undoes_the_sequence_last_in_first_out():
    layer = make_layer()
    merged = make_layer(seed=5)  # any layer: unmerged_weight is dense arithmetic on it
    p1, p2 = random_adapter(layer, seed=1, dora=True), random_adapter(layer, seed=2, dora=True)
    n1, n2 = torch.rand(48) + 1, torch.rand(48) + 1
    M = merged.dequantize().double()
    d1, d2 = hqqlora.delta_weight(p1).double(), hqqlora.delta_weight(p2).double()
    c1, c2 = p1["magnitude"].double() / n1.double(), p2["magnitude"].double() / n2.double()
    expected = (M / c2[:, None] - d2) / c1[:, None] - d1
    got = hqqlora.unmerged_weight(merged, [p1, p2], weight_norm=[n1, n2])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_unmerge_of_dora_needs_the_weight_norm():
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    merged = hqqlora.merge(layer, p, warn=False)
    with pytest.raises(ValueError, match="Expected `weight_norm` for DoRA adapter 0"):
        hqqlora.unmerge(merged, p)


def _break(p, where, value):
    p = {k: v.clone() for k, v in p.items()}
    if where == "scaling":
        p["scaling"] = torch.tensor(value)
    else:
        p[where].view(-1)[0] = value
    return p


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("lora_B", float("nan")),
        ("lora_A", float("inf")),
        ("scaling", float("nan")),
        ("magnitude", float("nan")),
        ("magnitude", float("inf")),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_update_raises_for_every_method_and_changes_nothing(
    method, where, value, safe_merge
):
    layer = make_layer()
    p = _break(adapter_for(method, layer, dora=where == "magnitude"), where, value)
    p_before = {k: v.clone() for k, v in p.items()}
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"Expected finite updates to merge, got NaN/inf .* \[0\]"):
        hqqlora.merge(layer, p, method=method, safe_merge=safe_merge, warn=False)
    assert_unchanged(layer, before)
    for k in p:  # the adapter too, NaN and all
        torch.testing.assert_close(p[k], p_before[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_update_in_a_sequence_names_the_adapter(method):
    layer = make_layer()
    good, bad = adapter_for(method, layer, seed=1), adapter_for(method, layer, seed=2)
    bad = _break(bad, "lora_B", float("nan"))
    with pytest.raises(ValueError, match=r"in the update of adapter\(s\) \[1\]"):
        hqqlora.merge(layer, [good, bad], method=method, warn=False)


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_of_a_non_finite_update_raises(method):
    layer = make_layer()
    p = adapter_for(method, layer, dora=True)
    n = hqqlora.dora_weight_norm(layer, p)
    merged = hqqlora.merge(layer, p, method=method, warn=False)
    before = snapshot(merged)
    bad_norms = {"nan": n.clone(), "zero": n.clone()}
    bad_norms["nan"][3] = float("nan")
    bad_norms["zero"][3] = 0.0  # c = m / 0 = inf
    for bad in bad_norms.values():  # refused by the weight_norm check, before any update
        with pytest.raises(ValueError, match=r"positive finite entries"):
            hqqlora.unmerge(merged, p, weight_norm=bad, method=method)
    zero_magnitude = {**p, "magnitude": p["magnitude"].clone()}
    zero_magnitude["magnitude"][3] = 0.0  # c = 0: W / c is not finite
    with pytest.raises(ValueError, match=r"Expected finite updates to unmerge"):
        hqqlora.unmerge(merged, zero_magnitude, weight_norm=n, method=method)
    with pytest.raises(ValueError, match=r"Expected finite updates to unmerge"):
        hqqlora.unmerge(merged, _break(p, "lora_B", float("nan")), weight_norm=n, method=method)
    assert_unchanged(merged, before)


def test_safe_merge_rejects_a_finite_update_that_overflows():
    # An fp16 layer and a float32 update of 1e5 in one entry: the update and the dense
    # float32 merged weight are finite, the fp16 weight the layer holds is not.
    layer = make_layer(dtype=torch.float16)
    p = random_adapter(layer)
    p["lora_B"] = torch.zeros_like(p["lora_B"])
    p["lora_B"][0, 0] = 1e5 / float(p["lora_A"][0, 0] * p["scaling"])
    before = snapshot(layer)
    # The update is finite: without safe_merge there is nothing to refuse.
    merged = hqqlora.merge(layer, p, warn=False)
    bad = int((~torch.isfinite(merged.dequantize())).sum())
    assert bad > 0
    with pytest.raises(ValueError, match=rf"Expected finite merged weights, got {bad} NaN/inf"):
        hqqlora.merge(layer, p, safe_merge=True, warn=False)
    assert_unchanged(layer, before)


def test_safe_merge_rejects_zero_points_that_overflow():
    # A group-constant update of 1e5: z' = z - 1e5/s overflows the fp16 zero points.
    layer = make_layer(dtype=torch.float16)
    p = group_constant_adapter(layer)
    p["lora_B"] = torch.zeros_like(p["lora_B"])
    p["lora_B"][0, 0] = 1e5 / float(p["lora_A"][0, 0] * p["scaling"])
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"Expected finite merged weights"):
        hqqlora.merge(layer, p, method="zero_point", safe_merge=True)
    assert_unchanged(layer, before)


def _trainable(p):
    leaves = {k: torch.nn.Parameter(v.clone()) for k, v in p.items() if k != "scaling"}
    return {**leaves, "scaling": p["scaling"].clone()}


def layer_tensors(layer):
    tensors = {"W_q": layer.W_q, "bias": layer.bias}
    tensors.update({k: v for k, v in layer.meta.items() if isinstance(v, torch.Tensor)})
    return {k: v for k, v in tensors.items() if v is not None}


def assert_plain_data(layer):
    for name, t in layer_tensors(layer).items():
        assert not t.requires_grad and t.grad_fn is None, name
    copy.deepcopy(layer)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_merge_of_trainable_adapters_is_plain_data(method, dora):
    layer = make_layer()
    p = _trainable(adapter_for(method, layer, dora=dora))
    n = hqqlora.dora_weight_norm(layer, p) if dora else None
    refs = [weakref.ref(v) for k, v in p.items() if k != "scaling"]
    merged = hqqlora.merge(layer, p, method=method, warn=False)
    unmerged = hqqlora.unmerge(merged, p, method=method, weight_norm=n)
    assert_plain_data(merged)
    assert_plain_data(unmerged)
    del p, n
    gc.collect()
    assert all(ref() is None for ref in refs)  # no graph keeps the adapter alive


def test_merge_of_a_trainable_bias_is_plain_data():
    layer = make_layer()
    layer.bias = torch.nn.Parameter(layer.bias.clone())
    merged = hqqlora.merge(layer, random_adapter(layer), warn=False)
    assert_plain_data(merged)
    assert torch.equal(merged.bias, layer.bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_requantize_round_trip_carries_and_removes_the_update(nbits, dtype):
    """merge lands on W + ΔW and unmerge on W, within rounding to the nearest step."""
    base = make_layer(nbits=nbits, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 64, generator=gen), torch.randn(48, 4, generator=gen)
    # An update of 4 quantization steps (rms), so that losing it shows.
    p = {"lora_A": A, "lora_B": B, "scaling": torch.tensor(4 * rms(steps(base)) / rms(B @ A))}
    W, D = base.dequantize().double(), (B @ A).double() * p["scaling"].double()
    merged = hqqlora.merge(base, p, warn=False)
    unmerged = hqqlora.unmerge(merged, p)
    M, U = merged.dequantize().double(), unmerged.dequantize().double()
    # Rounding to the nearest step errs by at most half a step (rms <= step/2), plus the
    # compute dtype's rounding of the result.
    eps = torch.finfo(dtype).eps
    half_m = 0.5 * rms(steps(merged)) + eps * rms(W + D)
    half_u = 0.5 * rms(steps(unmerged)) + eps * rms(W)
    assert rms(M - (W + D)) <= half_m
    assert rms(U - (M - D)) <= half_u
    assert rms(U - W) <= half_m + half_u
    # The bounds can tell: a merge or unmerge that ignored the update would be off by D.
    assert rms(D) > 1.5 * max(half_m, half_u)


@pytest.mark.parametrize("dtype", DTYPES)
def test_requantize_round_trip_at_one_bit(dtype):
    """At 1 bit a group-constant update keeps each group on two levels: requantizing holds it."""
    base = make_layer(nbits=1, dtype=dtype)
    p = group_constant_adapter(base)
    step = rms(steps(base))
    # An update of 3 steps (rms): losing it shows.
    p["lora_B"] = p["lora_B"] * (3 * step / rms(hqqlora.delta_weight(p)))
    W, D = base.dequantize().double(), hqqlora.delta_weight(p, in_features=64).double()
    merged = hqqlora.merge(base, p, warn=False)
    unmerged = hqqlora.unmerge(merged, p)
    M, U = merged.dequantize().double(), unmerged.dequantize().double()
    # Exact but for the compute dtype's rounding of values of size ~ one step.
    tol = 4 * torch.finfo(dtype).eps * (step + rms(D))
    assert rms(M - (W + D)) <= tol
    assert rms(U - W) <= 2 * tol


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


def test_merge_report_refuses_a_non_finite_adapter_with_a_given_merged_layer():
    layer = make_layer()
    p = random_adapter(layer)
    merged = hqqlora.merge(layer, p, warn=False)
    broken = {**p, "lora_B": p["lora_B"].clone()}
    broken["lora_B"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        hqqlora.merge_report(layer, broken, merged=merged)
