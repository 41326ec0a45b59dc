"""The prefill kernels (CUDA + Triton): skipped on machines without a GPU (CI has none).

``mixed_batch_indexed`` above 64 tokens, compared with the float64 product of HQQ's
dequantized weight (``helpers.dense_reference``, tolerances from the compute dtype), and
elementwise with the float64 value computed from the same base output: half a unit in
the last place of the output dtype (its one rounding) plus ``2⁻¹⁸`` of the sum of the
absolute terms (float32 accumulation with room; plain TF32, ``2⁻¹¹``, does not fit).
"""

import helpers
import pytest
import torch
from helpers import assert_close_rel, dense_reference, random_adapter

import hqqlora
from hqqlora import _prefill

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(_prefill.triton is None, reason="needs Triton"),
]

HALF = (torch.bfloat16, torch.float16)
MANTISSA = {torch.bfloat16: 8, torch.float16: 11}  # bits, the implicit one included


def cuda_layer(nbits, dtype, *, bias=True, size=(384, 512), group=64):
    """helpers.cuda_layer with this file's default size."""
    return helpers.cuda_layer(nbits, dtype, bias=bias, size=size, group=group)


def cuda_bank(layer, *, dora, dtype=torch.float32, n=4):
    """``n`` adapters of ranks 3, 16, 5, 24 (padded to 24); with ``dora``, entries 0 and 2 DoRA."""
    ranks = (3, 16, 5, 24)
    adapters = {
        f"a{i}": {
            k: v.cuda()
            for k, v in random_adapter(
                layer, r=ranks[i % 4], dora=dora and i % 2 == 0, seed=i, dtype=dtype
            ).items()
        }
        for i in range(n)
    }
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank) if dora else None
    return adapters, bank, norm


def uses_prefill(fn, monkeypatch):
    calls = []
    real = _prefill.lora_prefill

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_prefill, "lora_prefill", spy)
    out = fn()
    monkeypatch.setattr(_prefill, "lora_prefill", real)
    return out, bool(calls)


def _base_ref(layer, x):
    y = x.double() @ hqqlora.dequantize(layer).double().T
    return y if layer.bias is None else y + layer.bias.double()


def from_base_output(x, res, index, bank, norm, bias):
    """float64 ``y`` per row from the base output ``res``, and the sum of absolute terms."""
    refs, bounds = [], []
    b = 0 if bias is None else bias.double()
    for i, k in enumerate(index.tolist()):
        r = res[i].double()
        if k < 0:
            refs.append(r)
            bounds.append(r.abs())
            continue
        xa, A, B, s = (
            x[i].double(),
            bank.lora_A[k].double(),
            bank.lora_B[k].double(),
            bank.scaling[k].double(),
        )
        term = s * (xa @ A.T) @ B.T
        absterm = s.abs() * (xa.abs() @ A.abs().T) @ B.abs().T
        if bank.dora[k]:
            c = bank.magnitude[k].double() / norm[k].double()
            refs.append(c * (r - b + term) + b)
            bounds.append(c.abs() * (r.abs() + abs(b) + absterm) + abs(b))
        else:
            refs.append(r + term)
            bounds.append(r.abs() + absterm)
    return torch.stack(refs), torch.stack(bounds)


def ulp(v, dtype):
    """The spacing of ``dtype`` at ``|v|`` (its subnormal spacing below the normal range)."""
    _, e = torch.frexp(v.double().abs())
    finfo = torch.finfo(dtype)
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), e - MANTISSA[dtype]).clamp(
        min=finfo.tiny * finfo.eps
    )


def assert_one_rounding(got, ref, bound, dtype):
    """``got`` is ``ref`` rounded once to ``dtype``, up to float32 accumulation."""
    err = (got.double() - ref).abs()
    bad = err > 0.5 * ulp(torch.maximum(ref.abs(), got.double().abs()), dtype) + 2.0**-18 * bound
    assert not bad.any(), f"{int(bad.sum())} elements off, max error {err.max().item():.3e}"


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("nbits", [4, 2])
def test_prefill_matches_the_float64_reference(nbits, dtype, dora, bank_dtype, monkeypatch):
    layer = cuda_layer(nbits, dtype)
    adapters, bank, norm = cuda_bank(layer, dora=dora, dtype=bank_dtype)
    names = list(adapters)
    index = torch.tensor([1, -1, 0, 3, 1, 2], device="cuda")  # repeats, a "__base__" row
    x = torch.randn(6, 37, 512, device="cuda", dtype=dtype)  # 222 tokens, 37 a row
    with torch.no_grad():
        got, fused = uses_prefill(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
        )
        res = hqqlora.base_forward(layer, x)
    assert fused and got.shape == (6, 37, 384) and got.dtype == dtype
    ref, bound = from_base_output(x, res, index, bank, norm, layer.bias)
    assert_one_rounding(got, ref, bound, dtype)
    for i in range(6):
        k = int(index[i])
        want = _base_ref(layer, x[i]) if k < 0 else dense_reference(layer, adapters[names[k]], x[i])
        # The held norm is rounded to the adapters' dtype: allow for it (DoRA).
        assert_close_rel(got[i], want, dtype, factor=2 if dora else 1)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_prefill_equals_the_dense_path_up_to_the_output_rounding(dtype, dora, monkeypatch):
    # Both add a float32 term to the same base output and round once: they differ by at
    # most one unit in the last place (float32 sums on either side of a rounding
    # boundary), plus float32 accumulation where the output cancels to near zero.
    layer = cuda_layer(4, dtype, size=(320, 448))
    _, bank, norm = cuda_bank(layer, dora=dora)
    index = torch.tensor([2, 0, -1, 2], device="cuda")
    x = torch.randn(4, 2, 45, 448, device="cuda", dtype=dtype)  # (batch, ..., in)
    with torch.no_grad():
        got, fused = uses_prefill(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
        )
        dense, dense_fused = uses_prefill(
            lambda: hqqlora.mixed_batch_indexed(
                x, bank, index, base=layer, weight_norm=norm, exact=True
            ),
            monkeypatch,
        )
    assert fused and not dense_fused and got.shape == dense.shape == (4, 2, 45, 320)
    _, bound = from_base_output(x, hqqlora.base_forward(layer, x), index, bank, norm, layer.bias)
    big = torch.maximum(got.double().abs(), dense.double().abs())
    assert ((got.double() - dense.double()).abs() <= ulp(big, dtype) + 2.0**-18 * bound).all()
    assert torch.equal(got[2], dense[2])  # "__base__": the base output itself


