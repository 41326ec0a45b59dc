"""The decode kernels (CUDA + Triton): skipped on machines without a GPU (CI has none).

Every result is compared with the float64 product of HQQ's dequantized weight
(``helpers.dense_reference``), with tolerances from the compute dtype.
"""

import pytest
import torch
from helpers import assert_close_rel, cuda_layer, dense_reference, random_adapter

import hqqlora
from hqqlora import _decode, _gluon, _gluon_fold, _gluon_gemv
from hqqlora._base import quant_layout

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(_decode.triton is None, reason="needs Triton"),
]

HALF = (torch.bfloat16, torch.float16)


def cuda_adapter(layer, *, dtype=torch.float32, dora=False, seed=1, r=8):
    p = random_adapter(layer, r=r, dora=dora, seed=seed, dtype=dtype)
    return {k: v.cuda() for k, v in p.items()}


def uses_decode(fn, monkeypatch):
    calls = []
    real = _decode.lora_decode

    def spy(*args, **kwargs):  # counts the calls that carry an adapter
        if kwargs.get("lora_A") is not None:
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_decode, "lora_decode", spy)
    out = fn()
    monkeypatch.setattr(_decode, "lora_decode", real)
    return out, bool(calls)


@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_base_decode_matches_the_float64_product(nbits, dtype, tokens, monkeypatch):
    layer = cuda_layer(nbits, dtype)
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        got = hqqlora.base_forward(layer, x)
        exact = hqqlora.base_forward(layer, x, exact=True)
    assert torch.equal(exact, layer(x))
    assert_close_rel(got, _base_ref(layer, x), dtype)


def _base_ref(layer, x):
    y = x.double() @ hqqlora.dequantize(layer).double().T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_apply_lora_decode_matches_the_float64_reference(
    nbits, dtype, tokens, bias, dora, adapter_dtype, monkeypatch
):
    layer = cuda_layer(nbits, dtype, bias=bias)
    p = cuda_adapter(layer, dtype=adapter_dtype, dora=dora)
    norm = hqqlora.dora_weight_norm(layer, p) if dora else None
    x = torch.randn(2, tokens, 512, device="cuda", dtype=dtype)[:1]
    with torch.no_grad():
        got, fused = uses_decode(
            lambda: hqqlora.apply_lora(layer, p, x, weight_norm=norm), monkeypatch
        )
        dense = hqqlora.apply_lora(layer, p, x, weight_norm=norm, exact=True)
    assert fused and got.shape == dense.shape and got.dtype == dtype
    ref = dense_reference(layer, p, x)
    # The held norm is rounded to the compute dtype: allow for it (DoRA).
    assert_close_rel(got, ref, dtype, factor=2 if dora else 1)
    # The dense path casts x to the adapters' dtype (PEFT's rule): bf16 adapters see bf16 x.
    coarser = torch.bfloat16 if adapter_dtype == torch.bfloat16 else dtype
    assert_close_rel(dense, ref, coarser, factor=2 if dora else 1)


