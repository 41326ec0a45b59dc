import pytest
import torch
from helpers import (
    BITS,
    DTYPES,
    RTOL,
    assert_close_rel,
    dense_reference,
    make_layer,
    random_adapter,
)
from hypothesis import given
from hypothesis import strategies as st

import hqqlora


def assert_term_close(y, y_base, expected, expected_base, dtype, factor=1.0):
    """The adapter term ``y - y_base`` against the reference's ``expected - expected_base``.

    ``y_base`` is the implementation's own base output, the bits inside ``y``, so the base's
    rounding cancels and only the term's roundings and those of the sum remain. Each is bounded
    as RTOL is, by the scale it happens at: ``RTOL·max|term|`` for the term (``x Aᵀ``, ``s·h``,
    ``h Bᵀ``, DoRA's ``c``) and ``RTOL·max|y|`` for the sums at the output's scale. RTOL alone
    is relative to the whole output: with ``|y| ≈ 10·|term|`` it lets a term 20% off through in
    bf16; here, with ``|term| ≈ |y|`` (use adapters whose term is as large as the base output:
    :func:`strong_adapter`), a term 12% off fails in every dtype.
    """
    term = y.double() - y_base.double()
    expected_term = expected.double() - expected_base.double()
    scale = expected_term.abs().max().item() + expected.abs().max().item()
    err = (term - expected_term).abs().max().item()
    tol = RTOL[dtype] * factor * scale
    assert err <= tol, f"adapter term off by {err:.3e} > tolerance {tol:.3e} ({dtype})"


def strong_adapter(layer, r=4, *, dora=False, seed=1, dtype=torch.float32):
    """A random adapter whose term is about as large as the base output (scaling 16).

    DoRA: magnitude = n·(1 + 0.3·u), u ~ U(-1, 1), away from PEFT's init (m = n, c = 1),
    so that every (c - 1) term shows.
    """
    p = random_adapter(layer, r, scaling=16.0, seed=seed, dtype=dtype)
    if dora:
        n = hqqlora.dora_weight_norm(layer, p).double()
        u = 2 * torch.rand(n.shape, generator=torch.Generator().manual_seed(seed)) - 1
        p["magnitude"] = (n * (1 + 0.3 * u)).to(dtype)
    return p