def test_prefill_bank_in_half_precision_is_computed_in_float32(monkeypatch):
    # A float16 bank on a bf16 layer: the term is float32 from the adapters' own values.
    layer = cuda_layer(4, torch.bfloat16)
    _, bank, norm = cuda_bank(layer, dora=True, dtype=torch.float16)
    index = torch.tensor([0, 1, 2], device="cuda")
    x = torch.randn(3, 40, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got, fused = uses_prefill(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
        )
        res = hqqlora.base_forward(layer, x)
    assert fused
    assert_one_rounding(
        got, *from_base_output(x, res, index, bank, norm, layer.bias), torch.bfloat16
    )


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_prefill_uses_the_kernels_and_is_deterministic():
    from torch._dynamo.testing import EagerAndRecordGraphs

    layer = cuda_layer(4, torch.bfloat16)
    _, bank, norm = cuda_bank(layer, dora=True)
    index = torch.tensor([1, -1, 0, 2], device="cuda")
    x = torch.randn(4, 33, 512, device="cuda", dtype=torch.bfloat16)
    backend = EagerAndRecordGraphs()
    torch._dynamo.reset()

    def fn(xx, ii):
        return hqqlora.mixed_batch_indexed(xx, bank, ii, base=layer, weight_norm=norm)

    with torch.no_grad():
        recorded = torch.compile(fn, backend=backend, fullgraph=True)(x, index)
        compiled = torch.compile(fn, fullgraph=True)(x, index)
        eager = fn(x, index)
        again = [fn(x, index) for _ in range(5)]
        res = hqqlora.base_forward(layer, x)
    ops = [str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("lora_prefill" in o for o in ops)
    assert all(torch.equal(eager, a) for a in again)
    ref, bound = from_base_output(x, res, index, bank, norm, layer.bias)
    assert_one_rounding(eager, ref, bound, torch.bfloat16)
    for got in (recorded, compiled):  # the compiled base output may round differently
        assert_close_rel(got, ref, torch.bfloat16)


@pytest.mark.parametrize("case", ["exact", "grad", "autocast", "x_fp32", "bank_fp64", "decode"])
def test_prefill_falls_back_where_it_does_not_apply(case, monkeypatch):
    layer = cuda_layer(4, torch.bfloat16)
    _, bank, _ = cuda_bank(layer, dora=False)
    if case == "bank_fp64":
        bank = bank._replace(
            lora_A=bank.lora_A.double(), lora_B=bank.lora_B.double(),
            magnitude=bank.magnitude.double(),
        )  # fmt: skip
    index = torch.tensor([0, 1], device="cuda")
    tokens = 32 if case == "decode" else 40  # 64 tokens: the decode kernels
    dtype = torch.float32 if case == "x_fp32" else torch.bfloat16
    x = torch.randn(2, tokens, 512, device="cuda", dtype=dtype)
    if case == "grad":
        x.requires_grad_(True)
    kwargs = {"exact": True} if case == "exact" else {}
    grad = torch.enable_grad() if case == "grad" else torch.no_grad()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=case == "autocast")
    with grad, autocast:
        got, fused = uses_prefill(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, **kwargs),
            monkeypatch,
        )
    assert not fused
    if case == "grad":
        got.float().sum().backward()
        assert x.grad is not None


def test_prefill_index_outside_the_bank_gives_nan_rows():
    layer = cuda_layer(4, torch.bfloat16)
    adapters, bank, norm = cuda_bank(layer, dora=True, n=2)
    index = torch.tensor([0, 7, 1, -1, -3], device="cuda")
    x = torch.randn(5, 20, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm)
    assert torch.isnan(got[1]).all() and torch.isnan(got[4]).all()
    assert_close_rel(got[0], dense_reference(layer, adapters["a0"], x[0]), torch.bfloat16, factor=2)
    assert_close_rel(got[2], dense_reference(layer, adapters["a1"], x[2]), torch.bfloat16)
    assert_close_rel(got[3], _base_ref(layer, x[3]), torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF)
def test_prefill_takes_a_layout_the_decode_kernels_do_not_read(dtype, monkeypatch):
    # 3-bit codes: no decode kernel; at 8 tokens the prefill kernels add the terms.
    layer = cuda_layer(3, dtype)
    adapters, bank, norm = cuda_bank(layer, dora=True)
    index = torch.tensor([0, -1], device="cuda")
    x = torch.randn(2, 4, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        got, fused = uses_prefill(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
        )
        res = hqqlora.base_forward(layer, x)
    assert fused
    assert_one_rounding(got, *from_base_output(x, res, index, bank, norm, layer.bias), dtype)
    assert_close_rel(got[0], dense_reference(layer, adapters["a0"], x[0]), dtype, factor=2)