def test_decode_is_deterministic_and_graph_capturable():
    layer = cuda_layer(4, torch.bfloat16, size=(1024, 1024))
    p = cuda_adapter(layer, dora=True)
    norm = hqqlora.dora_weight_norm(layer, p)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        first = hqqlora.apply_lora(layer, p, x, weight_norm=norm)
        assert all(
            torch.equal(first, hqqlora.apply_lora(layer, p, x, weight_norm=norm)) for _ in range(5)
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            hqqlora.apply_lora(layer, p, x, weight_norm=norm)  # warm up off the default stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = hqqlora.apply_lora(layer, p, x, weight_norm=norm)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, hqqlora.apply_lora(layer, p, x, weight_norm=norm))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_decode_uses_the_kernels():
    from torch._dynamo.testing import EagerAndRecordGraphs

    layer = cuda_layer(4, torch.bfloat16)
    p = cuda_adapter(layer)
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    backend = EagerAndRecordGraphs()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(
            lambda xx: hqqlora.apply_lora(layer, p, xx), backend=backend, fullgraph=True
        )(x)
        compiled = torch.compile(lambda xx: hqqlora.apply_lora(layer, p, xx), fullgraph=True)(x)
    ops = [str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("lora_decode" in o for o in ops)
    ref = dense_reference(layer, p, x)
    assert_close_rel(got, ref, torch.bfloat16)
    assert_close_rel(compiled, ref, torch.bfloat16)


@pytest.mark.parametrize(
    "case",
    ["3bit", "axis0", "fp32", "grad", "dropout", "tokens17", "x_fp32", "group_constant"],
)
def test_decode_falls_back_where_it_does_not_apply(case, monkeypatch):
    nbits = 3 if case == "3bit" else 4
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    layer = cuda_layer(nbits, dtype, axis=0 if case == "axis0" else 1)
    p = cuda_adapter(layer)
    if case == "group_constant":
        p["lora_A"] = p["lora_A"][:, :8].contiguous()
    tokens = 17 if case == "tokens17" else 2
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.float32 if case == "x_fp32" else dtype)
    if case == "grad":
        p["lora_B"].requires_grad_(True)
    kwargs = (
        {"dropout": 0.1, "generator": torch.Generator("cuda").manual_seed(0)}
        if case == "dropout"
        else {}
    )
    with torch.no_grad() if case != "grad" else torch.enable_grad():
        got, fused = uses_decode(lambda: hqqlora.apply_lora(layer, p, x, **kwargs), monkeypatch)
    assert not fused
    if case == "grad":
        got.sum().backward()
        assert p["lora_B"].grad is not None


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("dtype", HALF)
def test_mixed_decode_equals_per_row_application(dtype, rows, dora, monkeypatch):
    layer = cuda_layer(4, dtype, size=(384, 512))
    names = [f"a{i}" for i in range(5)]
    adapters = {
        n: cuda_adapter(layer, dora=dora and i % 2 == 0, seed=i, r=4 + i)
        for i, n in enumerate(names)
    }
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank) if dora else None
    gen = torch.Generator().manual_seed(rows)
    index = torch.randint(-1, len(names), (rows,), generator=gen).to("cuda")
    x = torch.randn(rows, 1, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        got, fused = uses_decode(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
        )
    assert fused and got.shape == (rows, 1, 384)
    for i in range(rows):
        k = int(index[i])
        ref = _base_ref(layer, x[i]) if k < 0 else dense_reference(layer, adapters[names[k]], x[i])
        assert_close_rel(got[i], ref, dtype, factor=2 if dora else 1)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_mixed_decode_tokens_per_row_and_compile():
    layer = cuda_layer(4, torch.bfloat16)
    adapters = {"a": cuda_adapter(layer, seed=1), "b": cuda_adapter(layer, dora=True, seed=2)}
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank)
    index = torch.tensor([1, -1, 0, 1], device="cuda")
    x = torch.randn(4, 3, 512, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(
        lambda xx, ii: hqqlora.mixed_batch_indexed(xx, bank, ii, base=layer, weight_norm=norm),
        fullgraph=True,
    )
    with torch.no_grad():
        got = fn(x, index)
    for i, name in enumerate(["b", None, "a", "b"]):
        ref = (
            _base_ref(layer, x[i]) if name is None else dense_reference(layer, adapters[name], x[i])
        )
        assert_close_rel(got[i], ref, torch.bfloat16, factor=2)


def test_supported_layouts():
    for nbits in (1, 2, 4, 8):
        layer = cuda_layer(nbits, torch.bfloat16)
        assert _decode.supported(layer.W_q, quant_layout(layer), 16)
    assert not _decode.supported(layer.W_q, quant_layout(layer), _decode.MAX_ROWS + 1)
    assert not _decode.supported(
        cuda_layer(3, torch.bfloat16).W_q, quant_layout(cuda_layer(3, torch.bfloat16)), 1
    )


@pytest.mark.parametrize(
    "config",
    [(16, 1, 2, 4, 3, 0), (16, 2, 4, 4, 2, 0), (16, 1, 2, 4, 3, 1), (32, 1, 4, 4, 2, 1),
     (16, 1, 2, 4, 3, 2), (32, 2, 4, 4, 2, 2), (64, 4, 1, 4, 2, 2),
     (16, 1, 2, 4, 3, 3), (32, 2, 4, 4, 2, 3), (16, 1, 8, 4, 2, 4), (32, 4, 2, 2, 1, 4),
     (16, 1, 2, 4, 3, 5), (32, 1, 4, 8, 4, 5), (16, 2, 2, 4, 3, 6), (32, 4, 2, 4, 2, 6),
     (16, 1, 8, 8, 3, 6), (16, 2, 2, 4, 3, 7), (32, 1, 2, 8, 3, 7),
     (2, 8, 1, 8, 3, 4), (1, 8, 1, 4, 1, 4), (2, 4, 2, 8, 3, 4)],
)  # fmt: skip
@pytest.mark.parametrize("tokens", [1, 4])
def test_every_kernel_mode_matches_the_reference(config, tokens, monkeypatch):
    layer = cuda_layer(4, torch.bfloat16, size=(256, 512))
    p = cuda_adapter(layer, dora=True)
    norm = hqqlora.dora_weight_norm(layer, p)
    monkeypatch.setitem(_decode.TUNED, (256, 512, 2, tokens), config)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = hqqlora.apply_lora(layer, p, x, weight_norm=norm)
    assert_close_rel(got, dense_reference(layer, p, x), torch.bfloat16, factor=2)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize(
    "config, tokens",
    [((16, 2, 2, 4, 1, 4), 1), ((16, 1, 2, 4, 2, 5), 5), ((32, 1, 2, 4, 3, 5), 16),
     ((16, 1, 2, 4, 3, 6), 17), ((64, 1, 2, 8, 3, 6), 64), ((64, 1, 2, 8, 3, 7), 40)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", HALF)
def test_k_loops_of_several_steps_at_each_prefetch_level(
    dtype, config, tokens, prefetch, monkeypatch
):
    # 1024 inputs in groups of 64 at two splits: 4 (MODE 4, two groups a step) or 8 steps
    # a program, the next step loaded ahead (PREFETCH 1: scale and zero; 2: everything).
    layer = cuda_layer(4, dtype, size=(256, 1024))
    p = cuda_adapter(layer, dora=True)
    norm = hqqlora.dora_weight_norm(layer, p)
    monkeypatch.setitem(_decode.TUNED, (256, 1024, 2, tokens), (*config, 0, prefetch))
    x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        got = hqqlora.apply_lora(layer, p, x, weight_norm=norm)
    assert_close_rel(got, dense_reference(layer, p, x), dtype, factor=2)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [3, 4, 5])
def test_exponent_trick_modes_at_every_width(nbits, dtype, mode, monkeypatch):
    # MODE 3 reads codes as bf16 128 + q / fp16 1024 + q (not for 8-bit bf16), MODE 4 as
    # float32 2^23 + q: every width and dtype against the float64 product.
    layer = cuda_layer(nbits, dtype, size=(256, 512))
    p = cuda_adapter(layer)
    per = quant_layout(layer).packing_bits[1]
    tokens = 1 if mode == 4 else 5
    monkeypatch.setitem(_decode.TUNED, (256, 512, per, tokens), (16, 2, 2, 4, 2, mode))
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        got = hqqlora.apply_lora(layer, p, x)
    assert_close_rel(got, dense_reference(layer, p, x), dtype, factor=2)


@pytest.mark.parametrize("tokens", [1, 17, 64])
@pytest.mark.parametrize("nbits", [1, 4, 8])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(96, 192, 64), (80, 320, 32), (96, 384, 128)])
def test_default_rule_at_shapes_that_do_not_tile_evenly(shape, dtype, nbits, tokens, monkeypatch):
    # decode_config's rule (no TUNED entry): out not a multiple of a tile's outputs, groups
    # per row not a multiple of 4 (MODE 4's groups a step) nor of 16 splits; bf16 too
    # (the interpreter's checks run in float16 only).
    out_features, in_features, group = shape
    layer = cuda_layer(nbits, dtype, size=(out_features, in_features), group=group)
    p = cuda_adapter(layer, dora=True)
    norm = hqqlora.dora_weight_norm(layer, p)
    monkeypatch.setattr(_decode, "TUNED", {})
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    if tokens <= 16:  # apply_lora's decode reach

        def call():
            return hqqlora.apply_lora(layer, p, x, weight_norm=norm)
    else:  # mixed_batch_indexed's: up to 64 rows

        def call():
            bank = hqqlora.stack_adapters({"a": p})
            index = torch.zeros(tokens, dtype=torch.int64, device="cuda")
            return hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm[None])

    with torch.no_grad():
        got, fused = uses_decode(call, monkeypatch)
    assert fused
    assert_close_rel(got, dense_reference(layer, p, x), dtype, factor=2)


