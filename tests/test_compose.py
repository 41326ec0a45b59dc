"""Composition of adapters: exactness, PEFT's merge definitions on hand-checked cases, errors."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from helpers import assert_close_rel, make_layer
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from hqqlora import add, combine, delta_weight, negate, scale
from hqqlora._compose import METHODS
from hqqlora.testing import adapters

LAYER = make_layer(32, 24, nbits=4, group_size=16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
LAYER_ADAPTER = {
    "lora_A": torch.randn(4, 32, generator=torch.Generator().manual_seed(3)),
    "lora_B": torch.randn(24, 4, generator=torch.Generator().manual_seed(4)),
    "scaling": torch.tensor(2.0),
}


def _adapter(A, B, scaling=1.0, dtype=torch.float64):
    return {
        "lora_A": torch.tensor(A, dtype=dtype),
        "lora_B": torch.tensor(B, dtype=dtype),
        "scaling": torch.tensor(scaling),
    }


def _dense(p):
    return p["lora_B"].double() @ p["lora_A"].double() * p["scaling"].double()


def _weighted_sum(ps, ws):
    return sum(w * _dense(p) for p, w in zip(ps, ws, strict=True))


def _options(method, density=1.0):
    return {"density": density} if method.removesuffix("_svd") in PRUNING else {}


def _clone(p):
    return {k: v.clone() for k, v in p.items()}


def _assert_same(p, q):
    assert p.keys() == q.keys()
    for k in p:
        assert torch.equal(p[k], q[k]), k


weights_st = st.floats(-2.0, 2.0, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


# --- exact operations ------------------------------------------------------------------------


@given(
    adapters(LAYER, dtypes=torch.float64, scalings=(0.5, 2.0)),
    adapters(LAYER, dtypes=torch.float64, scalings=(0.5, 2.0)),
)
def test_add_is_the_exact_sum(p1, p2):
    before = (_clone(p1), _clone(p2))
    q = add(p1, p2)
    assert q["lora_A"].shape[0] == p1["lora_A"].shape[0] + p2["lora_A"].shape[0]
    torch.testing.assert_close(_dense(q), _dense(p1) + _dense(p2), rtol=1e-12, atol=1e-14)
    _assert_same(p1, before[0])
    _assert_same(p2, before[1])


def test_add_keeps_equal_scalings_and_folds_different_ones():
    p1 = _adapter([[1.0, 2.0]], [[3.0], [4.0]], scaling=2.0)
    p2 = _adapter([[5.0, 6.0]], [[7.0], [8.0]], scaling=2.0)
    q = add(p1, p2)
    assert q["scaling"].item() == 2.0
    assert torch.equal(q["lora_B"], torch.tensor([[3.0, 7.0], [4.0, 8.0]], dtype=torch.float64))
    p2["scaling"] = torch.tensor(0.5)
    q = add(p1, p2)
    assert q["scaling"].item() == 1.0
    assert torch.equal(q["lora_B"], torch.tensor([[6.0, 3.5], [8.0, 4.0]], dtype=torch.float64))
    assert torch.equal(q["lora_A"], torch.tensor([[1.0, 2.0], [5.0, 6.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_in_low_precision(dtype):
    gen = torch.Generator().manual_seed(0)
    ps = [
        {
            "lora_A": torch.randn(3, 32, generator=gen).to(dtype),
            "lora_B": torch.randn(24, 3, generator=gen).to(dtype),
            "scaling": torch.tensor(s),
        }
        for s in (0.5, 3.0)
    ]
    q = add(*ps)
    assert q["lora_A"].dtype == q["lora_B"].dtype == dtype
    assert_close_rel(_dense(q), _dense(ps[0]) + _dense(ps[1]), dtype, factor=4)


def test_adapters_of_different_dtypes_combine_in_the_promoted_dtype():
    gen = torch.Generator().manual_seed(2)
    half = {
        "lora_A": torch.randn(2, 32, generator=gen).to(torch.bfloat16),
        "lora_B": torch.randn(24, 2, generator=gen).to(torch.bfloat16),
        "scaling": torch.tensor(0.5),
    }
    full = {k: v.float() * 0.5 if k != "scaling" else v for k, v in half.items()}
    for q in (add(half, full), combine([half, full], [1.0, 1.0], "cat")):
        assert q["lora_A"].dtype == q["lora_B"].dtype == torch.float32
        assert_close_rel(_dense(q), _dense(half) + _dense(full), torch.float32)
    q = combine([half, full], [1.0, -2.0], "svd", rank=2)
    assert q["lora_A"].dtype == torch.float32
    assert_close_rel(_dense(q), _dense(half) - 2 * _dense(full), torch.float32, factor=4)


@given(
    st.lists(
        adapters(LAYER, dtypes=torch.float64, scalings=(0.5, 1.0, 2.0)), min_size=1, max_size=4
    ),
    st.data(),
)
def test_cat_is_the_exact_weighted_sum(ps, data):
    ws = data.draw(st.lists(weights_st, min_size=len(ps), max_size=len(ps)))
    q = combine(ps, ws, "cat")
    assert q["lora_A"].shape[0] == sum(p["lora_A"].shape[0] for p in ps)
    torch.testing.assert_close(_dense(q), _weighted_sum(ps, ws), rtol=1e-12, atol=1e-14)


@given(adapters(LAYER, dtypes=torch.float64), weights_st)
def test_scale_and_negate_are_exact(p, w):
    torch.testing.assert_close(_dense(scale(p, w)), w * _dense(p), rtol=1e-13, atol=1e-15)
    assert torch.equal(_dense(negate(p)), -_dense(p))
    _assert_same(negate(negate(p)), p)


def test_scale_keeps_scaling_and_takes_a_tensor_weight_with_grad():
    p = _adapter([[1.0, 2.0]], [[3.0], [4.0]], scaling=2.0)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    q = scale(p, w)
    assert q["scaling"] is p["scaling"]
    (grad,) = torch.autograd.grad(_dense(q).sum(), w)
    assert grad.item() == pytest.approx(_dense(p).sum().item())


def test_combine_one_adapter_with_weight_one_cat_is_identity():
    p = _clone(LAYER_ADAPTER)
    _assert_same(combine([p], [1.0], "cat"), p)


@pytest.mark.parametrize("method", METHODS)
def test_combine_one_adapter_with_weight_one_keeps_the_delta(method):
    # Holds for every method at density 1 (nothing pruned) and rank >= r.
    p = {k: v.double() for k, v in LAYER_ADAPTER.items()}
    q = combine([p], [1.0], method, **_options(method))
    torch.testing.assert_close(_dense(q), _dense(p), rtol=1e-12, atol=1e-12)


# --- SVD -------------------------------------------------------------------------------------


@given(
    st.lists(adapters(LAYER, dtypes=torch.float64, ranks=(1, 2, 3)), min_size=1, max_size=3),
    st.data(),
)
def test_svd_with_the_combined_rank_is_exact(ps, data):
    ws = data.draw(st.lists(weights_st, min_size=len(ps), max_size=len(ps)))
    k = sum(p["lora_A"].shape[0] for p in ps)
    q, info = combine(ps, ws, "svd", rank=k, return_info=True)
    torch.testing.assert_close(_dense(q), _weighted_sum(ps, ws), rtol=1e-10, atol=1e-12)
    assert info.truncation_error.item() < 1e-6
    assert info.error.item() < 1e-6


@given(
    st.lists(adapters(LAYER, dtypes=torch.float64, ranks=(2, 4)), min_size=2, max_size=3), st.data()
)
def test_svd_with_a_smaller_rank_is_the_truncated_svd(ps, data):
    ws = data.draw(st.lists(weights_st, min_size=len(ps), max_size=len(ps)))
    k = data.draw(st.integers(1, 3))
    q, info = combine(ps, ws, "svd", rank=k, return_info=True)
    target = _weighted_sum(ps, ws)
    U, S, Vh = torch.linalg.svd(target)
    best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    torch.testing.assert_close(_dense(q), best, rtol=1e-9, atol=1e-9)
    tail = S[k:].square().sum().sqrt().item()
    assert info.truncation_error.item() == pytest.approx(tail, rel=1e-5, abs=1e-7)
    assert info.error.item() == pytest.approx(tail, rel=1e-5, abs=1e-7)
    assert info.rel_error.item() == pytest.approx(tail / target.norm().item(), rel=1e-5, abs=1e-7)


def test_svd_default_rank_is_the_largest_input_rank():
    gen = torch.Generator().manual_seed(0)
    ps = [
        {
            "lora_A": torch.randn(r, 32, generator=gen),
            "lora_B": torch.randn(24, r, generator=gen),
            "scaling": torch.tensor(1.0),
        }
        for r in (2, 5)
    ]
    assert combine(ps, [1, 1], "svd")["lora_A"].shape == (5, 32)


# --- hand-checked definitions (TIES, DARE, magnitude pruning, linear) -------------------------

# Rank-2 adapters with A = I and scaling 1, so that ΔWᵢ = Bᵢ: the _svd methods at full rank
# give exactly the dense merge of the Bᵢ.
D1 = [[3.0, -1.0], [0.5, 2.0]]
D2 = [[-4.0, 1.5], [-1.0, 0.25]]
EYE = [[1.0, 0.0], [0.0, 1.0]]


def test_magnitude_prune_svd_by_hand():
    # density 0.5 keeps the 2 largest |entries|: D1 -> [[3, 0], [0, 2]], D2 -> [[-4, 1.5], [0, 0]]
    q = combine(
        [_adapter(EYE, D1), _adapter(EYE, D2)],
        [1.0, 0.5],
        "magnitude_prune_svd",
        rank=2,
        density=0.5,
    )
    expected = torch.tensor([[3.0 - 2.0, 0.75], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(_dense(q), expected)


@pytest.mark.parametrize(
    ("sign_method", "expected"),
    [
        # elected sign of the pruned sum [[-1, 1.5], [0, 2]]: [[-, +], [+, +]];
        # weighted pruned tensors: [[3, 0], [0, 2]] and 0.5·[[-4, 1.5], [0, 0]]
        ("total", [[-2.0, 0.75], [0.0, 2.0]]),
        # elected sign of the sign sum [[0, 1], [0, 1]]: ties go to +
        ("frequency", [[3.0, 0.75], [0.0, 2.0]]),
    ],
)
def test_ties_svd_by_hand(sign_method, expected):
    q = combine(
        [_adapter(EYE, D1), _adapter(EYE, D2)],
        [1.0, 0.5],
        "ties_svd",
        rank=2,
        density=0.5,
        majority_sign_method=sign_method,
    )
    torch.testing.assert_close(_dense(q), torch.tensor(expected, dtype=torch.float64))


def test_ties_on_A_and_B_by_hand():
    # scaling 1 and weights 1: A and B each get the TIES merge with weights sqrt(1) = 1.
    p1 = _adapter([[3.0, -1.0, 0.5, 2.0]], [[1.0], [2.0]])
    p2 = _adapter([[-4.0, 1.5, -1.0, 0.25]], [[-3.0], [0.5]])
    q = combine([p1, p2], [1.0, 1.0], "ties", density=0.5)
    # A: pruned [3, 0, 0, 2] and [-4, 1.5, 0, 0]; signs of the sum [-, +, +, +]
    torch.testing.assert_close(
        q["lora_A"], torch.tensor([[-4.0, 1.5, 0.0, 2.0]], dtype=torch.float64)
    )
    # B: pruned [0, 2] and [-3, 0]; signs of the sum [-, +]
    torch.testing.assert_close(q["lora_B"], torch.tensor([[-3.0], [2.0]], dtype=torch.float64))
    assert q["scaling"].item() == 1.0


def test_linear_has_the_documented_cross_terms():
    p1 = _adapter([[1.0, 2.0]], [[1.0], [0.0]], scaling=2.0)
    p2 = _adapter([[0.0, 1.0]], [[3.0], [1.0]], scaling=1.0)
    # w·s = [-2·2, 1·1]: a = [-2, 1], b = [2, 1]
    q, info = combine([p1, p2], [-2.0, 1.0], "linear", return_info=True)
    A1, B1, A2, B2 = (p[k] for p in (p1, p2) for k in ("lora_A", "lora_B"))
    expected = (2 * B1 + B2) @ (-2 * A1 + A2)
    torch.testing.assert_close(_dense(q), expected)
    target = -4 * B1 @ A1 + B2 @ A2
    cross = expected - target
    assert cross.abs().max() > 0
    # The info measures the cross terms against the dense weighted sum.
    assert info.error.item() == pytest.approx(cross.norm().item(), rel=1e-6)
    assert info.rel_error.item() == pytest.approx((cross.norm() / target.norm()).item(), rel=1e-6)
    assert info.truncation_error.item() == 0


def test_dare_linear_svd_keeps_rescaled_entries_or_zeros():
    gen = torch.Generator().manual_seed(0)
    D = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    p = {"lora_A": torch.eye(6, dtype=torch.float64), "lora_B": D, "scaling": torch.tensor(1.0)}
    q = combine(
        [p],
        [1.0],
        "dare_linear_svd",
        rank=6,
        density=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    out = _dense(q)
    kept = (out - 2 * D).abs() < 1e-9
    dropped = out.abs() < 1e-9
    assert bool((kept | dropped).all())
    assert 0 < int(kept.sum()) < 36


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_driven_by_the_generator(method):
    ps = [LAYER_ADAPTER, scale(LAYER_ADAPTER, -0.5)]

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return combine(ps, [1.0, 0.7], method, density=0.3, generator=gen)

    _assert_same(run(5), run(5))
    assert not torch.equal(run(5)["lora_A"], run(6)["lora_A"]) or not torch.equal(
        run(5)["lora_B"], run(6)["lora_B"]
    )


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_ties_at_density_one_is_peft_ties_without_pruning(method):
    ps = [LAYER_ADAPTER, scale(LAYER_ADAPTER, -0.5)]
    q = combine(ps, [1.0, 0.7], method, density=1.0)
    expected = _independent(ps, [1.0, 0.7], "ties", density=1.0)
    torch.testing.assert_close(_dense(q), expected, rtol=1e-5, atol=1e-5)


# --- agreement with PEFT's merge_utils -------------------------------------------------------


def _peft_merge(method, tensors, weights, density, sign="total"):
    if method == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    if method == "ties":
        return merge_utils.ties(tensors, weights, density, sign)
    if method == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    return merge_utils.dare_ties(tensors, weights, density, sign)


def _independent(ps, ws, method, *, density=None, rank=None, sign="total", seed=0):
    """The dense ΔW of PEFT's ``add_weighted_adapter`` definitions, from ``merge_utils``.

    Computed in float32 (float64 for float64 adapters) as ``combine`` documents, on the same
    tensors, with the global generator seeded to ``seed`` (PEFT's DARE draws from it: A's masks
    first, then B's); the SVD truncation is a plain float64 SVD. Returns float64.
    """
    dtype = functools.reduce(torch.promote_types, [p["lora_A"].dtype for p in ps])
    compute = torch.promote_types(dtype, torch.float32)
    if method == "cat":
        return _weighted_sum(ps, ws)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        if not method.endswith("svd"):
            ws_s = [w * p["scaling"].item() for w, p in zip(ws, ps, strict=True)]
            wA = torch.tensor([abs(w) ** 0.5 * (1 if w >= 0 else -1) for w in ws_s], dtype=compute)
            wB = torch.tensor([abs(w) ** 0.5 for w in ws_s], dtype=compute)
            A = _peft_merge(method, [p["lora_A"].to(compute) for p in ps], wA, density, sign)
            B = _peft_merge(method, [p["lora_B"].to(compute) for p in ps], wB, density, sign)
            return B.double() @ A.double()
        deltas = [
            (p["lora_B"].to(compute) @ p["lora_A"].to(compute)) * p["scaling"].to(compute)
            for p in ps
        ]
        dense_method = "linear" if method == "svd" else method.removesuffix("_svd")
        D = _peft_merge(dense_method, deltas, torch.tensor(ws, dtype=compute), density, sign)
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    k = rank if rank is not None else min(max(p["lora_A"].shape[0] for p in ps), *D.shape)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize("method", ["linear", *PRUNING])
def test_matches_peft_on_A_and_B(method):
    gen = torch.Generator().manual_seed(0)
    ps = [
        {
            "lora_A": torch.randn(4, 32, generator=gen),
            "lora_B": torch.randn(24, 4, generator=gen),
            "scaling": torch.tensor(s),
        }
        for s in (2.0, 0.5, 1.0)
    ]
    ws = [0.7, -1.3, 0.4]
    density = 0.6 if method != "linear" else None
    ws_s = [w * p["scaling"].item() for w, p in zip(ws, ps, strict=True)]
    wA = torch.tensor([abs(w) ** 0.5 * (1 if w >= 0 else -1) for w in ws_s])
    wB = torch.tensor([abs(w) ** 0.5 for w in ws_s])
    torch.manual_seed(11)  # PEFT's DARE uses the global generator, drawing A's masks first
    expected_A = _peft_merge(method, [p["lora_A"] for p in ps], wA, density)
    expected_B = _peft_merge(method, [p["lora_B"] for p in ps], wB, density)
    torch.manual_seed(11)
    q = combine(ps, ws, method, density=density)
    torch.testing.assert_close(q["lora_A"], expected_A)
    torch.testing.assert_close(q["lora_B"], expected_B)


@pytest.mark.parametrize(
    "method", ["svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"]
)
def test_svd_methods_match_peft(method):
    gen = torch.Generator().manual_seed(1)
    ps = [
        {
            "lora_A": torch.randn(3, 32, generator=gen),
            "lora_B": torch.randn(24, 3, generator=gen),
            "scaling": torch.tensor(s),
        }
        for s in (2.0, 0.5)
    ]
    ws = [1.0, -0.8]
    density = None if method == "svd" else 0.5
    deltas = [delta_weight(p) for p in ps]
    torch.manual_seed(3)
    D = _peft_merge(
        method.removesuffix("_svd").replace("svd", "linear"), deltas, torch.tensor(ws), density
    )
    U, S, Vh = torch.linalg.svd(D)
    torch.manual_seed(3)
    q = combine(ps, ws, method, rank=4, density=density)
    torch.testing.assert_close(
        _dense(q).float(), U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=1e-4, atol=1e-4
    )


# --- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_every_dtype_matches_peft(method, dtype):
    gen = torch.Generator().manual_seed(7)
    ps = [
        {
            "lora_A": torch.randn(4, 32, generator=gen).to(dtype),
            "lora_B": torch.randn(24, 4, generator=gen).to(dtype),
            "scaling": torch.tensor(s),
        }
        for s in (2.0, 0.5)
    ]
    ws = [1.0, -0.7]
    rank = 6 if method.endswith("svd") else None
    density = 0.6 if method.removesuffix("_svd") in PRUNING else None
    torch.manual_seed(0)
    q = combine(ps, ws, method, rank=rank, density=density)
    assert q["lora_A"].dtype == q["lora_B"].dtype == dtype
    expected = _independent(ps, ws, method, density=density, rank=rank)
    # The result's A and B are rounded to `dtype`: each entry of B@A sums r products of
    # entries off by u each.
    assert_close_rel(_dense(q), expected, dtype, factor=2 * (q["lora_A"].shape[0] ** 0.5))


# --- model-level dicts -------------------------------------------------------------------------


def test_model_level_operations_map_per_module():
    a = {"q": LAYER_ADAPTER, "v": scale(LAYER_ADAPTER, 2.0)}
    b = {"q": negate(LAYER_ADAPTER), "k": scale(LAYER_ADAPTER, 0.5)}
    s = add(a, b)
    assert list(s) == ["q", "v", "k"]
    torch.testing.assert_close(
        _dense(s["q"]), torch.zeros(24, 32, dtype=torch.float64), atol=1e-5, rtol=0
    )
    _assert_same(s["k"], b["k"])
    assert_close_rel(_dense(scale(a, 3.0)["v"]), 6 * _dense(LAYER_ADAPTER), torch.float32)
    assert_close_rel(_dense(negate(b)["k"]), -0.5 * _dense(LAYER_ADAPTER), torch.float32)
    c, info = combine([a, b], [1.0, 2.0], "svd", rank=4, return_info=True)
    # Each path combines the adapters that have it, with their weights.
    expected = {
        "q": _independent([a["q"], b["q"]], [1.0, 2.0], "svd", rank=4),
        "v": _independent([a["v"]], [1.0], "svd", rank=4),
        "k": _independent([b["k"]], [2.0], "svd", rank=4),
    }
    assert list(c) == ["q", "v", "k"] and set(info) == {"q", "v", "k"}
    for path, dense in expected.items():
        assert_close_rel(_dense(c[path]), dense, torch.float32, factor=4)


# --- errors ------------------------------------------------------------------------------------


def test_errors_leave_inputs_alone_and_say_what_was_expected():
    p = LAYER_ADAPTER
    other = {
        "lora_A": torch.randn(4, 16),
        "lora_B": torch.randn(24, 4),
        "scaling": torch.tensor(1.0),
    }
    dora = {**p, "magnitude": torch.ones(24)}
    with pytest.raises(ValueError, match=r"Expected adapters of one layer shape .* got \(24, 16\)"):
        combine([p, other], [1, 1])
    with pytest.raises(ValueError, match=r"Expected adapters of one layer shape"):
        add(p, other)
    with pytest.raises(ValueError, match=r"Expected one weight per adapter \(2\), got 3"):
        combine([p, p], [1, 1, 1])
    with pytest.raises(ValueError, match=r"Expected `rank` <= min\(out, in\) = 24 .* got 25"):
        combine([p, p], [1, 1], "svd", rank=25)
    with pytest.raises(ValueError, match=r"Expected `rank` to be a positive int, got 0"):
        combine([p, p], [1, 1], "svd", rank=0)
    with pytest.raises(ValueError, match=r"Expected `rank` only with an SVD method"):
        combine([p, p], [1, 1], "cat", rank=2)
    for density in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"Expected `density` in \(0, 1\], got {density}"):
            combine([p, p], [1, 1], "ties", density=density)
    with pytest.raises(
        ValueError, match=r"Expected a `density` in \(0, 1\] for 'dare_linear', got None"
    ):
        combine([p, p], [1, 1], "dare_linear")
    with pytest.raises(ValueError, match=r"Expected no `density` for 'cat'"):
        combine([p, p], [1, 1], "cat", density=0.5)
    with pytest.raises(ValueError, match=r"Expected `method` in .* got 'mean'"):
        combine([p, p], [1, 1], "mean")
    with pytest.raises(
        ValueError, match=r"Expected adapters of one rank for 'linear', got ranks \[4, 2\]"
    ):
        combine(
            [p, {**p, "lora_A": p["lora_A"][:2], "lora_B": p["lora_B"][:, :2]}], [1, 1], "linear"
        )
    with pytest.raises(ValueError, match=r"Expected `majority_sign_method` in"):
        combine([p, p], [1, 1], "ties", density=0.5, majority_sign_method="mode")
    with pytest.raises(ValueError, match=r"Expected at least one adapter"):
        combine([], [])
    for call in (
        lambda: combine([p, dora], [1, 1]),
        lambda: add(p, dora),
        lambda: scale(dora, 2.0),
        lambda: negate({"m": dora}),
    ):
        with pytest.raises(
            ValueError, match=r"Expected LoRA adapters \(no 'magnitude'\), got a DoRA adapter"
        ):
            call()
    with pytest.raises(TypeError, match=r"Expected `p1` and `p2` of one kind"):
        add(p, {"q": p})
    with pytest.raises(TypeError, match=r"Expected `w` to be a number or a 0-d tensor, got str"):
        scale(p, "2")
    with pytest.raises(TypeError, match=r"Expected `w` to be a number or a 0-d tensor, got bool"):
        scale(p, True)
    with pytest.raises(ValueError, match=r"Expected `w` to be a number or a 0-d tensor, got shape"):
        scale(p, torch.ones(2))
    with pytest.raises(
        ValueError, match=r"`weights\[1\]` to be a number or a 0-d tensor, got shape"
    ):
        combine([p, p], [1.0, torch.ones(2)])
    assert torch.equal(p["lora_A"], LAYER_ADAPTER["lora_A"])


@settings(max_examples=10)
@given(adapters(LAYER, ranks=(2,), dora=True))
def test_dora_strategy_adapters_are_refused(p):
    with pytest.raises(ValueError, match=r"DoRA adapter"):
        combine([p], [1.0], "svd")
