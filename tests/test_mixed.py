"""mixed_batch / stack_adapters / mixed_batch_indexed: per-row equality, PEFT parity, errors."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from helpers import BITS, DTYPES, assert_close_rel, dense_reference, make_layer, random_adapter
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.lora.hqq import HqqLoraLinear as PeftHqq
from test_lora import assert_term_close, strong_adapter
from torch.utils._python_dispatch import TorchDispatchMode

import hqqlora._mixed as mixed_module
from hqqlora import (
    AdapterBank,
    apply_lora,
    bank_weight_norm,
    base_forward,
    dequantize,
    dora_weight_norm,
    mixed_batch,
    mixed_batch_indexed,
    stack_adapters,
)

BASE = "__base__"


@pytest.fixture(params=["loop", "batched"])
def path(request, monkeypatch):
    """Pins one of the two eager CPU algorithms: a loop over the adapters in the batch (rows
    grouped by adapter) or the batched gather (every row gathers its adapter). Left alone,
    the choice depends on the shapes (test_loop_runs_exactly_where_it_pays)."""
    monkeypatch.setattr(mixed_module, "_loop_pays", lambda *args: request.param == "loop")
    return request.param


def _adapters(layer, ranks, dora=(), dtype=torch.float32):
    return {
        name: random_adapter(layer, r, scaling=0.5 + k, dora=name in dora, seed=10 + k, dtype=dtype)
        for k, (name, r) in enumerate(ranks.items())
    }


def _per_row(layer, params_by_name, names, x):
    rows = []
    for i, name in enumerate(names):
        xi = x[i : i + 1]
        rows.append(
            base_forward(layer, xi) if name == BASE else apply_lora(layer, params_by_name[name], xi)
        )
    return torch.cat(rows)


def _per_row_dense(layer, params_by_name, names, x):
    rows = []
    for i, name in enumerate(names):
        adapters = [] if name == BASE else [params_by_name[name]]
        rows.append(dense_reference(layer, adapters, x[i : i + 1]))
    return torch.cat(rows)


# -- per-row equality ---------------------------------------------------------------


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("path")
def test_mixed_lora_dora_ranks_equal_per_row(nbits, dtype, bias):
    layer = make_layer(64, 48, nbits=nbits, dtype=dtype, bias=bias)
    params = _adapters(layer, {"a": 2, "b": 5, "c": 3, "d": 1}, dora=("b", "d"))
    names = ["a", BASE, "b", "c", "b", "d", "a"]
    x = torch.randn(len(names), 3, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = mixed_batch(x, params, names, base=layer)
    assert y.dtype == base_forward(layer, x).dtype
    assert y.shape == (len(names), 3, 48)
    assert_close_rel(y, _per_row(layer, params, names, x), dtype, factor=2)
    assert_close_rel(y, _per_row_dense(layer, params, names, x), dtype, factor=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("path")
def test_weight_norm_given_equals_computed(dtype):
    layer = make_layer(dtype=dtype)
    params = _adapters(layer, {"a": 2, "b": 4, "c": 3}, dora=("b", "c"))
    names = ["b", "a", "c", BASE]
    x = torch.randn(4, 64).to(dtype)
    norms = {n: dora_weight_norm(layer, params[n]) for n in ("b", "c")}
    y_given = mixed_batch(x, params, names, base=layer, weight_norm=norms)
    assert torch.equal(y_given, mixed_batch(x, params, names, base=layer))
    # Only some norms given: the rest are computed.
    y_partial = mixed_batch(x, params, names, base=layer, weight_norm={"c": norms["c"]})
    assert torch.equal(y_given, y_partial)
    per_row = apply_lora(layer, params["b"], x[:1], weight_norm=norms["b"])
    assert_close_rel(y_given[:1], per_row, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("path")
def test_without_base_is_the_adapter_term(dtype):
    layer = make_layer(dtype=dtype)
    params = _adapters(layer, {"a": 2, "b": 6}, dtype=dtype)
    names = ["b", BASE, "a", "a"]
    x = torch.randn(4, 2, 64).to(dtype)
    term = mixed_batch(x, params, names)
    assert term.dtype == dtype
    assert torch.all(term[1] == 0)
    assert_close_rel(
        base_forward(layer, x) + term, _per_row(layer, params, names, x), dtype, factor=2
    )


@pytest.mark.usefixtures("path")
def test_all_base_rows_and_adapter_dtype_differs_from_base():
    layer = make_layer(dtype=torch.bfloat16)
    params = _adapters(layer, {"a": 2})  # float32 adapters on a bf16 base, as PEFT
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(mixed_batch(x, params, [BASE] * 3, base=layer), base_forward(layer, x))
    assert torch.equal(mixed_batch(x, params, [BASE] * 3), torch.zeros(3, 48))
    y = mixed_batch(x, params, ["a", BASE, "a"], base=layer)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, _per_row(layer, params, ["a", BASE, "a"], x), torch.bfloat16)


@pytest.mark.usefixtures("path")
def test_inputs_are_not_mutated():
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    before = copy.deepcopy(params)
    W_q, scale, zero = layer.W_q.clone(), layer.meta["scale"].clone(), layer.meta["zero"].clone()
    x = torch.randn(3, 64)
    x0 = x.clone()
    mixed_batch(x, params, ["a", "b", BASE], base=layer)
    assert torch.equal(x, x0)
    for name in params:
        for key in params[name]:
            assert torch.equal(params[name][key], before[name][key])
    assert torch.equal(layer.W_q, W_q)
    assert torch.equal(layer.meta["scale"], scale) and torch.equal(layer.meta["zero"], zero)


@pytest.mark.usefixtures("path")
def test_gradients_match_per_row():
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    leaves = {
        n: {k: v.clone().requires_grad_(k != "scaling") for k, v in p.items()}
        for n, p in params.items()
    }
    names = ["a", "b", BASE, "b"]
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    mixed_batch(x, leaves, names, base=layer).square().sum().backward()
    got = {n: {k: v.grad for k, v in p.items() if k != "scaling"} for n, p in leaves.items()}
    leaves2 = {
        n: {k: v.clone().requires_grad_(k != "scaling") for k, v in p.items()}
        for n, p in params.items()
    }
    _per_row(layer, leaves2, names, x).square().sum().backward()
    for n in leaves2:
        for k, v in leaves2[n].items():
            if k != "scaling":
                torch.testing.assert_close(got[n][k], v.grad, rtol=1e-4, atol=1e-5)


# -- the bank -----------------------------------------------------------------------


def test_stack_adapters_layout():
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 5}, dora=("b",))
    bank = stack_adapters(params)
    assert isinstance(bank, AdapterBank)
    assert bank.names == ("a", "b") and bank.dora == (False, True)
    assert bank.lora_A.shape == (2, 5, 64) and bank.lora_B.shape == (2, 48, 5)
    assert torch.equal(bank.lora_A[0, :2], params["a"]["lora_A"])
    assert torch.all(bank.lora_A[0, 2:] == 0) and torch.all(bank.lora_B[0, :, 2:] == 0)
    assert torch.equal(bank.scaling, torch.tensor([0.5, 1.5]))
    assert torch.equal(bank.magnitude[0], torch.ones(48))
    assert torch.equal(bank.magnitude[1], params["b"]["magnitude"])
    assert bank.is_dora.tolist() == [False, True]
    ordered = stack_adapters(params, ["b", "a"], max_rank=8)
    assert ordered.names == ("b", "a") and ordered.lora_A.shape == (2, 8, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("path")
def test_indexed_equals_names_form(dtype):
    layer = make_layer(dtype=dtype)
    params = _adapters(layer, {"a": 2, "b": 5, "c": 3}, dora=("c",))
    bank = stack_adapters(params, max_rank=8)
    norms = bank_weight_norm(layer, bank)
    names = ["c", BASE, "a", "b", "c"]
    index = torch.tensor([2, -1, 0, 1, 2])
    x = torch.randn(5, 2, 64).to(dtype)
    y = mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)
    assert torch.equal(y, mixed_batch_indexed(x, bank, index, base=layer))
    assert_close_rel(y, _per_row(layer, params, names, x), dtype, factor=2)
    assert torch.equal(norms[0], torch.ones(48))
    assert torch.equal(norms[2], dora_weight_norm(layer, params["c"]))


def _count_ops(fn):
    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.n


def test_kernel_count_does_not_grow_with_adapters(monkeypatch):
    # The batched form (the one compiled and run on accelerators); on the CPU the loop
    # runs instead where it is cheaper (test_loop_reads_only_the_adapters_in_the_batch).
    monkeypatch.setattr(mixed_module, "_loop_pays", lambda *args: False)
    layer = make_layer()
    x = torch.randn(8, 64)

    def ops(n_adapters):
        params = _adapters(layer, {f"a{k}": 1 + k % 4 for k in range(n_adapters)}, dora=("a1",))
        bank = stack_adapters(params, max_rank=4)
        norms = bank_weight_norm(layer, bank)
        index = (
            torch.arange(8).remainder(n_adapters).to(torch.int64)
            - (torch.arange(8) == 3).long() * 99
        )
        index = index.clamp(min=-1)
        return _count_ops(
            lambda: mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)
        )

    assert ops(2) == ops(16)


# -- PEFT parity ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbits", "dtype", "bias"),
    [
        (4, torch.float32, True),
        (2, torch.bfloat16, False),
        (8, torch.float16, True),
        (3, torch.float32, False),
    ],
)
@pytest.mark.usefixtures("path")
def test_matches_peft_mixed_batch_forward(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = PeftHqq(
        layer, "a", config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), r=4, lora_alpha=8
    )
    for name, r, alpha in (("b", 2, 3), ("c", 6, 12)):
        peft.update_layer(
            name,
            r,
            lora_alpha=alpha,
            config=LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False),
        )
    peft.eval()
    params = {
        n: {
            "lora_A": peft.lora_A[n].weight.detach(),
            "lora_B": peft.lora_B[n].weight.detach(),
            "scaling": torch.tensor(peft.scaling[n]),
        }
        for n in ("a", "b", "c")
    }
    names = ["c", "a", BASE, "b", "a", "c"]
    x = torch.randn(6, 5, 64).to(dtype)
    with torch.no_grad():
        expected = peft(x, adapter_names=names)
        got = mixed_batch(x, params, names, base=layer)
    assert got.dtype == expected.dtype
    assert_close_rel(got, expected, dtype, factor=2)


# -- hypothesis ----------------------------------------------------------------------

_LAYERS = {}


def _cached_layer(nbits, dtype, bias, shape):
    key = (nbits, dtype, bias, shape)
    if key not in _LAYERS:
        _LAYERS[key] = make_layer(shape[1], shape[0], nbits=nbits, dtype=dtype, bias=bias)
    return _LAYERS[key]


@given(
    nbits=st.sampled_from([2, 4, 8]),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    shape=st.sampled_from([(16, 32), (48, 64), (32, 128)]),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    dora=st.lists(st.booleans(), min_size=5, max_size=5),
    seq=st.integers(1, 3),
    data=st.data(),
)
def test_mixed_batch_equals_per_row_property(nbits, dtype, bias, shape, ranks, dora, seq, data):
    layer = _cached_layer(nbits, dtype, bias, shape)
    adapter_names = [f"n{k}" for k in range(len(ranks))]
    params = {
        name: random_adapter(layer, r, scaling=1.5, dora=dora[k], seed=k, dtype=dtype)
        for k, (name, r) in enumerate(zip(adapter_names, ranks, strict=True))
    }
    names = data.draw(st.lists(st.sampled_from([*adapter_names, BASE]), min_size=1, max_size=6))
    x = torch.randn(len(names), seq, shape[1]).to(dtype)
    loop = data.draw(st.booleans(), label="loop")
    with mock.patch.object(mixed_module, "_loop_pays", lambda *args: loop):
        y = mixed_batch(x, params, names, base=layer)
    assert_close_rel(y, _per_row(layer, params, names, x), dtype, factor=2)


# -- errors --------------------------------------------------------------------------


@pytest.mark.usefixtures("path")
def test_errors():
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"among \['a', 'b', '__base__'\], got 'zz'"):
        mixed_batch(x, params, ["a", "zz", BASE], base=layer)
    with pytest.raises(ValueError, match="one adapter name per row of x \\(3\\), got 2"):
        mixed_batch(x, params, ["a", "a"], base=layer)
    with pytest.raises(ValueError, match=r"Expected `base` for DoRA adapters \['b'\]"):
        mixed_batch(x, params, ["a", "b", BASE])
    with pytest.raises(ValueError, match="only for DoRA adapters"):
        mixed_batch(x, params, ["a", "b", BASE], base=layer, weight_norm={"a": torch.ones(48)})
    with pytest.raises(ValueError, match="reserved"):
        mixed_batch(x, {BASE: params["a"]}, ["a", "a", "a"])
    with pytest.raises(ValueError, match="to fit the layer"):
        mixed_batch(x, {"w": random_adapter(make_layer(32, 48), 2)}, ["w"] * 3, base=layer)
    with pytest.raises(ValueError, match=r"ranks <= max_rank=2, got rank 3 \(\['b'\]\)"):
        stack_adapters(params, max_rank=2)
    with pytest.raises(ValueError, match="to fit the layer"):
        stack_adapters({"a": params["a"], "w": random_adapter(make_layer(32, 48), 2)})
    with pytest.raises(TypeError, match="one dtype"):
        stack_adapters({"a": params["a"], "h": random_adapter(layer, 2, dtype=torch.float16)})
    half = {"a": params["a"], "h": random_adapter(layer, 2, dtype=torch.float16)}
    with pytest.raises(TypeError, match=r"all adapters in one dtype \(torch.float32\)"):
        mixed_batch(x, half, ["a", "h", BASE], base=layer)
    with pytest.raises(ValueError, match="at least one adapter"):
        stack_adapters({})
    bank = stack_adapters(params)
    with pytest.raises(ValueError, match=r"`index` of shape \(3,\)"):
        mixed_batch_indexed(x, bank, torch.tensor([0, 1]), base=layer)
    with pytest.raises(ValueError, match=r"values in \[-1, 2\), got values in \[-1, 2\]"):
        mixed_batch_indexed(x, bank, torch.tensor([0, -1, 2]), base=layer)
    with pytest.raises(TypeError, match="integer tensor"):
        mixed_batch_indexed(x, bank, torch.tensor([0.0, 1.0, 0.0]), base=layer)
    with pytest.raises(ValueError, match="DoRA"):
        mixed_batch_indexed(x, bank, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"`weight_norm` of shape \(2, 48\)"):
        mixed_batch_indexed(
            x, bank, torch.tensor([0, 1, 0]), base=layer, weight_norm=torch.ones(48)
        )
    with pytest.raises(ValueError, match=r"\(out, in\) = \(48, 32\)"):
        mixed_batch_indexed(
            torch.randn(3, 64), bank, torch.tensor([0, 1, 0]), base=make_layer(32, 48)
        )
    with pytest.raises(ValueError, match=r"x` of shape \(batch, ..., 64\)"):
        mixed_batch_indexed(torch.randn(3, 32), bank, torch.tensor([0, 1, 0]), base=layer)


# dynamo inspects captured tensors' .grad; torch warns about that for non-leaf ones
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_indexed_form_compiles_without_graph_breaks():
    layer = make_layer()
    params = _adapters(layer, {"a": 1, "b": 3, "c": 4}, dora=("b",))
    bank = stack_adapters(params, max_rank=4)
    norms = bank_weight_norm(layer, bank)

    @torch.compile(fullgraph=True, dynamic=False)
    def serve(x, index, norms):
        return mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)

    x = torch.randn(4, 64)
    for index in ([0, 1, -1, 2], [2, 2, 1, -1]):
        index = torch.tensor(index)
        eager = mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)
        assert_close_rel(serve(x, index, norms), eager, torch.float32)
    # Compiled, the norm's values are not checked (no host sync): a NaN in DoRA adapter b's
    # norm stays in b's rows. Same graph, no recompilation.
    broken = norms.clone()
    broken[1, 7] = float("nan")
    index = torch.tensor([1, 0, -1, 2])
    y, y_broken = serve(x, index, norms), serve(x, index, broken)
    assert not torch.isfinite(y_broken[0]).all()
    assert torch.equal(y_broken[1:], y[1:])


# -- a broken adapter stays in its rows ------------------------------------------------


def _broken(p, key, bad):
    p = {k: v.clone() for k, v in p.items()}
    if key == "scaling":
        p[key] = torch.tensor(bad)
    else:
        p[key].view(-1)[3] = bad  # one entry: NaN/inf then spreads through the row
    return p


def _run(form, x, params, names, base):
    if form == "names":
        return mixed_batch(x, params, names, base=base)
    bank = stack_adapters(params)
    index = torch.tensor([bank.names.index(n) if n != BASE else -1 for n in names])
    return mixed_batch_indexed(x, bank, index, base=base)


@pytest.mark.parametrize("form", ["names", "indexed"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    ("a_is_dora", "key", "with_base"),
    [
        (False, "lora_A", True),
        (False, "lora_B", True),
        (False, "scaling", True),
        (True, "lora_A", True),
        (True, "lora_B", True),
        (True, "scaling", True),
        (True, "magnitude", True),
        (False, "lora_A", False),
        (False, "lora_B", False),
        (False, "scaling", False),
    ],
)
@pytest.mark.usefixtures("path")
def test_broken_adapter_stays_in_its_rows(a_is_dora, key, with_base, bad, form):
    # "a" is stacked first: slot 0, the one "__base__" rows used to gather and multiply by 0.
    layer = make_layer()
    base = layer if with_base else None
    clean = _adapters(layer, {"a": 3, "b": 2, "d": 4}, dora=("a", "d") if a_is_dora else ("d",))
    if not with_base:
        del clean["d"]  # DoRA needs the base
    params = {**clean, "a": _broken(clean["a"], key, bad)}
    names = ["a", BASE, "b", "d", "a", BASE] if with_base else ["a", BASE, "b", "a", BASE, "b"]
    others = [i for i, n in enumerate(names) if n != "a"]
    x = torch.randn(len(names), 2, 64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    leaves = {
        n: {k: v.requires_grad_(k != "scaling") for k, v in p.items()} for n, p in params.items()
    }
    y = _run(form, x, leaves, names, base)
    assert not torch.isfinite(y[names.index("a")]).all()  # the break is real
    assert torch.isfinite(y[others]).all()
    if with_base:
        expected = _per_row(layer, clean, names, x.detach())
    else:
        expected = _per_row(layer, clean, names, x.detach()) - base_forward(layer, x.detach())
    assert_close_rel(y[others], expected[others], torch.float32, factor=2)
    # Gradients: the other rows' x and the other adapters never see "a" either.
    grads = torch.autograd.grad(y[others].sum(), [x, *(leaves[n]["lora_B"] for n in leaves)])
    assert torch.isfinite(grads[0][others]).all()
    assert all(torch.isfinite(g).all() for n, g in zip(leaves, grads[1:], strict=True) if n != "a")
    x_clean = x.detach().clone().requires_grad_(True)
    clean_leaves = {
        n: {k: v.clone().requires_grad_(k != "scaling") for k, v in p.items()}
        for n, p in clean.items()
    }
    y_clean = _run(form, x_clean, clean_leaves, names, base)
    clean_grads = torch.autograd.grad(
        y_clean[others].sum(), [x_clean, *(clean_leaves[n]["lora_B"] for n in clean_leaves)]
    )
    assert torch.equal(y[others], y_clean[others])
    assert torch.equal(grads[0][others], clean_grads[0][others])
    for n, g, g_clean in zip(leaves, grads[1:], clean_grads[1:], strict=True):
        if n != "a":
            assert torch.equal(g, g_clean), n


# -- edge cases: 0 rows, index dtypes, weight_norm values, devices ------------------------


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("shape", [(0, 64), (0, 3, 64)])
def test_zero_rows_give_an_empty_result(shape, dora):
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",) if dora else ())
    bank = stack_adapters(params)
    x = torch.randn(shape)
    out_shape = (*shape[:-1], 48)
    for index_dtype in (torch.int64, torch.int32):
        y = mixed_batch_indexed(x, bank, torch.zeros(0, dtype=index_dtype), base=layer)
        assert y.shape == out_shape and y.dtype == torch.float32
    assert mixed_batch(x, params, [], base=layer).shape == out_shape
    if not dora:
        assert mixed_batch_indexed(x, bank, torch.zeros(0, dtype=torch.int64)).shape == out_shape


@pytest.mark.usefixtures("path")
def test_index_dtypes():
    # int32 and int64 index; narrower ones are refused: uint8 cannot hold -1 (and torch reads
    # a uint8 index as a mask), int8/int16 do not index at all.
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    bank = stack_adapters(params)
    x = torch.randn(4, 64)
    names = ["b", BASE, "a", "b"]
    index = torch.tensor([1, -1, 0, 1])
    y32 = mixed_batch_indexed(x, bank, index.int(), base=layer)
    assert_close_rel(y32, _per_row(layer, params, names, x), torch.float32, factor=2)
    assert torch.equal(y32, mixed_batch_indexed(x, bank, index, base=layer))
    for dtype in (torch.uint8, torch.int8, torch.int16):
        with pytest.raises(
            TypeError,
            match=rf"`index` to be an integer tensor of dtype torch.int32 or torch.int64, got {dtype}",
        ):
            mixed_batch_indexed(x, bank, index.clamp(min=0).to(dtype), base=layer)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.usefixtures("path")
def test_weight_norm_must_be_positive_and_finite(bad):
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    bank = stack_adapters(params)
    norm = dora_weight_norm(layer, params["b"]).clone()
    norm[5] = bad
    x = torch.randn(3, 64)
    names, index = ["a", "b", BASE], torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match=r"`weight_norm\['b'\]` with positive finite entries"):
        mixed_batch(x, params, names, base=layer, weight_norm={"b": norm})
    with pytest.raises(ValueError, match=r"`weight_norm\['b'\]` with positive finite entries"):
        bank_weight_norm(layer, bank, {"b": norm})
    with pytest.raises(ValueError, match=r"`weight_norm\['b'\]` with positive finite entries"):
        mixed_batch_indexed(x, bank, index, base=layer, weight_norm={"b": norm})
    norms = torch.stack([torch.ones(48), norm])
    with pytest.raises(ValueError, match=r"`weight_norm \(its DoRA rows\)` with positive finite"):
        mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)
    # A bad norm is refused even for an adapter that no row uses.
    with pytest.raises(ValueError, match=r"`weight_norm\['b'\]` with positive finite entries"):
        mixed_batch(x, params, ["a", "a", BASE], base=layer, weight_norm={"b": norm})
    # The LoRA rows of a stacked norm are not read (LoRA has c = 1).
    good = bank_weight_norm(layer, bank)
    y = mixed_batch_indexed(x, bank, index, base=layer, weight_norm=good)
    lora_row_bad = torch.stack([torch.full((48,), bad), good[1]])
    assert torch.equal(mixed_batch_indexed(x, bank, index, base=layer, weight_norm=lora_row_bad), y)


def test_meta_x_is_refused():
    layer = make_layer()
    params = _adapters(layer, {"a": 2})
    x = torch.randn(2, 64, device="meta")
    with pytest.raises(ValueError, match="`x` to hold data, got a tensor on the meta device"):
        mixed_batch(x, params, ["a", BASE], base=layer)
    with pytest.raises(ValueError, match="`x` to hold data, got a tensor on the meta device"):
        mixed_batch_indexed(x, stack_adapters(params), torch.tensor([0, -1]), base=layer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_that_do_not_fit_are_refused():
    layer = make_layer()  # on the CPU
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    on_cuda = {n: {k: v.cuda() for k, v in p.items()} for n, p in params.items()}
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"`params_by_name\['a'\]` on the base layer's device cpu"):
        mixed_batch(x, on_cuda, ["a", "b"], base=layer)
    with pytest.raises(
        ValueError, match=r"Expected `x` on the (base layer's|adapters') device cpu"
    ):
        mixed_batch(x.cuda(), params, ["a", "b"], base=layer)
    with pytest.raises(ValueError, match=r"Expected all adapters on one device"):
        stack_adapters({"a": params["a"], "b": on_cuda["b"]})
    bank = stack_adapters(params)
    index = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"Expected `x` on the adapters' device cpu"):
        mixed_batch_indexed(x.cuda(), bank, index, base=layer)
    with pytest.raises(ValueError, match=r"Expected `index` on the adapters' device cpu"):
        mixed_batch_indexed(x, bank, index.cuda(), base=layer)
    with pytest.raises(ValueError, match=r"adapters on the base layer's device cpu"):
        mixed_batch_indexed(x.cuda(), stack_adapters(on_cuda), index.cuda(), base=layer)
    with pytest.raises(ValueError, match=r"`weight_norm` on the adapters' device cpu"):
        mixed_batch_indexed(
            x, bank, index, base=layer, weight_norm=bank_weight_norm(layer, bank).cuda()
        )


# -- the adapter term, against the float64 reference --------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["names", "indexed"])
@pytest.mark.usefixtures("path")
def test_adapter_terms_match_reference_per_row(form, dtype):
    # Adapters whose term is as large as the base output, DoRA magnitudes away from init:
    # a term a few % off shows (the whole-output tolerance would hide it).
    layer = make_layer(dtype=dtype)
    params = {
        "a": strong_adapter(layer, 2, seed=1, dtype=dtype),
        "b": strong_adapter(layer, 5, dora=True, seed=2, dtype=dtype),
        "c": strong_adapter(layer, 3, dora=True, seed=3, dtype=dtype),
    }
    names = ["b", "a", BASE, "c", "a", "b"]
    x = torch.randn(len(names), 3, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = _run(form, x, params, names, layer)
    y_base = base_forward(layer, x)
    expected = _per_row_dense(layer, params, names, x)
    expected_base = dense_reference(layer, [], x)
    for i in range(len(names)):
        assert_term_close(y[i], y_base[i], expected[i], expected_base[i], dtype)


# -- what mutants of _mixed.py showed untested ---------------------------------------------


@pytest.mark.usefixtures("path")
def test_given_weight_norms_are_the_ones_used():
    # A norm that is not the computed one (as after training moved A and B): c = m / n_given.
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3, "c": 4}, dora=("b",))
    names = ["b", "a", BASE, "b"]
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    n_given = 1.3 * dora_weight_norm(layer, params["b"])
    W = dequantize(layer).double()
    p = params["b"]
    merged = W + p["scaling"].double() * p["lora_B"].double() @ p["lora_A"].double()
    c = p["magnitude"].double() / n_given.double()
    expected_b = c * (x.double() @ merged.T) + layer.bias.double()
    # "c" is not in the batch: its (valid) norm is accepted and not used.
    norms = {"b": n_given, "c": torch.ones(48)}
    params["c"] = {**params["c"], "magnitude": torch.ones(48)}
    y = mixed_batch(x, params, names, base=layer, weight_norm=norms)
    assert_close_rel(y[[0, 3]], expected_b[[0, 3]], torch.float32, factor=2)
    bank = stack_adapters(params, ["a", "b"])
    y_indexed = mixed_batch_indexed(
        x, bank, torch.tensor([1, 0, -1, 1]), base=layer, weight_norm={"b": n_given}
    )
    assert_close_rel(y_indexed[[0, 3]], expected_b[[0, 3]], torch.float32, factor=2)


@pytest.mark.usefixtures("path")
def test_weight_norm_gets_no_gradient():
    # n is detached (DESIGN): c = magnitude / n carries gradient to the magnitude only.
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    bank = stack_adapters(params)
    norms = bank_weight_norm(layer, bank).clone().requires_grad_(True)
    magnitude = bank.magnitude.clone().requires_grad_(True)
    bank = bank._replace(magnitude=magnitude)
    y = mixed_batch_indexed(
        torch.randn(3, 64), bank, torch.tensor([1, 0, 1]), base=layer, weight_norm=norms
    )
    y.sum().backward()
    assert norms.grad is None
    assert magnitude.grad is not None and magnitude.grad[1].abs().sum() > 0


@pytest.mark.usefixtures("path")
def test_more_errors():
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3})
    x = torch.randn(3, 64)
    bank = stack_adapters(params)
    with pytest.raises(ValueError, match=r"values in \[-1, 2\), got values in \[-2, 1\]"):
        mixed_batch_indexed(x, bank, torch.tensor([0, -2, 1]), base=layer)
    with pytest.raises(ValueError, match=r"Expected distinct names in `names_order`"):
        stack_adapters(params, ["a", "a"])
    half_magnitude = {**params["a"], "magnitude": torch.ones(48, dtype=torch.float16)}
    with pytest.raises(TypeError, match=r"Expected all adapters in one dtype"):
        stack_adapters({"a": half_magnitude})
    with pytest.raises(ValueError, match=r"Expected no `weight_norm` for a bank without DoRA"):
        mixed_batch_indexed(
            x, bank, torch.tensor([0, 1, 0]), base=layer, weight_norm=torch.ones(2, 48)
        )
    # Only "__base__" rows and no base: the zero term comes in the adapters' dtype.
    term = mixed_batch(x.to(torch.bfloat16), params, [BASE] * 3)
    assert term.dtype == torch.float32 and term.shape == (3, 48) and not term.any()


# -- the eager CPU loop over the adapters in the batch ----------------------------------------


def _rows_for(used, rows):
    """Round-robin over ``used`` adapters, the last row through the base."""
    return [f"a{i % used}" for i in range(rows - 1)] + [BASE]


@pytest.mark.parametrize("form", ["names", "indexed"])
def test_loop_runs_exactly_where_it_pays(form):
    # On each side of the switch, the real choice (no patching) runs the algorithm that
    # _loop_pays names and equals the float64 reference per row, DoRA included.
    layer = make_layer(256, 192)
    rows, rank = 10, 4
    pays = [u for u in range(1, rows) if mixed_module._loop_pays(rows, u, rank, 256, 192)]
    assert pays and pays == list(range(1, len(pays) + 1)) and len(pays) < rows - 1, pays
    last_loop = len(pays)
    x = torch.randn(rows, 2, 256, generator=torch.Generator().manual_seed(0))
    params = {
        f"a{k}": random_adapter(layer, rank, scaling=1.5, dora=k == 1, seed=k) for k in range(rows)
    }
    for used, loop in ((last_loop, True), (last_loop + 1, False)):
        names = _rows_for(used, rows)
        spy = mock.patch.object(mixed_module, "_loop_forward", wraps=mixed_module._loop_forward)
        with spy as loop_forward:
            if form == "names":
                y = mixed_batch(x, params, names, base=layer)
            else:
                # A bank holding unused adapters too: only those in the batch count.
                bank = stack_adapters(params)
                index = torch.tensor([bank.names.index(n) if n != BASE else -1 for n in names])
                y = mixed_batch_indexed(x, bank, index, base=layer)
        assert loop_forward.called == loop, used
        assert_close_rel(y, _per_row_dense(layer, params, names, x), torch.float32, factor=4)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("form", ["names", "indexed"])
@pytest.mark.parametrize(
    "names",
    [
        ["a", "a", "a"],  # one adapter has every row: nothing to sort
        ["d", "d", "d"],
        ["a", BASE, "a"],
        [BASE, "d", "a", "d", "a"],
        ["a", "a", "d", "d"],  # already sorted
    ],
)
@pytest.mark.parametrize("with_base", [True, False])
def test_row_groupings_match_reference(form, names, with_base):
    layer = make_layer()
    params = {
        "a": strong_adapter(layer, 3, seed=1),
        "d": strong_adapter(layer, 2, dora=with_base, seed=2),
    }
    x = torch.randn(len(names), 2, 64, generator=torch.Generator().manual_seed(3))
    y = _run(form, x, params, names, layer if with_base else None)
    expected = _per_row_dense(layer, params, names, x)
    if with_base:
        assert_close_rel(y, expected, torch.float32, factor=4)
    else:
        assert_close_rel(y, expected - dense_reference(layer, [], x), torch.float32, factor=4)


def test_loop_reads_only_the_adapters_in_the_batch(monkeypatch):
    # Its work grows with the adapters the batch uses, not with the bank's size.
    monkeypatch.setattr(mixed_module, "_loop_pays", lambda *args: True)
    layer = make_layer()
    x = torch.randn(8, 64)
    index = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1])

    def ops(n_adapters):
        params = _adapters(layer, {f"a{k}": 1 + k % 4 for k in range(n_adapters)}, dora=("a1",))
        bank = stack_adapters(params, max_rank=4)
        norms = bank_weight_norm(layer, bank)
        return _count_ops(
            lambda: mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)
        )

    assert ops(2) == ops(16)


# dynamo inspects captured tensors' .grad; torch warns about that for non-leaf ones
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_transforms_and_compile_run_the_batched_form_where_the_loop_would(monkeypatch):
    # The loop reads the index on the host and has data-dependent shapes: under
    # torch.func transforms and torch.compile the batched form runs, with the same result.
    monkeypatch.setattr(mixed_module, "_loop_pays", lambda *args: True)
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    names = ["a", "b", BASE, "b"]
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    bank = stack_adapters(params)
    index = torch.tensor([0, 1, -1, 1])
    norms = bank_weight_norm(layer, bank)
    # torch.func.grad w.r.t. the adapters equals eager autograd through the loop.
    leaves = {
        n: {k: v.clone().requires_grad_(True) for k, v in p.items()} for n, p in params.items()
    }
    mixed_batch(x, leaves, names, base=layer).square().sum().backward()
    grads = torch.func.grad(lambda p: mixed_batch(x, p, names, base=layer).square().sum())(params)
    for n in params:
        for k in ("lora_A", "lora_B", "magnitude"):
            if k in params[n]:
                torch.testing.assert_close(grads[n][k], leaves[n][k].grad, rtol=1e-4, atol=1e-5)
    # vmap over inputs: each equals the eager (loop) result.
    xs = torch.stack([x, 2 * x])
    ys = torch.func.vmap(lambda xi: mixed_batch_indexed(xi, bank, index, base=layer))(xs)
    for xi, yi in zip(xs, ys, strict=True):
        assert_close_rel(yi, mixed_batch_indexed(xi, bank, index, base=layer), torch.float32)

    @torch.compile(fullgraph=True, dynamic=False)
    def serve(x, index, norms):
        return mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)

    expected = _per_row_dense(layer, params, names, x)
    assert_close_rel(serve(x, index, norms), expected, torch.float32, factor=4)


@pytest.mark.parametrize("form", ["names", "indexed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loop_rounds_once_as_apply_lora(monkeypatch, form, dtype):
    # float32 adapters on a half-precision base (PEFT's default): the term is added in
    # float32 and the sum rounded once, as apply_lora does: the same bits on those rows.
    monkeypatch.setattr(mixed_module, "_loop_pays", lambda *args: True)
    layer = make_layer(dtype=dtype)
    params = {"a": strong_adapter(layer, 4, seed=1)}
    names = ["a", BASE, "a", "a"]
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = _run(form, x, params, names, layer)
    assert torch.equal(y[[0, 2, 3]], apply_lora(layer, params["a"], x[[0, 2, 3]]))
    assert torch.equal(y[1], base_forward(layer, x)[1])


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("form", ["names", "indexed"])
def test_cpu_autocast_matches_per_row(form):
    # Under CPU autocast the output comes in the base output's dtype, within bf16 of the
    # reference (the eager loop leaves autocast to the batched form).
    layer = make_layer()
    params = _adapters(layer, {"a": 2, "b": 3}, dora=("b",))
    names = ["a", "b", BASE, "a"]
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _run(form, x, params, names, layer)
        assert y.dtype == base_forward(layer, x).dtype == torch.bfloat16
    assert_close_rel(y, _per_row_dense(layer, params, names, x), torch.bfloat16, factor=2)