def test_mixed_decode_out_of_range_index_gives_nan_rows_and_noncontiguous_norms_are_read_right():
    layer = cuda_layer(4, torch.bfloat16)
    adapters = {"a": cuda_adapter(layer, dora=True, seed=1), "b": cuda_adapter(layer, seed=2)}
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank).t().contiguous().t()  # same values, strided
    index = torch.tensor([0, 7, 1, -1], device="cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm)
    assert torch.isnan(got[1]).all()
    assert_close_rel(got[0], dense_reference(layer, adapters["a"], x[0]), torch.bfloat16, factor=2)
    assert_close_rel(got[2], dense_reference(layer, adapters["b"], x[2]), torch.bfloat16)
    assert_close_rel(got[3], _base_ref(layer, x[3]), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_layer_on_another_gpu_than_the_current_one(monkeypatch):
    # Triton launches on the current device: a layer on cuda:1 while cuda:0 is current
    # (device_map="auto") must still run on cuda:1, ordered with PyTorch's work there.
    dtype = torch.bfloat16
    layer = cuda_layer(4, dtype, size=(256, 512), device="cuda:1")
    adapters = {"a": cuda_adapter(layer, seed=1), "b": cuda_adapter(layer, dora=True, seed=2)}
    adapters = {n: {k: v.to("cuda:1") for k, v in p.items()} for n, p in adapters.items()}
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank)
    index = torch.tensor([1, -1, 0], device="cuda:1")
    torch.cuda.set_device(0)
    with torch.no_grad():  # the references' dequantization, against HQQ's own
        assert torch.equal(hqqlora.dequantize(layer), layer.dequantize())
    for _ in range(3):  # fresh values each time: a stale or unordered read shows
        x = torch.randn(3, 512, device="cuda:1", dtype=dtype)
        with torch.no_grad():
            base = hqqlora.base_forward(layer, x)
            exact = hqqlora.base_forward(layer, x, exact=True)
            one, fused = uses_decode(
                lambda x=x: hqqlora.apply_lora(layer, adapters["a"], x), monkeypatch
            )
            mixed = hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm)
        assert fused and base.device == x.device
        assert_close_rel(base, _base_ref(layer, x), dtype)
        assert_close_rel(exact, _base_ref(layer, x), dtype)
        assert_close_rel(one, dense_reference(layer, adapters["a"], x), dtype)
        assert_close_rel(mixed[0], dense_reference(layer, adapters["b"], x[0]), dtype, factor=2)
        assert_close_rel(mixed[1], _base_ref(layer, x[1]), dtype)
        assert_close_rel(mixed[2], dense_reference(layer, adapters["a"], x[2]), dtype)


def test_split_k_reduction_is_stable_under_repetition(monkeypatch):
    # The last split of a tile sums every split's stored partial: a partial read before
    # it is stored (uninitialized workspace) shows as a call that differs from the others.
    layer = cuda_layer(4, torch.bfloat16, size=(512, 512), group=32)
    p = cuda_adapter(layer)
    monkeypatch.setitem(_decode.TUNED, (512, 512, 2, 4), (8, 1, 16, 4, 3, 0))
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        first = hqqlora.apply_lora(layer, p, x)
        outs = [hqqlora.apply_lora(layer, p, x) for _ in range(200)]
    assert all(torch.equal(first, o) for o in outs)
    assert_close_rel(first, dense_reference(layer, p, x), torch.bfloat16)