def _term_reference(layer, p, x):
    return dense_reference(layer, p, x), dense_reference(layer, [], x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", [2, 4, 8])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("x_shape", [(64,), (5, 64), (2, 3, 64)])
def test_adapter_term_matches_reference(x_shape, dora, nbits, dtype):
    layer = make_layer(nbits=nbits, dtype=dtype)
    p = strong_adapter(layer, dora=dora, dtype=dtype)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y, y_base = hqqlora.apply_lora(layer, p, x), hqqlora.base_forward(layer, x)
    expected, expected_base = _term_reference(layer, p, x)
    assert y.shape == (*x_shape[:-1], 48) and y.dtype == dtype
    assert_term_close(y, y_base, expected, expected_base, dtype)
    # The tolerance is tight enough to see a term 12% off.
    with pytest.raises(AssertionError, match="adapter term off"):
        assert_term_close(y_base + 1.12 * (y - y_base), y_base, expected, expected_base, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_on_1d_x_matches_reference(dtype):
    # A 1-D x takes its own path in the LoRA term (no fused addmm).
    layer = make_layer(dtype=dtype)
    p = strong_adapter(layer)
    x = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = hqqlora.apply_lora(layer, p, x)
    assert y.shape == (48,)
    expected, expected_base = _term_reference(layer, p, x)
    assert_term_close(y, hqqlora.base_forward(layer, x), expected, expected_base, dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dora", [False, True])
def test_apply_lora_matches_float64_reference(nbits, dtype, bias, dora):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    p = random_adapter(layer, dora=dora)
    x = torch.randn(2, 3, 64).to(dtype)
    y = hqqlora.apply_lora(layer, p, x)
    assert y.dtype == dtype and y.shape == (2, 3, 48)
    assert_close_rel(y, dense_reference(layer, p, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_of_adapters_adds_each_term(dtype):
    layer = make_layer(dtype=dtype)
    ps = [
        random_adapter(layer, seed=1),
        random_adapter(layer, r=2, dora=True, seed=2),
        random_adapter(layer, seed=3),
    ]
    x = torch.randn(4, 64).to(dtype)
    assert_close_rel(hqqlora.apply_lora(layer, ps, x), dense_reference(layer, ps, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_B_gives_the_base_output_exactly(dtype):
    layer = make_layer(dtype=dtype)
    p = hqqlora.init_lora(layer, 4)
    x = torch.randn(5, 64).to(dtype)
    assert torch.equal(hqqlora.apply_lora(layer, p, x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_dtype_matches_base_dtype(dtype):
    layer = make_layer(dtype=dtype)
    p = random_adapter(layer, dtype=dtype)
    x = torch.randn(3, 64).to(dtype)
    y = hqqlora.apply_lora(layer, p, x)
    assert y.dtype == dtype
    assert_close_rel(y, dense_reference(layer, p, x), dtype, factor=2)


def test_weight_norm_argument_gives_the_same_result():
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    x = torch.randn(3, 64)
    n = hqqlora.dora_weight_norm(layer, p)
    torch.testing.assert_close(
        hqqlora.apply_lora(layer, p, x, weight_norm=n), hqqlora.apply_lora(layer, p, x)
    )
    with pytest.raises(ValueError, match="weight_norm"):
        hqqlora.apply_lora(layer, p, x, weight_norm=n[:-1])
    with pytest.raises(ValueError, match="LoRA adapter"):
        hqqlora.apply_lora(layer, random_adapter(layer), x, weight_norm=n)


def test_dropout_is_deterministic_given_the_generator_state():
    layer = make_layer()
    p = random_adapter(layer)
    x = torch.randn(8, 64)
    y1 = hqqlora.apply_lora(layer, p, x, dropout=0.5, generator=torch.Generator().manual_seed(7))
    y2 = hqqlora.apply_lora(layer, p, x, dropout=0.5, generator=torch.Generator().manual_seed(7))
    y3 = hqqlora.apply_lora(layer, p, x, dropout=0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(y1, hqqlora.apply_lora(layer, p, x))


def test_dropout_matches_reference_on_the_dropped_input():
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    x = torch.randn(8, 64)
    keep = torch.bernoulli(torch.full_like(x, 0.75), generator=torch.Generator().manual_seed(1))
    y = hqqlora.apply_lora(layer, p, x, dropout=0.25, generator=torch.Generator().manual_seed(1))
    xd = (x * keep / 0.75).double()
    W = hqqlora.dequantize(layer).double()
    A, B = p["lora_A"].double(), p["lora_B"].double()
    c = p["magnitude"].double() / torch.linalg.norm(W + 2.0 * B @ A, dim=1)
    expected = layer(x).double() + (c - 1) * (xd @ W.T) + c * 2.0 * (xd @ A.T @ B.T)
    assert_close_rel(y, expected, torch.float32)


@pytest.mark.parametrize("p", [-0.1, 1.0, "0.1"])
def test_bad_dropout(p):
    layer = make_layer()
    with pytest.raises(ValueError, match="Expected `dropout` in \\[0, 1\\)"):
        hqqlora.apply_lora(layer, random_adapter(layer), torch.randn(1, 64), dropout=p)


@pytest.mark.parametrize("shape", [(3, 63), (64, 3), ()])
def test_bad_input_shape(shape):
    layer = make_layer()
    with pytest.raises(ValueError, match="Expected `x` of shape \\(..., 64\\)"):
        hqqlora.apply_lora(layer, random_adapter(layer), torch.randn(shape))


def test_non_tensor_input():
    layer = make_layer()
    with pytest.raises(TypeError, match="Expected `x` to be a torch.Tensor, got list"):
        hqqlora.apply_lora(layer, random_adapter(layer), [[0.0] * 64])


def test_inputs_are_not_mutated():
    layer = make_layer()
    p = random_adapter(layer, dora=True)
    x = torch.randn(3, 64)
    before = (
        {k: v.clone() for k, v in p.items()},
        x.clone(),
        layer.W_q.clone(),
        layer.meta["zero"].clone(),
    )
    hqqlora.apply_lora(layer, p, x, dropout=0.1)
    assert all(torch.equal(p[k], before[0][k]) for k in p)
    assert torch.equal(x, before[1]) and torch.equal(layer.W_q, before[2])
    assert torch.equal(layer.meta["zero"], before[3])


def test_autocast_runs_without_manual_casts():
    layer = make_layer()
    p = random_adapter(layer)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hqqlora.apply_lora(layer, p, x)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, dense_reference(layer, p, x), torch.bfloat16, factor=2)


# HQQ keeps its bias as a non-leaf tensor that requires grad; dynamo warns when it reads it.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_vmap_jvp_and_compile_pass_through_apply_lora():
    layer = make_layer(nbits=3)
    p = random_adapter(layer, dora=True)
    x = torch.randn(6, 64)
    expected = hqqlora.apply_lora(layer, p, x)
    per_row = torch.func.vmap(lambda xi: hqqlora.apply_lora(layer, p, xi))(x)
    torch.testing.assert_close(per_row, expected)
    stacked = {k: torch.stack([v, v]) for k, v in p.items()}
    per_adapter = torch.func.vmap(lambda q: hqqlora.apply_lora(layer, q, x))(stacked)
    torch.testing.assert_close(per_adapter, torch.stack([expected, expected]))
    tangent = torch.randn_like(x)
    _, jvp_out = torch.func.jvp(lambda xx: hqqlora.apply_lora(layer, p, xx), (x,), (tangent,))
    W = hqqlora.dequantize(layer).double()
    A, B = p["lora_A"].double(), p["lora_B"].double()
    c = p["magnitude"].double() / torch.linalg.norm(W + 2.0 * B @ A, dim=1)
    assert_close_rel(jvp_out, c * (tangent.double() @ (W + 2.0 * B @ A).T), torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda xx, q: hqqlora.apply_lora(layer, q, xx), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x, p), expected)


@given(
    nbits=st.sampled_from((1, 2, 3, 4, 8)),
    dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)),
    in_groups=st.integers(1, 4),
    out_features=st.integers(1, 5).map(lambda k: 8 * k),  # HQQ packs whole bytes of groups
    r=st.integers(1, 8),
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    dora=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_apply_lora_matches_reference(
    nbits, dtype, in_groups, out_features, r, batch, dora, bias, seed
):
    layer = make_layer(16 * in_groups, out_features, nbits=nbits, dtype=dtype, bias=bias, seed=seed)
    p = random_adapter(layer, r=r, dora=dora, seed=seed + 1)
    x = torch.randn(*batch, 16 * in_groups, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert_close_rel(hqqlora.apply_lora(layer, p, x), dense_reference(layer, p, x), dtype, factor=2)