def graph_replays(call, n, feeds=()):
    """``call`` captured in a CUDA graph (after a warm-up on a side stream), then the
    output of each of ``n`` replays. ``feeds``: ``(tensor, values)`` pairs; before replay
    ``i``, ``tensor`` (an input the graph reads) takes ``values[i % len(values)]``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    replays = []
    for i in range(n):
        for tensor, values in feeds:
            tensor.copy_(values[i % len(values)])
        graph.replay()
        replays.append(captured.clone())
    torch.cuda.synchronize()
    return replays


def uses_gluon(fn, monkeypatch, folded=None):
    """``fn()`` and whether a Gluon base kernel ran (the library's, or the one with the
    bank's shrink folded in); ``folded`` (a list) collects whether each was the folded one."""
    calls = []
    real, real_fold = _gluon.base_partials, _gluon_fold.fold_partials
    real_gemv = _gluon_gemv.gemv_partials
    monkeypatch.setattr(
        _gluon, "base_partials", lambda *a, **k: calls.append(False) or real(*a, **k)
    )
    monkeypatch.setattr(
        _gluon_fold, "fold_partials", lambda *a, **k: calls.append(True) or real_fold(*a, **k)
    )
    monkeypatch.setattr(
        _gluon_gemv, "gemv_partials", lambda *a, **k: calls.append(False) or real_gemv(*a, **k)
    )
    out = fn()
    monkeypatch.setattr(_gluon, "base_partials", real)
    monkeypatch.setattr(_gluon_fold, "fold_partials", real_fold)
    monkeypatch.setattr(_gluon_gemv, "gemv_partials", real_gemv)
    if folded is not None:
        folded.extend(calls)
    return out, bool(calls)


def _gluon_runs():
    return (
        torch.cuda.is_available() and _decode.GLUON and torch.cuda.get_device_capability() == (9, 0)
    )


needs_gluon = pytest.mark.skipif(
    not _gluon_runs(), reason="MODE 8 needs Gluon and compute capability 9.0"
)


@needs_gluon
@pytest.mark.parametrize(
    "config", [(64, 1, 8, 3), (64, 4, 8, 4, 32), (128, 2, 8, 3, 16), (32, 8, 4, 3), (64, 2, 4, 3)]
)
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rank", [8, 40])
@pytest.mark.parametrize("finish_rows", [0, 16])
def test_gluon_base_kernel_matches_the_reference(
    finish_rows, rank, dtype, tokens, config, monkeypatch
):
    # MODE 8: the Gluon kernel's base term, 16 steps of K in 1-8 splits, 1-2 tiles of
    # 64-128 packed rows, rows padded to 8-64; the Triton kernel (tiles of 32-128 outputs)
    # adds DoRA's adapter terms, the norms and the bias: a row of none (1 row; one row's
    # adapter terms: test_one_row_finishes_in_the_gluon_kernel), rows of two adapters and
    # of none (5 rows: terms gathered), one adapter without an index (16 rows: terms kept
    # in registers), a bank of one and rows of none (more rows); at 5 rows a row past the
    # bank (NaN). Up to ``finish_rows`` rows the Gluon kernel's last split of each tile
    # finishes them itself. Ranks 8 and 40 (padded to 16 and 64).
    monkeypatch.setattr(_decode, "FINISH_ROWS", finish_rows)
    monkeypatch.setattr(_decode, "FOLD_ONE", False)  # test_folded_shrink_of_one_adapter_...
    layer = cuda_layer(4, dtype, size=(256, 1024))
    adapters = [cuda_adapter(layer, r=rank, dora=True, seed=i) for i in range(2)]
    norms = [hqqlora.dora_weight_norm(layer, q) for q in adapters]
    monkeypatch.setitem(_decode.TUNED_GLUON, (256, 1024, tokens), config)
    x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
    rows = torch.arange(tokens, device="cuda")
    index = None if tokens == 16 else rows % 3 - 1 if tokens < 16 else -(rows % 3 == 0).long()
    if tokens == 5:
        index[3] = 7
    kept = adapters if tokens < 16 else adapters[:1]
    with torch.no_grad():
        if index is None:
            got, ran = uses_gluon(
                lambda: hqqlora.apply_lora(layer, adapters[0], x, weight_norm=norms[0]),
                monkeypatch,
            )
        else:
            bank = hqqlora.stack_adapters({f"a{i}": q for i, q in enumerate(kept)})
            got, ran = uses_gluon(
                lambda: hqqlora.mixed_batch_indexed(
                    x, bank, index, base=layer, weight_norm=torch.stack(norms[: len(kept)])
                ),
                monkeypatch,
            )
    assert ran
    for i in range(tokens):
        k = 0 if index is None else int(index[i])
        row = x[i : i + 1]
        if k >= len(kept):
            assert torch.isnan(got[i]).all()
            continue
        ref = _base_ref(layer, row) if k < 0 else dense_reference(layer, adapters[k], row)
        assert_close_rel(got[i : i + 1], ref, dtype, factor=2)


@needs_gluon
@pytest.mark.parametrize("case", ["base", "lora", "dora_bank", "none_in_bank", "outside"])
@pytest.mark.parametrize("config", [(64, 1, 8, 3), (64, 4, 8, 4), (128, 16, 8, 3), (32, 8, 4, 3)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_one_row_finishes_in_the_gluon_kernel(dtype, bias, config, case, monkeypatch):
    # MODE 8 at one row: the last split of each tile to arrive adds the splits' partials,
    # the adapter term, DoRA's norms and the bias, with no Triton kernel after it (more
    # rows: test_gluon_base_kernel_matches_the_reference).
    layer = cuda_layer(4, dtype, size=(256, 1024), bias=bias)
    adapters = [cuda_adapter(layer, dora=True, seed=i) for i in range(2)]
    norms = torch.stack([hqqlora.dora_weight_norm(layer, q) for q in adapters])
    bank = hqqlora.stack_adapters({"a": adapters[0], "b": adapters[1]})
    monkeypatch.setitem(_decode.TUNED_GLUON, (256, 1024, 1), config)
    x = torch.randn(1, 1024, device="cuda", dtype=dtype)
    k = {"dora_bank": 1, "none_in_bank": -1, "outside": 7}.get(case, 0)
    calls = {
        "base": lambda: hqqlora.base_forward(layer, x),
        "lora": lambda: hqqlora.apply_lora(
            layer, {n: v for n, v in adapters[0].items() if n != "magnitude"}, x
        ),
    }
    fn = calls.get(case) or (
        lambda: hqqlora.mixed_batch_indexed(
            x, bank, torch.tensor([k], device="cuda"), base=layer, weight_norm=norms
        )
    )
    with torch.no_grad():
        got, ran = uses_gluon(fn, monkeypatch)
        main = []
        real = _decode._main_kernel
        monkeypatch.setattr(
            _decode,
            "_main_kernel",
            type("R", (), {"__getitem__": lambda s, g: main.append(g) or real[g]})(),
        )
        fn()
    assert ran and not main
    if case == "outside":
        assert torch.isnan(got).all()
        return
    if case in ("base", "none_in_bank"):
        ref = _base_ref(layer, x)
    elif case == "lora":
        ref = dense_reference(layer, {n: v for n, v in adapters[0].items() if n != "magnitude"}, x)
    else:
        ref = dense_reference(layer, adapters[1], x)
    assert_close_rel(got, ref, dtype, factor=2)


def uses_gemv(fn, monkeypatch):
    """``fn()`` and the launches it made of the tensor-core GEMV (``_gluon_gemv``)."""
    calls = []
    real = _gluon_gemv.gemv_partials
    monkeypatch.setattr(
        _gluon_gemv, "gemv_partials", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    out = fn()
    monkeypatch.setattr(_gluon_gemv, "gemv_partials", real)
    return out, calls


@needs_gluon
@pytest.mark.parametrize(
    "case", ["base", "lora", "lora_rank40", "dora_bank", "none_in_bank", "outside"]
)
@pytest.mark.parametrize("entry", [(8, 2, 1), (32, 8, 4), (16, 4, 2), (64, 1, 8)])
@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_one_row_on_the_tensor_core_gemv_matches_the_reference(
    dtype, bias, pdl, entry, case, monkeypatch
):
    # GEMV (a TUNED_GEMV entry): one row's base term on mma.sync from registers, 1-8
    # splits of 16 K steps (two an iteration), programs of 1-8 warps and 16-128 outputs;
    # the last split to arrive adds the partials, the adapter term (ranks 8 and 40, padded
    # to 16 and 64), DoRA's norms and the bias, or makes the row NaN for an index outside
    # the bank. With and without the dependent launch after the shrink kernel.
    monkeypatch.setattr(_decode, "PDL", pdl)
    monkeypatch.setattr(_decode, "GEMV", True)
    layer = cuda_layer(4, dtype, size=(256, 1024), bias=bias)
    rank = 40 if case == "lora_rank40" else 8
    adapters = [cuda_adapter(layer, dora=True, seed=i, r=rank) for i in range(2)]
    lora = {n: v for n, v in adapters[0].items() if n != "magnitude"}
    norms = torch.stack([hqqlora.dora_weight_norm(layer, q) for q in adapters])
    bank = hqqlora.stack_adapters({"a": adapters[0], "b": adapters[1]})
    monkeypatch.setitem(_decode.TUNED_GEMV, (256, 1024, 1), entry)
    x = torch.randn(1, 1024, device="cuda", dtype=dtype)
    k = {"dora_bank": 1, "none_in_bank": -1, "outside": 7}.get(case, 0)
    if case == "base":
        fn = lambda: hqqlora.base_forward(layer, x)  # noqa: E731
    elif case.startswith("lora"):
        fn = lambda: hqqlora.apply_lora(layer, lora, x)  # noqa: E731
    else:
        index = torch.tensor([k], device="cuda")
        fn = lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)  # noqa: E731
    with torch.no_grad():
        got, calls = uses_gemv(fn, monkeypatch)
        main = []  # no Triton kernel after the GEMV: it finishes the row
        real = _decode._main_kernel
        monkeypatch.setattr(
            _decode,
            "_main_kernel",
            type("R", (), {"__getitem__": lambda s, g: main.append(g) or real[g]})(),
        )
        fn()
    assert not main
    assert len(calls) == 1 and calls[0]["split"] == entry[1] and calls[0]["finish"] is not None
    assert calls[0]["after_shrink"] == (pdl and case != "base")
    if case == "outside":
        assert torch.isnan(got).all()
        return
    if case in ("base", "none_in_bank"):
        ref = _base_ref(layer, x)
    elif case.startswith("lora"):
        ref = dense_reference(layer, lora, x)
    else:
        ref = dense_reference(layer, adapters[1], x)
    assert_close_rel(got, ref, dtype, factor=2)


@needs_gluon
@pytest.mark.parametrize("shape", sorted(_decode.TUNED_GEMV))
@pytest.mark.parametrize("dora", [False, True])
def test_shipped_gemv_entries_take_the_gemv_and_match_the_reference(shape, dora, monkeypatch):
    # Every TUNED_GEMV entry fits its layer (no silent fallback), on the layer's real
    # shape, LoRA and DoRA with a held norm, r=16.
    monkeypatch.setattr(_decode, "GEMV", True)
    out_f, in_f, rows = shape
    layer = cuda_layer(4, torch.bfloat16, size=(out_f, in_f))
    p = cuda_adapter(layer, r=16, dora=dora)
    norm = hqqlora.dora_weight_norm(layer, p) if dora else None
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got, calls = uses_gemv(
            lambda: hqqlora.apply_lora(layer, p, x, weight_norm=norm), monkeypatch
        )
    assert len(calls) == 1
    assert_close_rel(got, dense_reference(layer, p, x), torch.bfloat16, factor=2)


@needs_gluon
@pytest.mark.parametrize("pdl, first", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(
    "rows, entry, n, fold", [(1, (64, 8, 8, 3), 1, True), (1, (64, 1, 8, 3), 1, True),
                             (1, "gemv", 1, True),
                             (2, None, 1, True), (16, None, 1, True), (40, None, 1, True),
                             (64, None, 1, True), (16, None, 1, False), (64, None, 1, False),
                             (16, None, 4, True), (64, None, 64, True), (64, None, 64, False)],
)  # fmt: skip
def test_gluon_path_replays_give_the_same_bits(rows, entry, n, fold, pdl, first, monkeypatch):
    # MODE 8 on the tuned 4096² (16 and 64 rows), by the rule (2 and 40), and at one row
    # finished in the Gluon kernel (8 splits and a counter, or one split): the base
    # kernel beside the shrink kernel (programmatic dependent launch), then the Triton
    # kernel or the Gluon kernel's own finish; over a bank of 64 at 64 rows, the bank's
    # shrink and terms kernels on a stream beside the Gluon kernel, then the Triton kernel
    # (GATHER_SIDE; ``first`` off: the Gluon kernel with the bank's shrink folded in,
    # GATHER_FOLD, or without it the bank's shrink kernel first; then the Triton kernel that
    # loads each row's tile of B before it waits). Where the Triton kernel finishes one
    # adapter's rows, the Gluon kernel goes first and the shrink kernel beside it, or
    # (``first`` off) the other way round, or (``fold``: FOLD_ONE with a TUNED_FOLD_ONE
    # entry, one adapter or a bank of 4 at 16 rows) the shrink is folded into the Gluon
    # kernel. A race shows as a replay whose bits differ: the replays alternate two inputs,
    # so a read of the workspaces before this replay's kernels wrote them sees the other
    # input's values.
    monkeypatch.setattr(_decode, "PDL", pdl)
    monkeypatch.setattr(_decode, "GLUON_FIRST", first)
    monkeypatch.setattr(_decode, "GATHER_SIDE", int(first))
    monkeypatch.setattr(_decode, "GATHER_FOLD", fold)
    monkeypatch.setattr(_decode, "FOLD_ONE", fold)
    # One row: the tensor-core GEMV (its TUNED_GEMV entry for 4096²), or with GEMV off the
    # Gluon base kernel's entry.
    monkeypatch.setattr(_decode, "GEMV", entry == "gemv")
    if entry == "gemv":
        assert (4096, 4096, 1) in _decode.TUNED_GEMV
    elif entry is not None:
        monkeypatch.setitem(_decode.TUNED_GLUON, (4096, 4096, rows), entry)
    monkeypatch.setitem(_decode.TUNED_FOLD_ONE, (4096, 4096, rows), (64, 4, 3))
    # Folded: above one row, except a gathered bank on the second stream (GATHER_SIDE).
    expect_fold = fold and rows > 1 and not (n > 1 and rows > 16 and first)
    layer = cuda_layer(4, torch.bfloat16, size=(4096, 4096))
    adapters = [cuda_adapter(layer, r=16, seed=k) for k in range(n)]
    bank = hqqlora.stack_adapters({f"a{k}": q for k, q in enumerate(adapters)})
    ar = torch.arange(rows, device="cuda")
    # -1, then each row its own (mod n) adapter; one row reads adapter 0 (so its finish
    # reads the shrink kernel's t).
    index = ar % n if rows == 1 else torch.where(ar % 4 == 0, -1, ar % n)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():

        def call():
            return hqqlora.mixed_batch_indexed(x, bank, index, base=layer)

        folded = []
        got, ran = uses_gluon(call, monkeypatch, folded)
        assert ran and folded == [expect_fold]
        xs = (x.clone(), torch.randn_like(x))
        x.copy_(xs[1])
        expected = (got, call())
        replays = graph_replays(call, 200, feeds=[(x, xs)])
        x.copy_(xs[0])
    assert not torch.equal(*expected)
    assert all(torch.equal(r, expected[i % 2]) for i, r in enumerate(replays))
    for i in range(rows):
        row, k = x[i : i + 1], int(index[i])
        ref = _base_ref(layer, row) if k < 0 else dense_reference(layer, adapters[k], row)
        assert_close_rel(got[i : i + 1], ref, torch.bfloat16)


@needs_gluon
@pytest.mark.parametrize("ranks", [(4, 8, 9, 8, 3), (40, 8, 24, 8, 3)])
@pytest.mark.parametrize("shrink", ["beside", "first", "k_split"])
@pytest.mark.parametrize(
    "config", [None, (64, 4, 8, 4), (128, 2, 8, 3), (32, 8, 4, 3), (64, 2, 4, 3)]
)
@pytest.mark.parametrize("rows", [17, 40, 64])
@pytest.mark.parametrize("dtype", HALF)
def test_gluon_path_over_a_gathered_bank_matches_the_reference(
    dtype, rows, config, shrink, ranks, monkeypatch
):
    # MODE 8 over a bank of several adapters above 16 rows, the Gluon base kernel in 1-8
    # splits and: the bank's shrink kernel (a program per row and rank slice, all of K)
    # and terms kernel on a stream beside it, then the Triton kernel adding the terms
    # (``beside``, GATHER_SIDE); or the bank's shrink kernel (``first``) or the K-split
    # one before it, then the Triton kernel, which loads each row's tile of B before it
    # waits (32 outputs a program, 8 at rank 40). LoRA and DoRA entries of ranks 3-9 (at 64
    # rows the last rank slice of the shrink is partial) or 3-40 (padded to the largest),
    # rows of none (-1) and past the bank (NaN), a bias, the table's entry or the rule.
    bank_shrink = shrink != "k_split"
    monkeypatch.setattr(_decode, "GATHER_SIDE", int(shrink == "beside"))
    monkeypatch.setattr(_decode, "GATHER_FOLD", False)  # test_folded_shrink_... below
    if not bank_shrink:
        monkeypatch.setattr(_decode, "BANK_SHRINK_ROWS", _decode.MAX_ROWS + 1)
    if config is not None:
        monkeypatch.setitem(_decode.TUNED_GATHER, (256, 1024, rows), config)
    layer = cuda_layer(4, dtype, size=(256, 1024))
    adapters = {
        f"a{i}": cuda_adapter(layer, dora=i % 2 == 1, seed=i, r=r) for i, r in enumerate(ranks)
    }
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank)
    index = torch.arange(rows, device="cuda") % 7 - 1  # -1, 0, ..., 4, 5 (past the bank)
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    shrinks = []
    real = _decode._bank_shrink_kernel
    monkeypatch.setattr(
        _decode,
        "_bank_shrink_kernel",
        type("R", (), {"__getitem__": lambda s, g: shrinks.append(g) or real[g]})(),
    )
    with torch.no_grad():
        got, ran = uses_gluon(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
        )
    assert ran
    assert bool(shrinks) == bank_shrink
    for i in range(rows):
        k = int(index[i])
        if k == len(ranks):
            assert torch.isnan(got[i]).all(), i
            continue
        row = x[i : i + 1]
        ref = _base_ref(layer, row) if k < 0 else dense_reference(layer, adapters[f"a{k}"], row)
        assert_close_rel(got[i : i + 1], ref, dtype, factor=2)


@needs_gluon
@pytest.mark.parametrize("ranks", [(4, 8, 9, 8, 3), (20, 8, 24, 8, 3), (40, 8, 24, 8, 3)])
@pytest.mark.parametrize("entry", [(64, 2, 3), (32, 1, 4), (64, 1, 2), (32, 4, 3)])
@pytest.mark.parametrize("rows", [17, 40, 64])
@pytest.mark.parametrize("dtype", HALF)
def test_folded_shrink_over_a_gathered_bank_matches_the_reference(
    dtype, rows, entry, ranks, monkeypatch
):
    # MODE 8 over a bank above 16 rows with the bank's shrink folded into the Gluon kernel
    # (GATHER_FOLD): a warp-specialized kernel whose programs compute the base term and
    # t's partials of their tile's rows over their split of K (2 or 4 tiles of 256 outputs:
    # 5-32 rows a tile); the Triton kernel then adds t's partials and the base's
    # in split order. Ranks padded to 16 and 32 fold; 40 (padded 64) and a split whose
    # inputs the shrink's two steps do not divide (4 splits of 1024 at rank 16: 256 inputs
    # a split, 512 a shrink round) keep the bank's shrink kernel. LoRA and DoRA, rows of
    # none (-1) and past the bank (NaN), the bank of 5 entries of mixed ranks.
    monkeypatch.setattr(_decode, "GATHER_SIDE", 0)
    monkeypatch.setattr(_decode, "GATHER_FOLD", True)
    monkeypatch.setitem(_decode.TUNED_FOLD, (256, 1024, rows), entry)
    layer = cuda_layer(4, dtype, size=(256, 1024))
    adapters = {
        f"a{i}": cuda_adapter(layer, dora=i % 2 == 1, seed=i, r=r) for i, r in enumerate(ranks)
    }
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank)
    index = torch.arange(rows, device="cuda") % 7 - 1  # -1, 0, ..., 4, 5 (past the bank)
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    block_r = max(16, 1 << (max(ranks) - 1).bit_length())
    expect_fold = block_r <= 32 and (1024 // entry[1]) % (2 * max(128, 4096 // block_r)) == 0
    shrinks, folded = [], []
    real = _decode._bank_shrink_kernel
    monkeypatch.setattr(
        _decode,
        "_bank_shrink_kernel",
        type("R", (), {"__getitem__": lambda s, g: shrinks.append(g) or real[g]})(),
    )
    with torch.no_grad():
        got, ran = uses_gluon(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm),
            monkeypatch,
            folded,
        )
    assert ran
    assert folded == [expect_fold]
    assert bool(shrinks) != expect_fold
    for i in range(rows):
        k = int(index[i])
        if k == len(ranks):
            assert torch.isnan(got[i]).all(), i
            continue
        row = x[i : i + 1]
        ref = _base_ref(layer, row) if k < 0 else dense_reference(layer, adapters[f"a{k}"], row)
        assert_close_rel(got[i : i + 1], ref, dtype, factor=2)


@needs_gluon
@pytest.mark.parametrize("rank", [8, 20, 40])
@pytest.mark.parametrize("entry", [(64, 2, 3), (32, 1, 4), (64, 4, 2), None])
@pytest.mark.parametrize("rows", [2, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("dtype", HALF)
def test_folded_shrink_of_one_adapter_matches_the_reference(dtype, rows, entry, rank, monkeypatch):
    # MODE 8 with one adapter above FINISH_ROWS rows and the shrink folded into the Gluon
    # kernel (FOLD_ONE): apply_lora up to 16 rows (every row reads the one A, no index),
    # a bank of one read through an index above (rows of none: -1); t's partials a split
    # each, then the Triton kernel adds them and the base's in split order, the term,
    # DoRA's norms and the bias. A TUNED_FOLD_ONE entry (1-4 splits, 2-4 tiles: 1-32 rows
    # a tile, tiles of none); without one, not folded. Rank 40 (padded 64) is not folded,
    # nor 4 splits (256 inputs) at rank 8 (the shrink's rounds: 512 inputs at padded rank
    # 16, 256 at 32). LoRA at 5 and 40 rows, DoRA elsewhere.
    monkeypatch.setattr(_decode, "FOLD_ONE", True)
    monkeypatch.setitem(_decode.TUNED_GLUON, (256, 1024, rows), (64, 4, 8, 3))
    if entry is None:
        monkeypatch.delitem(_decode.TUNED_FOLD_ONE, (256, 1024, rows), raising=False)
    else:
        monkeypatch.setitem(_decode.TUNED_FOLD_ONE, (256, 1024, rows), entry)
    layer = cuda_layer(4, dtype, size=(256, 1024), bias=True)
    dora = rows not in (5, 40)
    params = cuda_adapter(layer, dora=dora, r=rank, seed=rows)
    norm = hqqlora.dora_weight_norm(layer, params) if dora else None
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    index = -(torch.arange(rows, device="cuda") % 3 == 0).long()  # -1, 0, 0, -1, ...
    folded = []
    with torch.no_grad():
        if rows <= 16:
            got, ran = uses_gluon(
                lambda: hqqlora.apply_lora(layer, params, x, weight_norm=norm), monkeypatch, folded
            )
        else:
            bank = hqqlora.stack_adapters({"a": params})
            norms = None if norm is None else norm[None]
            got, ran = uses_gluon(
                lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms),
                monkeypatch,
                folded,
            )
    assert ran
    # Not folded: no entry; rank 40; 4 splits (256 inputs) at rank 8, whose shrink rounds
    # are 512 inputs (256 at rank 20, padded 32).
    assert folded == [entry is not None and rank != 40 and (rank, entry[1]) != (8, 4)]
    for i in range(rows):
        row = x[i : i + 1]
        ref = (
            _base_ref(layer, row)
            if rows > 16 and index[i] < 0
            else (dense_reference(layer, params, row))
        )
        assert_close_rel(got[i : i + 1], ref, dtype, factor=2)


@needs_gluon
@pytest.mark.parametrize("tuned", [True, False])
def test_folded_shrink_with_tiles_of_no_rows_and_by_the_rule(tuned, monkeypatch):
    # 17 rows over 2048 outputs: 32 tiles of 32 packed rows (a TUNED_FOLD entry), or 16
    # of 64 by fold_config's rule from the TUNED_GATHER entry (no TUNED_FOLD entry): a row
    # or two a tile, and tiles with no rows, whose shrink partition does nothing.
    monkeypatch.setattr(_decode, "GATHER_SIDE", 0)
    monkeypatch.setattr(_decode, "GATHER_FOLD", True)
    monkeypatch.setitem(_decode.TUNED_GATHER, (2048, 1024, 17), (64, 2, 8, 3))
    if tuned:
        monkeypatch.setitem(_decode.TUNED_FOLD, (2048, 1024, 17), (32, 2, 3))
    else:
        monkeypatch.delitem(_decode.TUNED_FOLD, (2048, 1024, 17), raising=False)
    layer = cuda_layer(4, torch.bfloat16, size=(2048, 1024))
    adapters = {f"a{i}": cuda_adapter(layer, seed=i, r=r) for i, r in enumerate((4, 8, 9))}
    bank = hqqlora.stack_adapters(adapters)
    index = torch.arange(17, device="cuda") % 4 - 1  # -1, 0, 1, 2
    x = torch.randn(17, 1024, device="cuda", dtype=torch.bfloat16)
    folded = []
    with torch.no_grad():
        got, _ = uses_gluon(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer), monkeypatch, folded
        )
    assert folded == [True]
    for i in range(17):
        k, row = int(index[i]), x[i : i + 1]
        ref = _base_ref(layer, row) if k < 0 else dense_reference(layer, adapters[f"a{k}"], row)
        assert_close_rel(got[i : i + 1], ref, torch.bfloat16, factor=2)


@needs_gluon
def test_folded_kernel_gives_the_base_kernels_partials_bit_for_bit():
    # The folded kernel's default partition runs _gluon's K loop (the same weights, the
    # same wgmmas in the same order): its partials equal the base kernel's bit for bit,
    # and t's partials summed equal x @ A[k]ᵀ per row (0 for a row past the bank).
    from hqqlora._base import quant_tensors

    layer = cuda_layer(4, torch.bfloat16, size=(512, 2048))
    W_q, scale, zero = quant_tensors(layer)
    meta = [4, 2, 64, 512, 2048]
    rows, split = 40, 2
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(6, 16, 2048, device="cuda") / 2048**0.5
    index = torch.arange(rows, device="cuda") % 7  # 6: past the bank
    ws_base = torch.full((split, rows, 512), float("nan"), device="cuda")
    ws_fold, t = (
        torch.full_like(ws_base, float("nan")),
        torch.full((split, rows, 16), float("nan"), device="cuda"),
    )
    counts = torch.zeros(8, dtype=torch.int32, device="cuda")
    dummy = torch.empty(1, device="cuda")
    tail = (*[dummy] * 9, 16, 1, 0, 0, 6)  # unread: no finish
    _gluon.base_partials(
        x, W_q, scale, zero, meta, ws_base, counts, tail, block_p=64, split=split, warps=4,
        stages=3, after_shrink=False, finish=None,
    )  # fmt: skip
    _gluon_fold.fold_partials(
        x, W_q, scale, zero, meta, ws_fold, A, index, t, block_p=64, split=split, stages=3,
        block_r=16, launch_dependents=False,
    )  # fmt: skip
    assert torch.equal(ws_fold, ws_base)
    valid = index < 6
    ref = torch.einsum("mk,mrk->mr", x.double(), A[index.clamp(max=5)].double())
    ref[~valid] = 0
    got = t.double().sum(0)
    assert torch.all(got[~valid] == 0)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6


def _wrap_terms_kernel(monkeypatch, before=None):
    """Replaces ``_decode._bank_terms_kernel`` by a launcher that records its launches
    (the returned list) and first calls ``before()`` on the stream it launches on."""
    launches, real = [], _decode._bank_terms_kernel

    class Wrapped:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(torch.cuda.current_stream())
                if before is not None:
                    before()
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(_decode, "_bank_terms_kernel", Wrapped())
    return launches


@needs_gluon
def test_terms_from_a_slow_second_stream_are_waited_for(monkeypatch):
    # The bank's terms kernel held back on its stream (a busy-wait kernel of about a
    # millisecond before it, so it ends long after the Gluon kernel): the Triton kernel
    # after the join still reads this call's terms, eagerly and in graph replays that
    # alternate two inputs (a missing join would show the other input's terms). The
    # second stream is not the caller's.
    monkeypatch.setattr(_decode, "GATHER_SIDE", 1)
    streams = _wrap_terms_kernel(monkeypatch, before=lambda: torch.cuda._sleep(2_000_000))
    layer = cuda_layer(4, torch.bfloat16, size=(256, 1024))
    adapters = {f"a{i}": cuda_adapter(layer, seed=i, r=16) for i in range(3)}
    bank = hqqlora.stack_adapters(adapters)
    index = torch.arange(40, device="cuda") % 4 - 1
    x = torch.randn(40, 1024, device="cuda", dtype=torch.bfloat16)
    xs = (x.clone(), torch.randn_like(x))
    with torch.no_grad():

        def call():
            return hqqlora.mixed_batch_indexed(x, bank, index, base=layer)

        got, ran = uses_gluon(call, monkeypatch)
        assert ran and streams and streams[0] != torch.cuda.current_stream()
        x.copy_(xs[1])
        expected = (got, call())
        replays = graph_replays(call, 20, feeds=[(x, xs)])
    assert all(torch.equal(r, expected[i % 2]) for i, r in enumerate(replays))
    for inputs, out in zip(xs, expected, strict=True):
        for i in range(40):
            k, row = int(index[i]), inputs[i : i + 1]
            ref = _base_ref(layer, row) if k < 0 else dense_reference(layer, adapters[f"a{k}"], row)
            assert_close_rel(out[i : i + 1], ref, torch.bfloat16, factor=2)


@needs_gluon
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
def test_gathered_bank_beside_the_gluon_kernel_under_reduce_overhead(monkeypatch):
    # The bank's shrink and terms kernels run on a second stream beside the Gluon kernel
    # (GATHER_SIDE): torch.compile's CUDA graphs capture the fork and the join, and the
    # replays, alternating indices and inputs, each equal float64 per row.
    layer = cuda_layer(4, torch.bfloat16, size=(256, 1024))
    adapters = {f"a{i}": cuda_adapter(layer, dora=i == 1, seed=i, r=8) for i in range(3)}
    monkeypatch.setattr(_decode, "GATHER_SIDE", 1)  # (the rule takes it where out > in)
    terms = _wrap_terms_kernel(monkeypatch)
    bank = hqqlora.stack_adapters(adapters)
    norm = hqqlora.bank_weight_norm(layer, bank)
    torch._dynamo.reset()

    @torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)
    def serve(x, index):
        return hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm)

    ar = torch.arange(40, device="cuda")
    indices = (ar % 4 - 1, (ar * 7 + 1) % 4 - 1)
    with torch.no_grad():
        for step in range(6):  # the first calls record, the later ones replay
            x = torch.randn(40, 1024, device="cuda", dtype=torch.bfloat16)
            index = indices[step % 2]
            got, ran = uses_gluon(lambda x=x, index=index: serve(x, index).clone(), monkeypatch)
            assert (ran and terms) or step > 0  # replays run no Python
            for i in range(40):
                k = int(index[i])
                row = x[i : i + 1]
                ref = (
                    _base_ref(layer, row)
                    if k < 0
                    else dense_reference(layer, adapters[f"a{k}"], row)
                )
                assert_close_rel(got[i : i + 1], ref, torch.bfloat16, factor=2)


@needs_gluon
@pytest.mark.parametrize("case", ["tuned_none", "group128", "2bit", "misaligned_x", "bank"])
def test_gluon_base_kernel_steps_aside_where_it_does_not_apply(case, monkeypatch):
    # A TUNED_GLUON entry of None, other groups or widths, x not 16-byte aligned, and a
    # bank of several adapters at more than 16 rows with GATHER_GLUON off take the Triton
    # modes, with the same result.
    nbits, group = (2, 64) if case == "2bit" else (4, 128 if case == "group128" else 64)
    layer = cuda_layer(nbits, torch.bfloat16, size=(256, 512), group=group)
    p = cuda_adapter(layer)
    rows = 40 if case == "bank" else 16
    monkeypatch.setitem(_decode.TUNED_GLUON, (256, 512, rows), (64, 2, 8, 3))
    if case == "tuned_none":
        monkeypatch.setitem(_decode.TUNED_GLUON, (256, 512, rows), None)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    if case == "misaligned_x":
        x = torch.randn(rows * 512 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(rows, 512)
    with torch.no_grad():
        if case == "bank":
            monkeypatch.setattr(_decode, "GATHER_GLUON", False)
            bank = hqqlora.stack_adapters({"a": p, "b": cuda_adapter(layer, seed=2)})
            index = torch.zeros(rows, dtype=torch.long, device="cuda")
            got, ran = uses_gluon(
                lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer), monkeypatch
            )
        else:
            got, ran = uses_gluon(lambda: hqqlora.apply_lora(layer, p, x), monkeypatch)
    assert not ran
    assert_close_rel(got, dense_reference(layer, p, x), torch.bfloat16)


@pytest.mark.parametrize("mode", [6, 7, 8])
@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", HALF)
def test_mode6_multiplies_hqqs_own_weights_bit_for_bit(nbits, dtype, mode, monkeypatch):
    # One-hot rows of x: each output is one weight, so MODES 6 and 7 (HQQ's two roundings
    # of each weight, in registers: in float32, or two at a time in the compute dtype)
    # give HQQ's dequantized columns exactly, every column, in bf16 too (the interpreter's
    # version of this test runs in float16 only).
    layer = cuda_layer(nbits, dtype, size=(256, 512), bias=False)
    per = quant_layout(layer).packing_bits[1]
    W = hqqlora.dequantize(layer)
    calls = []
    real = _decode.lora_decode
    monkeypatch.setattr(_decode, "lora_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    if mode == 8 and (nbits != 4 or not _gluon_runs()):
        pytest.skip("MODE 8 (the Gluon kernel) takes 4-bit codes on compute capability 9.0")
    for cols in torch.arange(512, device="cuda").view(32, 16):  # 16 rows a call
        if mode == 8:
            monkeypatch.setitem(_decode.TUNED_GLUON, (256, 512, len(cols)), (64, 2, 8, 3))
        else:
            monkeypatch.setitem(_decode.TUNED, (256, 512, per, len(cols)), (32, 2, 2, 4, 3, mode))
        x = torch.nn.functional.one_hot(cols, 512).to(dtype)
        with torch.no_grad():
            got = hqqlora.base_forward(layer, x)
        assert torch.equal(got, W[:, cols].T), (cols[0].item(), (got != W[:, cols].T).sum())
    assert len(calls) == 32  # the decode kernels ran (base_forward's reach is 16 rows)


@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_without_programmatic_dependent_launch(tokens, monkeypatch):
    # PDL off (what GPUs before Hopper get): the same result against float64.
    monkeypatch.setattr(_decode, "PDL", False)
    layer = cuda_layer(4, torch.bfloat16, size=(256, 512))
    p = cuda_adapter(layer, dora=True)
    norm = hqqlora.dora_weight_norm(layer, p)
    bank = hqqlora.stack_adapters({"a": p, "b": cuda_adapter(layer, dora=True, seed=2)})
    index = torch.arange(tokens, device="cuda") % 2
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    norms = torch.stack(
        [norm, hqqlora.dora_weight_norm(layer, cuda_adapter(layer, dora=True, seed=2))]
    )
    with torch.no_grad():
        got, fused = uses_decode(
            lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms),
            monkeypatch,
        )
    assert fused
    for i in range(tokens):
        q = p if index[i] == 0 else cuda_adapter(layer, dora=True, seed=2)
        assert_close_rel(
            got[i], dense_reference(layer, q, x[i : i + 1])[0], torch.bfloat16, factor=2
        )


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 16, 17, 40, 64])
@pytest.mark.parametrize("size", [(4096, 4096), (768, 1024)])
def test_graph_replays_give_the_same_bits(size, rows, pdl, shared, monkeypatch):
    # A race between splits, or between the shrink and the main kernel under programmatic
    # dependent launch, shows as a replay whose bits differ from the others. The tuned
    # configurations (4096²) and the default rule (768×1024), a bank read by rows of
    # several adapters, or by rows that share one (the one-dot path), and rows without one.
    monkeypatch.setattr(_decode, "PDL", pdl)
    layer = cuda_layer(4, torch.bfloat16, size=size)
    adapters = {f"a{i}": cuda_adapter(layer, seed=i, r=16) for i in range(3)}
    bank = hqqlora.stack_adapters(adapters)
    index = (torch.arange(rows, device="cuda") % 4) - 1  # -1, 0, 1, 2, -1, ...
    if shared:
        index = torch.where(index == -1, -1, 1)
    x = torch.randn(rows, size[1], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():

        def call():
            return hqqlora.mixed_batch_indexed(x, bank, index, base=layer)

        got, fused = uses_decode(call, monkeypatch)
        assert fused
        replays = graph_replays(call, 300)
    assert all(torch.equal(got, r) for r in replays)
    for i in range(rows):
        k = int(index[i])
        ref = (
            _base_ref(layer, x[i : i + 1])
            if k < 0
            else dense_reference(layer, adapters[f"a{k}"], x[i : i + 1])
        )
        assert_close_rel(got[i : i + 1], ref, torch.bfloat16)


@pytest.mark.parametrize("rows", [5, 16, 17, 40, 64])
def test_a_diverged_adapter_stays_in_its_own_rows(rows):
    # Bank slot 0 holds NaN (a diverged adapter): rows with -1 or another adapter must not
    # see it, whether their chunk of rows shares one adapter (the one-product path) or not.
    layer = cuda_layer(4, torch.bfloat16, size=(768, 1024))
    good = cuda_adapter(layer, seed=2, r=16)
    bad = cuda_adapter(layer, seed=3, r=16)
    bad["lora_B"] = torch.full_like(bad["lora_B"], float("nan"))
    bank = hqqlora.stack_adapters({"bad": bad, "good": good})
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    for index in (
        torch.full((rows,), -1, device="cuda"),
        torch.where(torch.arange(rows, device="cuda") % 3 == 0, 0, -1),
        torch.where(torch.arange(rows, device="cuda") % 3 == 0, 0, 1),
    ):
        with torch.no_grad():
            got = hqqlora.mixed_batch_indexed(x, bank, index, base=layer)
        for i in range(rows):
            k = int(index[i])
            if k == 0:
                continue
            ref = (
                _base_ref(layer, x[i : i + 1])
                if k < 0
                else dense_reference(layer, good, x[i : i + 1])
            )
            assert_close_rel(got[i : i + 1], ref, torch.bfloat16)
