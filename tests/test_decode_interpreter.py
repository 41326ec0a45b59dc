"""The decode kernels in Triton's interpreter, on the CPU (no GPU needed).

Skipped where Triton is not installed (the CPU build of torch brings none:
``pip install triton==3.6.0`` adds it). Triton's interpreter emulates
bf16 badly, so these run in float16. A subprocess: the interpreter is chosen when the
kernels are defined (``TRITON_INTERPRET=1`` before ``hqqlora._decode`` is imported).
"""

import textwrap

import pytest
from helpers import TF32_DOTS, interpret

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import itertools
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    failures = []
    # Every mode, width and group; rows and bias so that each pair of the five settings
    # meets in all its combinations (the full product took five minutes on two cores),
    # except that the GEMVs (modes 2 and 4) always take one row: at more rows they run
    # as mode 5.
    for (m, mode), (b, nbits), (g, group) in itertools.product(
        enumerate((0, 1, 2, 3, 4, 5, 6, None)), enumerate((1, 2, 4, 8)), enumerate((32, 64))
    ):
        if mode in (2, 4):
            rows, bias = 1, (b + g) % 2 == 1
        else:
            rows, bias = (1, 3)[(m + b + g) % 2], (m + g) % 2 == 1
        lin = torch.nn.Linear(256, 64, bias=bias)
        layer = HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1),
                          compute_dtype=torch.float16, device="cpu")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        n, r = 3, 8
        A = torch.randn(n, r, 256) * 0.1
        B = torch.randn(n, 64, r) * 0.1
        s = torch.tensor([0.5, 2.0, 1.0])
        mag = torch.rand(n, 64) + 0.5
        norm = (torch.rand(64, n) + 0.5).t()  # not contiguous
        is_dora = torch.tensor([True, False, True])
        per = layout.packing_bits[1]
        _decode.TUNED.clear()
        if mode is not None:  # None: decode_config's rule
            _decode.TUNED[(64, 256, per, rows)] = (16, 2 if group == 32 else 1, 2, 4, 3, mode)
        x = torch.randn(rows, 256).half()
        idx = [5, 0, -1][:rows] if rows > 1 else [2]
        index = torch.tensor(idx)
        got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                  index=index, magnitude=mag, weight_norm=norm,
                                  is_dora=is_dora, bias=layer.bias)
        single = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A[2], lora_B=B[2],
                                     scaling=s[2:], bias=layer.bias)
        base = _decode.lora_decode(x, W_q, scale, zero, layout, bias=layer.bias)
        for i, k in enumerate(idx):
            y = x[i].double() @ W.T
            b = 0 if layer.bias is None else layer.bias.double()
            lora = s[2].double() * (x[i].double() @ A[2].double().T) @ B[2].double().T
            for name, out, ref in (("base", base[i], y + b), ("single", single[i], y + lora + b)):
                if ((out.double() - ref).norm() / ref.norm()) > 2e-3:
                    failures.append((mode, nbits, group, rows, bias, name))
            if not 0 <= k < n:
                if k != -1 and not torch.isnan(got[i]).all():
                    failures.append((mode, nbits, group, rows, bias, "index out of range", k))
                if k == -1 and ((got[i].double() - y - b).norm() / (y + b).norm()) > 2e-3:
                    failures.append((mode, nbits, group, rows, bias, "index -1"))
                continue
            ref = y + s[k].double() * (x[i].double() @ A[k].double().T) @ B[k].double().T
            if is_dora[k]:
                ref = ref * (mag[k] / norm[k]).double()
            ref = ref + b
            if ((got[i].double() - ref).norm() / ref.norm()) > 2e-3:
                failures.append((mode, nbits, group, rows, bias, "mixed", k))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_decode_kernels_in_the_interpreter_match_float64():
    interpret(SCRIPT)


# One row, a GEMV (MODE 4) program over all of K in one step with no split (so no counter or
# partials: ``_decode.TUNED``'s 1024×4096 entry is of this kind), and over two long steps
# at two splits, 2 to 4 outputs a program, against float64, with a bank read through an
# index and DoRA.
LONG_STEPS = textwrap.dedent(
    r"""
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    failures = []
    for nbits, config in ((4, (2, 4, 1, 8, 3, 4)), (2, (1, 4, 1, 4, 1, 4)),
                          (8, (2, 2, 2, 8, 3, 4)), (4, (1, 2, 2, 4, 3, 4))):
        lin = torch.nn.Linear(256, 64, bias=True)
        layer = HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=64, axis=1),
                          compute_dtype=torch.float16, device="cpu")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        _decode.TUNED.clear()
        _decode.TUNED[(64, 256, layout.packing_bits[1], 1)] = config
        A, B = torch.randn(2, 8, 256) * 0.1, torch.randn(2, 64, 8) * 0.1
        s = torch.tensor([0.5, 2.0])
        mag, norm = torch.rand(2, 64) + 0.5, torch.rand(2, 64) + 0.5
        x = torch.randn(1, 256).half()
        got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                  index=torch.tensor([1]), magnitude=mag, weight_norm=norm,
                                  is_dora=torch.tensor([False, True]), bias=layer.bias)
        ref = x.double() @ W.T + 2.0 * (x.double() @ A[1].double().T) @ B[1].double().T
        ref = ref * (mag[1] / norm[1]).double() + layer.bias.double()
        err = ((got.double() - ref).norm() / ref.norm()).item()
        if not err < 2e-3:
            failures.append((nbits, config, err))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_one_row_gemv_over_long_k_steps_with_no_split_matches_float64():
    interpret(LONG_STEPS)


# A DoRA bank row whose index is past the bank: a NaN row, and no read outside the bank
# (the interpreter reads raw memory, so such a read crashes or gives garbage there as on a GPU).
OUT_OF_RANGE_DORA = textwrap.dedent(
    r"""
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                      compute_dtype=torch.float16, device="cpu")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    n, r = 2, 4
    A, B = torch.randn(n, r, 64) * 0.1, torch.randn(n, 32, r) * 0.1
    s, is_dora = torch.tensor([0.5, 2.0]), torch.tensor([True, True])
    mag, norm = torch.rand(n, 32) + 0.5, torch.rand(n, 32) + 0.5
    x = torch.randn(2, 64).half()
    W = hqqlora.dequantize(layer).double()
    for big in (n, 2**40):
        with torch.no_grad():
            got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B,
                                      scaling=s, index=torch.tensor([1, big]), magnitude=mag,
                                      weight_norm=norm, is_dora=is_dora, bias=layer.bias)
        assert torch.isnan(got[1]).all(), big
        ref = x[0].double() @ W.T + s[1].double() * (x[0].double() @ A[1].double().T) @ B[1].double().T
        ref = ref * (mag[1] / norm[1]).double() + layer.bias.double()
        assert ((got[0].double() - ref).norm() / ref.norm()) < 2e-3, big
    """
)


def test_dora_bank_index_past_the_bank_gives_nan_without_reading_outside():
    interpret(OUT_OF_RANGE_DORA)


# The public entry points with the decode path reachable on the CPU: `is_cuda` says yes for
# CPU tensors, so `eligible` decides as on a GPU and the kernels run in the interpreter.
DISPATCH_PRELUDE = textwrap.dedent(
    r"""
    import sys
    import torch
    torch.Tensor.is_cuda = property(lambda self: self.device.type == "cpu")
    sys.path.insert(0, "tests")
    import hqqlora
    from hqqlora import _decode
    from helpers import make_layer, random_adapter

    real = _decode.lora_decode
    fused = []

    def spy(*args, **kwargs):
        fused.append(1)
        return real(*args, **kwargs)

    _decode.lora_decode = spy
    torch.manual_seed(0)
    layer = make_layer(64, 32, group_size=32, dtype=torch.float16)
    x = torch.randn(3, 64).half()
    lora = random_adapter(layer, r=4)
    dora = random_adapter(layer, r=4, dora=True, seed=2)
    bank = hqqlora.stack_adapters({"a": lora, "b": dora})
    index = torch.tensor([1, -1, 0])
    calls = {
        "base_forward": lambda: hqqlora.base_forward(layer, x),
        "apply_lora": lambda: hqqlora.apply_lora(layer, lora, x),
        "apply_lora dora": lambda: hqqlora.apply_lora(layer, dora, x),
        "mixed_batch_indexed": lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer),
    }
    """
)

# A bias that requires grad (HQQ's own bias does, as a non-leaf) with frozen adapters and
# an `x` that wants none: the gradient reaches the bias, as on the dense path.
BIAS_GRAD = DISPATCH_PRELUDE + textwrap.dedent(
    r"""
    frozen = layer.bias.detach()
    for name, call in calls.items():
        with torch.no_grad():
            fused.clear()
            call()
            assert fused, name  # the decode path is reachable here
        layer.bias = frozen.clone().requires_grad_()
        call().float().sum().backward()
        # d(sum y)/d bias = rows (DoRA's c cancels on the bias, up to float16 rounding)
        assert (layer.bias.grad.double() - 3).abs().max() <= 3 * 2**-8, name
        layer.bias = frozen
    """
)


def test_bias_that_requires_grad_gets_its_gradient_at_decode():
    interpret(BIAS_GRAD)


# Shapes that do not tile evenly: out not a multiple of the tile's outputs, groups per row
# not a multiple of the groups per step (gps halved) nor of the splits, in the exponent-trick
# modes and decode_config's own rule (TUNED cleared), at 1 to 64 rows.
EDGE_SHAPES = textwrap.dedent(
    r"""
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    failures = []
    cases = []
    # Two widths a shape and launch, so that each launch meets every width over the shapes
    # and each shape every width over the launches.
    for i, (out_f, in_f, group) in enumerate(((96, 192, 64), (80, 320, 32), (96, 384, 128))):
        for j, (rows, config) in enumerate(((1, (32, 4, 16, 4, 1, 4)), (1, None),
                                            (2, (32, 1, 3, 4, 3, 5)), (17, None), (64, None),
                                            (3, (16, 2, 3, 4, 3, 3)), (5, (16, 2, 3, 4, 3, 6)),
                                            (64, (32, 4, 2, 4, 3, 6)))):
            for nbits in ((1, 2, 4, 8)[(i + j) % 4], (1, 2, 4, 8)[(i + j + 2) % 4]):
                cases.append((out_f, in_f, group, nbits, rows, config))
    for out_f, in_f, group, nbits, rows, config in cases:
        lin = torch.nn.Linear(in_f, out_f)
        layer = HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1),
                          compute_dtype=torch.float16, device="cpu")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        n, r = 3, 8
        A, B = torch.randn(n, r, in_f) * 0.1, torch.randn(n, out_f, r) * 0.1
        s, is_dora = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([True, False, True])
        mag, norm = torch.rand(n, out_f) + 0.5, torch.rand(n, out_f) + 0.5
        per = layout.packing_bits[1]
        _decode.TUNED.clear()
        if config is not None:
            _decode.TUNED[(out_f, in_f, per, rows)] = config
        x = torch.randn(rows, in_f).half()
        idx = [(2 + 3 * i) % 5 - 1 for i in range(rows)]  # 1, -1, 2, 0, 3 (past the bank), ...
        got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                  index=torch.tensor(idx), magnitude=mag, weight_norm=norm,
                                  is_dora=is_dora, bias=layer.bias)
        case = (out_f, in_f, group, nbits, rows, config)
        for i, k in enumerate(idx):
            ref = x[i].double() @ W.T
            if k == n:
                if not torch.isnan(got[i]).all():
                    failures.append(case + ("index past the bank", i))
                continue
            if k >= 0:
                ref = ref + s[k].double() * (x[i].double() @ A[k].double().T) @ B[k].double().T
                if is_dora[k]:
                    ref = ref * (mag[k] / norm[k]).double()
            ref = ref + layer.bias.double()
            if not ((got[i].double() - ref).norm() / ref.norm()) <= 2e-3:
                failures.append(case + (i, k))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_decode_kernels_at_shapes_that_do_not_tile_evenly():
    interpret(EDGE_SHAPES)


# MODES 6 and 7 multiply HQQ's own weights: ``(q − z)`` rounded to the compute dtype, then
# ``· s`` rounded (MODE 7 computes both in the compute dtype itself). With one-hot rows of
# x each output is one weight, exactly: the result equals HQQ's dequantized column bit for
# bit (an unrounded weight would differ in some).
MODE6_BITS = textwrap.dedent(
    r"""
    import itertools
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    for (nbits, group, gps), mode in itertools.product(
        ((4, 64, 1), (2, 32, 2), (8, 32, 4), (1, 64, 2)), (6, 7)
    ):
        lin = torch.nn.Linear(256, 64, bias=False)
        layer = HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1),
                          compute_dtype=torch.float16, device="cpu")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer)
        cols = torch.tensor([0, 5, 63, 64, 130, 255, 31, 200])
        x = torch.nn.functional.one_hot(cols, 256).half()
        per = layout.packing_bits[1]
        _decode.TUNED.clear()
        _decode.TUNED[(64, 256, per, len(cols))] = (16, gps, 2, 4, 3, mode)
        got = _decode.lora_decode(x, W_q, scale, zero, layout)
        assert torch.equal(got, W[:, cols].T), (nbits, mode, (got != W[:, cols].T).sum())
    """
)


def test_mode6_multiplies_hqqs_own_weights_bit_for_bit():
    interpret(MODE6_BITS)


# The adapter terms of rows > 1 (computed TERM_ROWS rows at a time, stored apart, added by
# the last split) and of one token (added to split 0's partial): rows, splits and TERM_ROWS
# that do not divide each other, ranks 5 and 70, index -1 / past the bank / below -1, DoRA,
# int32 and int64 indices, one adapter with no index. Every buffer the launch allocates
# starts as NaN (or 7 for the counters), so a term or row never written shows; and a term
# that cancels the base product shows any rounding of the term to float16 on the way.
ADAPTER_TERMS = textwrap.dedent(
    r"""
import contextlib
import torch
import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors, unpacked_codes
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

real_empty = torch.empty


@contextlib.contextmanager
def poisoned_empty():
    # Every buffer the launch allocates starts as NaN (floats) or 7 (ints): a row, term
    # or counter the kernels read before writing shows.
    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 7)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


torch.manual_seed(0)
failures = []
layers = {}


def layer_of(out_f, in_f, group, nbits):
    key = (out_f, in_f, group, nbits)
    if key not in layers:
        lin = torch.nn.Linear(in_f, out_f)
        layer = HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1),
                          compute_dtype=torch.float16, device="cpu")
        W_q, scale, zero = quant_tensors(layer)
        layout = quant_layout(layer)
        # HQQ's rounded weights (MODES 6 and 7 multiply these) and the unrounded (q - z)·s
        # (MODES 0-5 do), in float64.
        exact = (unpacked_codes(W_q, layout, torch.float64) - zero.double()) * scale.double()
        layers[key] = (layer, layout, (W_q, scale, zero),
                       hqqlora.dequantize(layer).double(), exact.reshape(layout.shape))
    return layers[key]


def decode(x, layer_t, config, rows, **kw):
    layer, layout, (W_q, scale, zero), _, _ = layer_t
    out_f, in_f = layout.shape
    _decode.TUNED.clear()
    if config is not None:
        _decode.TUNED[(out_f, in_f, layout.packing_bits[1], rows)] = config
    with poisoned_empty():
        return _decode.lora_decode(x, W_q, scale, zero, layout, **kw)


# 1. Rows, splits and TERM_ROWS that do not divide each other (rank 70: 128 rank slots, so
# TERM_ROWS is 1-4 and a split's rows take several steps; rank 5: one step), index -1, past
# the bank (n and 2**40), DoRA and LoRA rows, one adapter without index, 1/2/4/8 bits.
n = 3
s = torch.tensor([0.5, 2.0, 1.0])
for out_f, in_f, group, nbits, rows, rank, config, idx_dtype in (
    (80, 128, 32, 4, 23, 70, (8, 2, 1, 4, 3, 6), torch.int64),  # split 1, TERM_ROWS 4
    (80, 128, 32, 4, 23, 70, (8, 1, 2, 4, 3, 5), torch.int32),  # 12 + 11 rows
    (80, 128, 32, 2, 19, 70, (4, 1, 4, 4, 3, 6), torch.int64),  # 5, 5, 5, 4 rows
    (96, 256, 64, 1, 64, 5, (2, 2, 1, 4, 3, 6), torch.int64),
    (96, 256, 64, 8, 33, 70, (16, 1, 4, 4, 3, 6), torch.int32),  # 9 a split, TERM_ROWS 4
    (96, 256, 64, 4, 2, 70, (16, 1, 8, 4, 3, 5), torch.int64),  # splits with no rows
    (96, 256, 64, 4, 9, 5, (16, 1, 2, 4, 3, 1), torch.int64),  # a program per slot
    (96, 256, 64, 2, 7, 70, (8, 2, 2, 4, 3, 0), torch.int64),
    (96, 256, 64, 4, 40, 70, None, torch.int64),  # decode_config's rule: MODE 7
    (96, 256, 64, 4, 1, 5, None, torch.int64),  # one token: the direct term
):
    layer_t = layer_of(out_f, in_f, group, nbits)
    layer, W = layer_t[0], layer_t[3]
    A = torch.randn(n, rank, in_f) * 0.1
    B = torch.randn(n, out_f, rank) * (0.3 / rank**0.5)
    is_dora = torch.tensor([True, False, True])
    mag, norm = torch.rand(n, out_f) + 0.5, torch.rand(n, out_f) + 0.5
    x = torch.randn(rows, in_f).half()
    pattern = [1, -1, 2, 0, n, 2, 0, 1, 2**40, -1, 1, -5]
    idx = [pattern[(5 * i + 3) % len(pattern)] for i in range(rows)] if rows > 1 else [2]
    if idx_dtype == torch.int32:
        idx = [k if k < 2**31 else 2**31 - 1 for k in idx]
    got = decode(x, layer_t, config, rows, lora_A=A, lora_B=B, scaling=s,
                 index=torch.tensor(idx, dtype=idx_dtype), magnitude=mag, weight_norm=norm,
                 is_dora=is_dora, bias=layer.bias)
    one = decode(x, layer_t, config, rows, lora_A=A[0], lora_B=B[0], scaling=s[:1],
                 magnitude=mag[0], weight_norm=norm[0], bias=layer.bias)
    case = (out_f, in_f, group, nbits, rows, rank, config)
    for i, k in enumerate(idx):
        y = x[i].double() @ W.T
        for name, out, kk, dora in (("bank", got[i], k, k in (0, 2)), ("one", one[i], 0, True)):
            if not -1 <= kk < n:
                if not torch.isnan(out).all():
                    failures.append(case + (name, i, "not NaN"))
                continue
            ref = y
            if kk >= 0:
                ref = ref + s[kk].double() * (x[i].double() @ A[kk].double().T) @ B[kk].double().T
                if dora:
                    ref = ref * (mag[kk] / norm[kk]).double()
            ref = ref + layer.bias.double()
            if not ((out.double() - ref).norm() / ref.norm()) <= 2e-3:
                failures.append(case + (name, i, k))

# 2. The adapter term stays float32 until the output's one rounding: x one-hot, A one-hot,
# and B cancels the base product up to a small remainder d, so the output is about d. A
# term rounded to float16 on the way (to |W| ~ 0.05's precision) would be off by 1e-5,
# 1% of d.
for nbits, rows, config in ((4, 1, (16, 2, 2, 4, 1, 4)), (2, 3, (8, 1, 2, 4, 3, 5)),
                            (4, 6, (16, 2, 1, 4, 3, 6)), (8, 5, (16, 1, 4, 4, 3, 6)),
                            (2, 20, (16, 1, 2, 4, 3, 7))):
    out_f, in_f, rank = 64, 256, 4
    layer_t = layer_of(out_f, in_f, 64, nbits)
    W = layer_t[3] if config[-1] in (6, 7) else layer_t[4]
    cols = torch.tensor([3, 70, 131, 250])  # one input column per rank slot
    A = torch.zeros(n, rank, in_f)
    A[:, torch.arange(rank), cols] = 1.0
    d = (torch.rand(n, out_f, rank) + 1) * 1e-3
    B = ((-W[:, cols].float()).expand(n, -1, -1) + d) / s[:, None, None]
    slot = [(2 * i + 1) % rank for i in range(rows)]
    idx = [(0, 1, 2, -1)[i % 4] for i in range(rows)] if rows > 1 else [1]
    x = torch.nn.functional.one_hot(cols[slot], in_f).half()
    mag, norm = torch.rand(n, out_f) + 0.5, torch.rand(n, out_f) + 0.5
    is_dora = torch.tensor([False, False, True])
    got = decode(x, layer_t, config, rows, lora_A=A, lora_B=B, scaling=s,
                 index=torch.tensor(idx), magnitude=mag, weight_norm=norm, is_dora=is_dora)
    for i, k in enumerate(idx):
        ref = W[:, cols[slot[i]]]
        if k >= 0:
            ref = ref + s[k].double() * B[k, :, slot[i]].double()
            if is_dora[k]:
                ref = ref * (mag[k] / norm[k]).double()
        err = (got[i].double() - ref).abs() - (2**-11 * ref.abs() + 1e-7)
        if not (err <= 0).all():
            failures.append(("float32 term", nbits, rows, config, i, k, err.max().item()))
print("FAILURES", failures)
assert not failures
    """
)


def test_adapter_terms_by_rows_splits_and_ranks_stay_float32():
    interpret(ADAPTER_TERMS)


# Rows that share one adapter (or none) take one tensor-core dot of B's column tile per 16
# rows of a split; rows of several adapters, or splits of fewer rows, the gathered load. Chunks of each kind, partial
# chunks (a split of 20 rows: 16 + 4, whose padding rows belong to the next split), rows
# without an adapter inside a shared chunk, a chunk where every row is past the bank (NaN),
# one odd row out among 40, and one adapter without an index.
SHARED = textwrap.dedent(
    r"""
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    layer = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64, axis=1),
                      compute_dtype=torch.float16, device="cpu")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    W = hqqlora.dequantize(layer).double()
    n = 3
    A, B = torch.randn(n, 16, 256) * 0.1, torch.randn(n, 96, 16) * 0.1
    s, is_dora = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([True, False, True])
    mag, norm = torch.rand(n, 96) + 0.5, torch.rand(n, 96) + 0.5
    failures = []
    ar = torch.arange
    for rows, config, idx in (
        (64, None, torch.zeros(64, dtype=torch.long)),
        (40, (16, 1, 2, 4, 3, 6), torch.ones(40, dtype=torch.long)),
        (40, (16, 1, 2, 4, 3, 6), torch.where(ar(40) % 3 == 0, -1, 2)),
        (40, (16, 1, 2, 4, 3, 5), torch.where(ar(40) < 20, 0, ar(40) % 3)),
        (33, (16, 1, 1, 4, 3, 6), ar(33) % 4 - 1),
        (64, (16, 1, 4, 4, 3, 6), torch.full((64,), -1)),
        (48, (16, 1, 2, 4, 3, 6), torch.where(ar(48) < 30, 3, 0)),
        (20, (16, 1, 1, 4, 3, 5), None),
        (64, (16, 1, 4, 4, 3, 6), None),
        # Splits of fewer than 16 rows (each reads its own rows' tiles), shared and mixed.
        (16, (16, 1, 4, 4, 3, 5), torch.full((16,), 2)),
        (16, (16, 1, 4, 4, 3, 5), torch.where(ar(16) % 5 == 0, -1, 0)),
        (16, (16, 1, 4, 4, 3, 5), ar(16) % 3),
        (5, (16, 1, 2, 4, 3, 6), torch.full((5,), 3)),
        (40, (16, 1, 4, 4, 3, 6), torch.where(ar(40) % 7 == 0, -1, 1)),
        (40, (16, 1, 4, 4, 3, 6), torch.where(ar(40) == 39, 0, 1)),
        (12, (16, 1, 4, 4, 3, 6), None),
        (3, (16, 1, 1, 4, 3, 5), torch.tensor([1, -1, 1])),
    ):
        _decode.TUNED.clear()
        if config:
            _decode.TUNED[(96, 256, 2, rows)] = config
        x = torch.randn(rows, 256).half()
        if idx is None:
            got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A[1], lora_B=B[1],
                                      scaling=s[1:2], bias=layer.bias)
            idx, dora = torch.ones(rows, dtype=torch.long), False
        else:
            got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                      index=idx, magnitude=mag, weight_norm=norm,
                                      is_dora=is_dora, bias=layer.bias)
            dora = True
        for i in range(rows):
            k = int(idx[i])
            if k >= n:
                if not torch.isnan(got[i]).all():
                    failures.append((rows, config, i, k, "not NaN"))
                continue
            ref = x[i].double() @ W.T
            if k >= 0:
                ref = ref + s[k].double() * (x[i].double() @ A[k].double().T) @ B[k].double().T
                if dora and is_dora[k]:
                    ref = ref * (mag[k] / norm[k]).double()
            ref = ref + layer.bias.double()
            if not ((got[i].double() - ref).norm() / ref.norm()) < 2e-3:
                failures.append((rows, config, i, k))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_rows_that_share_an_adapter_take_one_dot_and_match_float64():
    interpret(SHARED)


# The one-adapter dot's precision. The interpreter computes every dot in float32 whatever
# its input_precision; this prelude rounds as a GPU does (TF32: 10-bit mantissas; TF32x3: a
# TF32 head and tail of each operand, three products), so a kernel that asked for plain
# TF32 fails here. MODE 6 multiplies HQQ's own weights, so the only errors left are float32
# sums and the output's one rounding: each output within half a float16 ulp plus 2⁻¹⁸ of
# the sum of its absolute terms (TF32's 2⁻¹¹ does not fit). A large B with terms of both
# signs makes the adapter term dominate and cancel.
TERM_PRECISION = TF32_DOTS + textwrap.dedent(
    r"""
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    layer = HQQLinear(torch.nn.Linear(256, 96), BaseQuantizeConfig(nbits=4, group_size=64, axis=1),
                      compute_dtype=torch.float16, device="cpu")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    W = hqqlora.dequantize(layer).double()
    n, r = 2, 16
    A, B = torch.randn(n, r, 256) / 16, torch.randn(n, 96, r) * 4
    s = torch.tensor([0.75, 1.5])
    failures = []
    for rows, config, idx in ((32, (16, 1, 2, 4, 3, 6), torch.ones(32, dtype=torch.long)),
                              (16, (16, 1, 1, 4, 3, 6), torch.where(torch.arange(16) % 4 == 0, -1, 0)),
                              (48, (32, 1, 2, 4, 3, 6), None)):
        _decode.TUNED.clear()
        _decode.TUNED[(96, 256, 2, rows)] = config
        x = torch.randn(rows, 256).half()
        kw = dict(lora_A=A, lora_B=B, scaling=s, index=idx) if idx is not None else dict(
            lora_A=A[1], lora_B=B[1], scaling=s[1:])
        got = _decode.lora_decode(x, W_q, scale, zero, layout, bias=layer.bias, **kw).double()
        ks = idx.tolist() if idx is not None else [1] * rows
        xd = x.double()
        for i, k in enumerate(ks):
            ref = xd[i] @ W.T + layer.bias.double()
            bound = xd[i].abs() @ W.abs().T + layer.bias.double().abs()
            if k >= 0:
                ref = ref + s[k].double() * (xd[i] @ A[k].double().T) @ B[k].double().T
                bound = bound + s[k].double() * (xd[i].abs() @ A[k].double().abs().T) @ B[k].double().abs().T
            _, e = torch.frexp(torch.maximum(ref.abs(), got[i].abs()))
            ulp = torch.clamp(torch.ldexp(torch.ones_like(ref), e - 11), min=2.0**-24)
            err = (got[i] - ref).abs()
            if not bool((err <= 0.5 * ulp + 2.0**-18 * bound).all()):
                failures.append((rows, config, i, k, float((err / bound).max())))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_the_one_adapter_dot_is_float32_grade():
    interpret(TERM_PRECISION)


# Rows without an adapter beside rows (or a bank slot 0) whose adapter holds NaN: the -1
# rows must stay the base (0 · NaN is NaN, so the one-adapter product must select, not
# multiply), and every masked-on load and store must land inside a tensor the launch
# passed (a bounds check of the interpreter's loads and stores), with every torch.empty
# poisoned. Found by an adversarial review.
NAN_NEIGHBOURS = textwrap.dedent(
    r"""
    import numpy as np
    import torch
    import triton.runtime.interpreter as I
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    ranges, stray = [], []
    call = I.GridExecutor.__call__

    def checked_call(self, *a, **kw):
        ranges[:] = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                     for t in list(a) + list(kw.values()) if isinstance(t, torch.Tensor)]
        return call(self, *a, **kw)

    I.GridExecutor.__call__ = checked_call

    def check(ptrs, mask):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        p = np.asarray(ptrs.data).astype(np.int64)
        addr = p[np.broadcast_to(np.asarray(mask.data), p.shape).astype(bool)]
        ok = np.zeros(addr.shape, bool)
        for lo, hi in ranges:
            ok |= (addr >= lo) & (addr + size <= hi)
        if not ok.all():
            stray.append(1)

    for name, mpos in (("create_masked_load", 0), ("create_masked_store", 1)):
        orig = getattr(I.InterpreterBuilder, name)

        def wrapped(self, ptrs, a, b, *rest, _o=orig, _m=mpos):
            check(ptrs, (a, b)[_m])
            return _o(self, ptrs, a, b, *rest)

        setattr(I.InterpreterBuilder, name, wrapped)

    real_empty = torch.empty

    def poisoned(*a, **kw):
        out = real_empty(*a, **kw)
        return out.fill_(float("nan") if out.is_floating_point() else 7)

    torch.manual_seed(0)
    layer = HQQLinear(torch.nn.Linear(256, 80), BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                      compute_dtype=torch.float16, device="cpu")  # 40 packed rows: a partial tile
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    W = hqqlora.dequantize(layer).double()
    n = 3
    A, B = torch.randn(n, 16, 256) * 0.1, torch.randn(n, 80, 16) * 0.1
    s = torch.tensor([0.5, 2.0, 3.0])
    B[0] = float("nan")  # a diverged adapter: only its own rows may see it
    ar = torch.arange
    failures = []
    for rows, config, idx in (
        (5, (16, 1, 4, 4, 3, 5), torch.full((5,), -1)),
        (40, (16, 1, 2, 4, 3, 6), torch.full((40,), -1)),
        (40, (16, 1, 4, 4, 3, 6), torch.full((40,), 3)),
        (8, (16, 1, 4, 4, 3, 5), torch.tensor([0, -1, 0, 0, -1, 0, 0, 0])),
        (40, (16, 1, 2, 4, 3, 6), torch.where(ar(40) % 3 == 0, -1, 0)),
        (40, (16, 1, 2, 4, 3, 6), torch.where(ar(40) % 7 == 0, -1, 2)),
        (40, (16, 1, 2, 4, 3, 5), ar(40) % 4 - 1),
        (12, (16, 1, 4, 4, 3, 6), torch.tensor([1] * 11 + [2])),
        (20, (16, 1, 2, 4, 3, 5), torch.where(ar(20) % 6 == 1, -1, 2)),
    ):
        _decode.TUNED.clear()
        _decode.TUNED[(80, 256, 2, rows)] = config
        x = torch.randn(rows, 256).half()
        torch.empty = poisoned
        try:
            got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                      index=idx, bias=layer.bias)
        finally:
            torch.empty = real_empty
        for i in range(rows):
            k = int(idx[i])
            if k >= n:
                if not torch.isnan(got[i]).all():
                    failures.append((rows, config, i, k, "not NaN"))
                continue
            if k == 0:
                continue
            ref = x[i].double() @ W.T + layer.bias.double()
            if k > 0:
                ref = ref + s[k].double() * (x[i].double() @ A[k].double().T) @ B[k].double().T
            if not ((got[i].double() - ref).norm() / ref.norm()) < 2e-3:
                failures.append((rows, config, i, k))
    print("FAILURES", failures, "STRAY", len(stray))
    assert not failures and not stray
    """
)


def test_rows_without_an_adapter_never_see_a_neighbours_nan_and_reads_stay_inside():
    interpret(NAN_NEIGHBOURS)


# K loops of several steps a program (MODES 4 to 7) at each PREFETCH level: the step
# ahead is loaded before this one's arithmetic (the last step reloads itself), so a step
# read twice, skipped or paired with another step's scale and zero shows here. Each output
# elementwise within half a float16 ulp plus 2⁻¹⁸ of the sum of its absolute terms
# (``|x|·(|q| + |z|)·|s|`` and the adapter's): MODES 4 and 5 multiply the exact codes and
# apply scale and zero per group (so the reference is the unrounded ``(q − z)·s``), MODES 6
# and 7 HQQ's rounded weights. At 1 and 2 bits in float16 this also needs MODE 5 to take the
# exponent trick's 1024 off the codes: with it left in the sums (taken off with the zero)
# the float32 partials carry ``1024 · Σ x`` and miss the bound by about 4×.
PREFETCHED_STEPS = textwrap.dedent(
    r"""
    import torch
    import hqqlora
    from hqqlora import _decode
    from hqqlora._base import quant_layout, quant_tensors
    from hqqlora._base import unpacked_codes
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    failures, checked = [], 0
    for nbits in (1, 2, 4):
        for group in (32, 64):
            lin = torch.nn.Linear(256, 96)
            layer = HQQLinear(lin, BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1),
                              compute_dtype=torch.float16, device="cpu")
            layout = quant_layout(layer)
            W_q, scale, zero = quant_tensors(layer)
            per = layout.packing_bits[1]
            q = unpacked_codes(W_q, layout, torch.float64)  # (out · in / group, group)
            zd, sd = zero.double(), scale.double()
            exact = ((q - zd) * sd).reshape(96, 256)
            rounded = hqqlora.dequantize(layer).double()
            size = ((q.abs() + zd.abs()) * sd.abs()).reshape(96, 256)
            A, B = torch.randn(16, 256) / 16, torch.randn(96, 16) / 4
            gps = 64 // group  # 64 inputs a step: 4 steps a program at one split
            for mode, rows, config in ((4, 1, (16, gps, 1, 4, 1, 4)),
                                       (4, 1, (16, gps, 2, 4, 1, 4)),
                                       (5, 3, (16, 1, 1, 4, 3, 5)),
                                       (5, 16, (16, 1, 2, 4, 2, 5)),
                                       (6, 20, (16, gps, 1, 4, 3, 6)),
                                       (6, 40, (32, gps, 2, 4, 3, 6)),
                                       (7, 24, (16, gps, 1, 4, 3, 7))):
                x = torch.randn(rows, 256).half()
                xd = x.double()
                w = rounded if mode >= 6 else exact
                t = xd @ A.double().T
                ref = xd @ w.T + 0.5 * t @ B.double().T + layer.bias.double()
                bound = (xd.abs() @ size.T + 0.5 * (xd.abs() @ A.double().abs().T)
                         @ B.double().abs().T + layer.bias.double().abs())
                for prefetch in (0, 1, 2):
                    _decode.TUNED.clear()
                    _decode.TUNED[(96, 256, per, rows)] = (*config, 0, prefetch)
                    got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B,
                                              scaling=torch.tensor([0.5]), bias=layer.bias)
                    got = got.double()
                    _, e = torch.frexp(torch.maximum(ref.abs(), got.abs()))
                    ulp = torch.clamp(torch.ldexp(torch.ones_like(ref), e - 11), min=2.0**-24)
                    err = (got - ref).abs()
                    checked += 1
                    if not bool((err <= 0.5 * ulp + 2.0**-18 * bound).all()):
                        failures.append((nbits, group, mode, rows, config, prefetch,
                                         float(((err - 0.5 * ulp) / bound).max())))
    print("CHECKED", checked, "FAILURES", failures)
    assert checked == 126 and not failures
    """
)


def test_k_loops_of_several_steps_at_each_prefetch_level_match_float64():
    interpret(PREFETCHED_STEPS)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` appends ``(name,
    kwargs)`` to ``launches`` (in process: nothing runs)."""

    def __init__(self, launches, name=""):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, kwargs))


class _ArgsRecorder:
    """As :class:`_Recorder`, and also keeps each kernel's last grid and arguments in
    ``calls[name]``."""

    def __init__(self, calls, launches, name):
        self.calls, self.launches, self.name = calls, launches, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls[self.name] = (grid, args)
            self.launches.append((self.name, kwargs))

        return launch


def _cpu_layer(in_f, out_f, group, dtype):
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    return HQQLinear(
        torch.nn.Linear(in_f, out_f),
        BaseQuantizeConfig(nbits=4, group_size=group, axis=1),
        compute_dtype=dtype,
        device="cpu",
    )


# Outputs cannot tell the PREFETCH levels apart (they give the same bits), so the launch
# itself is recorded here (in process, nothing runs): a TUNED entry's 8th field reaches the
# kernel, a 7-field entry gets the module default, and a program of one step gets 0.
def test_a_tuned_prefetch_level_reaches_the_kernel(monkeypatch):
    import torch

    from hqqlora import _decode
    from hqqlora._base import quant_tensors

    launches = []
    monkeypatch.setattr(_decode, "_main_kernel", _Recorder(launches))
    monkeypatch.setattr(_decode, "_shrink_kernel", _Recorder(launches))
    monkeypatch.setattr(_decode, "PDL", False)
    monkeypatch.setattr(_decode, "TUNED", {})
    layer = _cpu_layer(256, 64, 32, torch.float16)
    W_q, scale, zero = quant_tensors(layer)
    meta = [4, 2, 32, 64, 256]  # bits, codes a byte, group, out, in
    A, B, s = torch.zeros(8, 256), torch.zeros(64, 8), torch.ones(1)
    x = torch.zeros(20, 256, dtype=torch.float16)
    # 256 inputs in groups of 32: 8 steps, 4 a program at two splits, 1 at eight.
    for config, expected in (
        ((16, 1, 2, 4, 3, 7, 0, 1), 1),
        ((16, 1, 2, 4, 3, 6, 0, 0), 0),
        ((16, 1, 2, 4, 3, 5, 64, 2), 2),
        ((16, 1, 2, 4, 3, 7), _decode.PREFETCH),
        ((16, 1, 8, 4, 3, 7, 0, 1), 0),
    ):
        _decode.TUNED[(64, 256, 2, 20)] = config
        launches.clear()
        _decode._launch(x, W_q, scale, zero, meta, A, B, s, None, None, None, None, None,
                        torch.float16)  # fmt: skip
        (main,) = [kw for _, kw in launches if "PREFETCH" in kw]
        assert main["PREFETCH"] == expected, (config, main["PREFETCH"])
        assert main["MODE"] == config[5]
        cap = config[6] if len(config) > 6 else 0
        assert main.get("maxnreg") == (cap or None)


def test_fold_config_takes_its_tables_then_the_gathered_launch(monkeypatch):
    import torch

    from hqqlora import _decode, _gluon_fold
    from hqqlora._base import quant_tensors

    # GATHER_FOLD's launch: a TUNED_FOLD entry, else the TUNED_GATHER entry's split and
    # stages with at most 64 packed rows (the folded kernel's one warpgroup).
    monkeypatch.setitem(_decode.TUNED_FOLD, (256, 1024, 40), (32, 2, 4))
    assert _decode.fold_config(256, 1024, 40) == (32, 2, 4)
    monkeypatch.setitem(_decode.TUNED_GATHER, (512, 2048, 40), (128, 2, 8, 5))
    assert _decode.fold_config(512, 2048, 40) == (64, 2, 5)
    monkeypatch.setitem(_decode.TUNED_GATHER, (512, 2048, 1), None)
    assert _decode.fold_config(512, 2048, 1) is None
    # FOLD_ONE's: the TUNED_FOLD_ONE entry only (none: not folded, whatever the Gluon
    # kernel's launch).
    monkeypatch.setitem(_decode.TUNED_FOLD_ONE, (512, 2048, 16), (32, 4, 3))
    monkeypatch.setitem(_decode.TUNED_GLUON, (512, 2048, 40), (64, 2, 8, 3))
    assert _decode.fold_config(512, 2048, 16, gathered=False) == (32, 4, 3)
    assert _decode.fold_config(512, 2048, 40, gathered=False) is None
    # Which calls the folded kernel takes, past the Gluon kernel's own conditions (here
    # said yes, as on an H100): a padded rank of at most 32, 32 or 64 packed rows, and
    # 2 · (4096 / padded rank) inputs of A dividing a split's inputs (1024 in).
    W_q, scale, zero = quant_tensors(_cpu_layer(1024, 256, 64, torch.bfloat16))
    x = torch.zeros(40, 1024, dtype=torch.bfloat16)
    meta = [4, 2, 64, 256, 1024]
    monkeypatch.setattr(_gluon_fold._gluon, "supported", lambda *a: True)
    takes = {
        (16, 2, 64): True, (16, 1, 32): True, (16, 4, 64): False, (32, 4, 64): True,
        (32, 8, 64): False, (64, 1, 64): False, (16, 2, 16): False, (16, 2, 128): False,
    }  # fmt: skip
    for (block_r, split, block_p), expected in takes.items():
        got = _gluon_fold.supported(x, W_q, scale, zero, meta, block_r, split, block_p)
        assert got == expected, (block_r, split, block_p)
    monkeypatch.setattr(_gluon_fold._gluon, "supported", lambda *a: False)
    assert not _gluon_fold.supported(x, W_q, scale, zero, meta, 16, 2, 64)


# MODE 8's launch order, recorded in process (nothing runs: whether the shrink kernel
# really waits for the Gluon kernel is for the GPU tests, which run both orders). Where a
# Triton kernel finishes (more than FINISH_ROWS rows gathering no bank), the Gluon kernel
# goes first and the shrink kernel beside it, finishing after it (GLUON_FIRST); at one
# row, over a gathered bank without GATHER_SIDE and with GLUON_FIRST off, the shrink
# kernel goes first and the Gluon kernel beside it; over a gathered bank the shrink may
# instead be folded into the Gluon kernel (GATHER_FOLD), and so may one adapter's above
# FINISH_ROWS rows (FOLD_ONE); without an adapter nothing overlaps.
def test_mode8_launch_order_and_its_dependent_launches(monkeypatch):
    import torch

    from hqqlora import _decode, _gluon, _gluon_fold
    from hqqlora._base import quant_tensors

    launches = []
    for name in ("_main_kernel", "_shrink_kernel", "_bank_shrink_kernel", "_bank_terms_kernel"):
        monkeypatch.setattr(_decode, name, _Recorder(launches, name))
    monkeypatch.setattr(_gluon, "_base_kernel", _Recorder(launches, "gluon"))
    monkeypatch.setattr(_gluon, "supported", lambda *a: True)
    monkeypatch.setattr(_decode, "PDL", True)
    monkeypatch.setattr(_decode, "FOLD_ONE", False)  # until its own cases below
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    layer = _cpu_layer(1024, 256, 64, torch.bfloat16)
    W_q, scale, zero = quant_tensors(layer)
    meta = [4, 2, 64, 256, 1024]  # bits, codes a byte, group, out, in
    for rows in (1, 5, 16, 64):
        monkeypatch.setitem(_decode.TUNED_GLUON, (256, 1024, rows), (64, 4, 8, 3))
        monkeypatch.setitem(_decode.TUNED_GATHER, (256, 1024, rows), (64, 4, 8, 3))

    def order(rows, bank, first=True, lora=True, dora=False, side=True):
        monkeypatch.setattr(_decode, "GLUON_FIRST", first)
        monkeypatch.setattr(_decode, "GATHER_SIDE", int(side))
        n = max(bank, 1)
        A, B, s = torch.zeros(n, 8, 1024), torch.zeros(n, 256, 8), torch.ones(n)
        mag = norm = torch.ones(n, 256) if dora else None
        index = torch.arange(rows) % bank if bank else None
        if not bank:
            A, B, s = A[0], B[0], s[:1]
            mag, norm = (mag[0], norm[0]) if dora else (None, None)
        if not lora:
            A = B = s = None
        bias = torch.zeros(256, dtype=torch.bfloat16) if dora else None
        x = torch.zeros(rows, 1024, dtype=torch.bfloat16)
        launches.clear()
        _decode._launch(x, W_q, scale, zero, meta, A, B, s, index, mag, norm, None, bias,
                        torch.bfloat16)  # fmt: skip
        return [name for name, _ in launches], dict(launches)

    # One adapter, a bank of one at 64 rows, a bank of four at 16 (each row its own B,
    # no gathering), DoRA with a bias.
    for rows, bank, dora in ((16, 0, False), (64, 1, False), (16, 4, False), (5, 0, True)):
        names, kw = order(rows, bank, dora=dora)
        assert names == ["gluon", "_shrink_kernel", "_main_kernel"], (rows, bank, names)
        assert kw["gluon"]["FIRST"] and not kw["gluon"]["WAIT_PREVIOUS"]
        assert not kw["gluon"]["launch_pdl"]
        assert kw["_shrink_kernel"]["WAIT_AFTER"] and kw["_shrink_kernel"]["launch_pdl"]
        assert kw["_shrink_kernel"]["USE_PDL"] and kw["_main_kernel"]["launch_pdl"]
        assert kw["_main_kernel"]["HAS_DORA"] == dora == kw["_main_kernel"]["HAS_BIAS"]
    for rows, bank, first in ((16, 0, False), (1, 0, True), (64, 4, True)):
        names, kw = order(rows, bank, first, side=False)
        shrink = "_bank_shrink_kernel" if bank > 1 else "_shrink_kernel"
        assert names[:2] == [shrink, "gluon"], (rows, bank, first, names)
        assert kw["gluon"]["WAIT_PREVIOUS"] and kw["gluon"]["launch_pdl"]
        assert not kw["gluon"]["FIRST"] and not kw[shrink].get("WAIT_AFTER", False)
        assert not kw[shrink].get("launch_pdl", False)
    # A bank above 16 rows (GATHER_SIDE): the Gluon kernel alone on its stream, the bank's
    # shrink and terms kernels beside it (the terms kernel a dependent launch of the
    # shrink kernel), then the Triton kernel, after both, adding the terms.
    names, kw = order(64, 4, side=True)
    assert names == ["gluon", "_bank_shrink_kernel", "_bank_terms_kernel", "_main_kernel"], names
    assert not kw["gluon"]["FIRST"] and not kw["gluon"]["WAIT_PREVIOUS"]
    assert not kw["gluon"]["launch_pdl"] and not kw["_bank_shrink_kernel"].get("launch_pdl")
    assert kw["_bank_shrink_kernel"]["USE_PDL"]
    assert kw["_bank_terms_kernel"]["USE_PDL"] and kw["_bank_terms_kernel"]["launch_pdl"]
    assert kw["_main_kernel"]["TERMS_READY"] and not kw["_main_kernel"]["USE_PDL"]
    assert not kw["_main_kernel"]["launch_pdl"]
    names, kw = order(16, 0, lora=False)
    assert names == ["gluon", "_main_kernel"]
    assert not kw["gluon"]["FIRST"] and not kw["gluon"]["WAIT_PREVIOUS"]

    # A bank above 16 rows with the adapter kernels on the main stream, at a split whose
    # inputs the folded kernel's shrink divides (GATHER_FOLD): one Gluon kernel writing the
    # base's and t's partials (the Triton kernel may launch early), no shrink kernel, and
    # the Triton kernel adding both over the 2 splits. Without GATHER_FOLD, as above.
    calls = {}

    def _Args(name):  # records the grid and arguments too
        return _ArgsRecorder(calls, launches, name)

    monkeypatch.setattr(_gluon_fold, "_fold_kernel", _Args("fold"), raising=False)
    monkeypatch.setattr(_decode, "_main_kernel", _Args("_main_kernel"))
    monkeypatch.setitem(_decode.TUNED_FOLD, (256, 1024, 64), (64, 2, 3))
    names, kw = order(64, 4, side=False)
    assert names == ["fold", "_main_kernel"], names
    (fold_grid, fold_args), (_, main_args) = calls["fold"], calls["_main_kernel"]
    assert fold_grid == (256 // 2 // 64, 2)
    t = fold_args[8]  # the folded kernel's t is the one the Triton kernel reads
    assert t is main_args[4] and t.numel() == 2 * 64 * kw["fold"]["BLOCK_R"]
    assert fold_args[4] is main_args[12] and fold_args[4].numel() == 2 * 64 * 256  # partials
    assert kw["fold"]["LAUNCH_DEPENDENTS"] and kw["fold"]["P"] == 64 and kw["fold"]["STAGES"] == 3
    assert kw["_main_kernel"]["BASE_SPLITS"] == 2 and kw["_main_kernel"]["T_SPLITS"] == 2
    assert kw["_main_kernel"]["USE_PDL"] and kw["_main_kernel"]["launch_pdl"]
    assert kw["_main_kernel"]["GATHER_EARLY"] and not kw["_main_kernel"]["TERMS_READY"]
    monkeypatch.setattr(_decode, "GATHER_FOLD", False)
    names, _ = order(64, 4, side=False)
    assert names[:2] == ["_bank_shrink_kernel", "gluon"], names
    monkeypatch.setattr(_decode, "GATHER_FOLD", True)

    # One adapter (FOLD_ONE), above FINISH_ROWS rows: folded too, without an index (a bank
    # read through one at 16 rows passes it); at one row, or without FOLD_ONE, as above.
    monkeypatch.setattr(_decode, "FOLD_ONE", True)
    for rows, bank in ((16, 0), (5, 0), (16, 4), (64, 1)):
        monkeypatch.setitem(_decode.TUNED_FOLD_ONE, (256, 1024, rows), (64, 2, 3))
        names, kw = order(rows, bank)
        assert names == ["fold", "_main_kernel"], (rows, bank, names)
        (fold_grid, fold_args), (_, main_args) = calls["fold"], calls["_main_kernel"]
        assert fold_grid == (2, 2) and kw["fold"]["HAS_IDX"] == (bank > 0)
        t = fold_args[8]
        assert t is main_args[4] and t.numel() == 2 * rows * kw["fold"]["BLOCK_R"]
        assert kw["_main_kernel"]["T_SPLITS"] == 2 == kw["_main_kernel"]["BASE_SPLITS"]
        assert kw["_main_kernel"]["USE_PDL"] and not kw["_main_kernel"]["GATHER_EARLY"]
    monkeypatch.setitem(_decode.TUNED_FOLD_ONE, (256, 1024, 1), (64, 2, 3))
    names, _ = order(1, 0, first=True)  # one row finishes in the Gluon kernel: not folded
    assert names[:2] == ["_shrink_kernel", "gluon"], names
    monkeypatch.setattr(_decode, "FOLD_ONE", False)
    names, _ = order(16, 0)
    assert names == ["gluon", "_shrink_kernel", "_main_kernel"], names
    monkeypatch.setattr(_decode, "FOLD_ONE", True)
    monkeypatch.delitem(_decode.TUNED_FOLD_ONE, (256, 1024, 16))
    names, _ = order(16, 0)  # no entry: not folded
    assert names == ["gluon", "_shrink_kernel", "_main_kernel"], names

    # GATHER_SIDE 2 (the default): the second stream on layers with more outputs than
    # inputs only.
    monkeypatch.setattr(_decode, "GATHER_SIDE", 2)
    for in_f, out_f in ((256, 512), (512, 512), (512, 256)):
        monkeypatch.setitem(_decode.TUNED_GATHER, (out_f, in_f, 40), (64, 2, 8, 3))
        W_q, scale, zero = quant_tensors(_cpu_layer(in_f, out_f, 64, torch.bfloat16))
        A, B, s = torch.zeros(3, 8, in_f), torch.zeros(3, out_f, 8), torch.ones(3)
        launches.clear()
        _decode._launch(torch.zeros(40, in_f, dtype=torch.bfloat16), W_q, scale, zero,
                        [4, 2, 64, out_f, in_f], A, B, s, torch.arange(40) % 3, None, None, None,
                        None, torch.bfloat16)  # fmt: skip
        names = [name for name, _ in launches]
        assert ("_bank_terms_kernel" in names) == (out_f > in_f), (in_f, out_f, names)


WHOLE_SHRINK = textwrap.dedent(
    r"""
    import torch
    from hqqlora import _decode

    torch.manual_seed(0)
    # The whole-K shrink (a program per row and rank) over K in several steps, the last
    # one partial: one adapter (no index: every row reads A, (r, in)), then a bank read
    # through an index (-1 and a value past the bank give a zero row of t); the counters
    # zeroed; ranks past r left alone.
    rows, K, R, block_r = 3, 200, 5, 8
    x = torch.randn(rows, K, dtype=torch.float16)
    for bank in (0, 3):
        A = torch.randn(max(bank, 1), R, K)
        index = torch.tensor([2, -1, 3]) if bank else None
        t = torch.full((rows * block_r,), 7.0)
        counts = torch.ones(5, dtype=torch.int32)
        _decode._bank_shrink_kernel[(rows, R)](
            x, A if bank else A[0], index if bank else x, t, counts, 5, K, R,
            A.stride(0) if bank else 0, max(bank, 1), R_PER=1, BLOCK_R=block_r, BLOCK_K=64,
            USE_PDL=False, HAS_IDX=bool(bank),
        )
        t = t.view(rows, block_r)
        want = torch.zeros(rows, R, dtype=torch.float64)
        for i in range(rows):
            k = int(index[i]) if bank else 0
            if 0 <= k < max(bank, 1):
                want[i] = x[i].double() @ A[k].double().T
        err = (t[:, :R].double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), (bank, err)
        assert (t[:, R:] == 7.0).all() and (counts == 0).all(), bank
    """
)


# The shrink the tensor-core GEMV reads: t whole, one adapter or a bank through an index.
def test_whole_k_shrink_with_and_without_an_index_matches_float64():
    interpret(WHOLE_SHRINK)


# One row on the tensor-core GEMV (GEMV on, a TUNED_GEMV entry; recorded in process, nothing
# runs: its results are for the GPU tests): the whole-K shrink kernel first (a program per
# row and rank, t whole: one split of t for the finish to read), then the GEMV as its
# dependent launch, finishing the row itself with the adapter, DoRA, bias and index flags,
# reading the shrink kernel's t; no Triton kernel after it. Without the entry, with GEMV
# off, at a split of an odd step count, or above one row: the Gluon base kernel after the
# split shrink kernel, as before.
def test_one_row_takes_the_tensor_core_gemv_where_its_table_says(monkeypatch):
    import torch

    from hqqlora import _decode, _gluon, _gluon_gemv
    from hqqlora._base import quant_tensors

    calls, launches = {}, []

    def _Args(name):
        return _ArgsRecorder(calls, launches, name)

    for name in ("_main_kernel", "_shrink_kernel", "_bank_shrink_kernel"):
        monkeypatch.setattr(_decode, name, _Args(name))
    monkeypatch.setattr(_gluon, "_base_kernel", _Args("gluon"))
    monkeypatch.setattr(_gluon_gemv, "_gemv_kernel", _Args("gemv"), raising=False)
    monkeypatch.setattr(_gluon, "supported", lambda *a: True)
    monkeypatch.setattr(_decode, "PDL", True)
    monkeypatch.setattr(_decode, "GEMV", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    W_q, scale, zero = quant_tensors(_cpu_layer(1024, 256, 64, torch.bfloat16))
    meta = [4, 2, 64, 256, 1024]
    for rows in (1, 2):
        monkeypatch.setitem(_decode.TUNED_GLUON, (256, 1024, rows), (64, 4, 8, 3))
        monkeypatch.setitem(_decode.TUNED_GEMV, (256, 1024, rows), (32, 2, 4))

    def order(rows=1, lora=True, dora=False, bank=0):
        n = max(bank, 1)
        A, B, s = torch.zeros(n, 8, 1024), torch.zeros(n, 256, 8), torch.ones(n)
        mag = norm = torch.ones(n, 256) if dora else None
        index = torch.zeros(rows, dtype=torch.long) if bank else None
        if not bank:
            A, B, s = A[0], B[0], s[:1]
            mag, norm = (mag[0], norm[0]) if dora else (None, None)
        if not lora:
            A = B = s = None
        bias = torch.zeros(256, dtype=torch.bfloat16) if dora else None
        launches.clear()
        out = _decode._launch(torch.zeros(rows, 1024, dtype=torch.bfloat16), W_q, scale, zero,
                              meta, A, B, s, index, mag, norm, None, bias, torch.bfloat16)  # fmt: skip
        return [name for name, _ in launches], dict(launches), out

    names, kw, out = order()
    assert names == ["_bank_shrink_kernel", "gemv"], names
    (grid, args), (shrink_grid, shrink_args) = calls["gemv"], calls["_bank_shrink_kernel"]
    gemv, shrink = kw["gemv"], kw["_bank_shrink_kernel"]
    assert grid == (256 // 2 // 32, 2) and gemv["P"] == 32 and gemv["num_warps"] == 4
    assert gemv["SPLITS"] == 2 and gemv["FINISH"] and gemv["HAS_LORA"]
    assert gemv["WAIT_PREVIOUS"] and gemv["launch_pdl"]
    assert not (gemv["HAS_IDX"] or gemv["HAS_DORA"] or gemv["HAS_BIAS"])
    assert args[4].numel() == 2 * 1 * 256  # a partial a split
    # The shrink: a program per row and rank, all of K, the one adapter (no index, no
    # bank stride); t whole (one split: T_SPLITS 1 in the finish); it zeroes the counters.
    assert shrink_grid == (1, 8) and shrink["R_PER"] == 1 and shrink["USE_PDL"]
    assert not shrink["HAS_IDX"] and shrink_args[8] == 0 and shrink_args[3].numel() == 16
    assert shrink_args[6:8] == (1024, 8) and shrink_args[9] == 1  # K, rank; a bank of one
    assert gemv["T_SPLITS"] == 1 and args[6][10] == 1
    assert args[5] is shrink_args[4] and shrink_args[5] >= 256 // 2 // 32
    tail = args[6]
    assert tail[0] is shrink_args[3] and tail[8] is out  # its t; the output
    names, kw, _ = order(dora=True, bank=3)
    assert names == ["_bank_shrink_kernel", "gemv"], names
    assert kw["gemv"]["HAS_IDX"] and kw["gemv"]["HAS_DORA"] and kw["gemv"]["HAS_BIAS"]
    assert kw["_bank_shrink_kernel"]["HAS_IDX"]
    bank_args = calls["_bank_shrink_kernel"][1]
    assert bank_args[2] is calls["gemv"][1][6][2]  # the index, the finish's too
    assert bank_args[2].shape == (1,) and bank_args[2].dtype == torch.long
    assert bank_args[8] == 8 * 1024 and bank_args[9] == 3  # the bank's stride and size
    names, kw, _ = order(lora=False)
    assert names == ["gemv"] and not kw["gemv"]["WAIT_PREVIOUS"] and not kw["gemv"]["HAS_LORA"]
    names, _, _ = order(rows=2)
    assert "gemv" not in names and "gluon" in names, names
    monkeypatch.setitem(_decode.TUNED_GEMV, (256, 1024, 1), (32, 16, 4))  # one step a split
    names, _, _ = order()
    assert names == ["_shrink_kernel", "gluon"], names
    monkeypatch.setitem(_decode.TUNED_GEMV, (256, 1024, 1), (32, 2, 4))
    monkeypatch.setattr(_decode, "GEMV", False)
    names, _, _ = order()
    assert names == ["_shrink_kernel", "gluon"], names
    # Which launches it takes: at most 8 rows, packed rows and warps powers of two, packed
    # rows a multiple of 8 · warps dividing out/2, an even number of K steps a split.
    assert _gluon_gemv.fits(8, 256, 1024, 32, 2, 4) and _gluon_gemv.fits(1, 256, 1024, 8, 8, 1)
    assert not _gluon_gemv.fits(9, 256, 1024, 32, 2, 4)
    assert not _gluon_gemv.fits(1, 256, 1024, 16, 2, 4)
    assert not _gluon_gemv.fits(1, 256, 1024, 256, 2, 4)
    assert not _gluon_gemv.fits(1, 256, 1024, 32, 16, 4)
    assert not _gluon_gemv.fits(1, 256, 1024, 32, 3, 4)
    assert not _gluon_gemv.fits(1, 3072, 1024, 24, 2, 1)  # 24 packed rows: no power of two
    assert not _gluon_gemv.fits(1, 3072, 1024, 48, 2, 3)


# MODE 8's Triton half (the Gluon base kernel needs an H100): the base partials come from
# a stand-in writing float64-exact sums of each K split, and the Triton kernel must add
# them in its row blocks of 16 to the adapter terms, DoRA's norms, the bias and the NaN of
# an index outside the bank, for 1-64 rows and tiles of 8-128 outputs, with rows of
# several adapters (terms through ``lt`` up to 16 rows; above, from the bank's shrink and
# terms kernels, or each row's tile of B loaded before the wait after the bank's shrink
# kernel) and of one (terms kept in registers), one adapter without an index, and no
# adapter.
MODE8_EPILOGUE = textwrap.dedent(
    r"""
    import itertools
    import torch
    import hqqlora
    from hqqlora import _decode, _gluon, _gluon_fold
    from hqqlora._base import quant_layout, quant_tensors
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256)
    layer = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64, axis=1),
                      compute_dtype=torch.float16, device="cpu")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    W = hqqlora.dequantize(layer).double()
    seen = []

    def stand_in(x, W_q, scale, zero, meta, ws, counts, tail, *, block_p, split, warps, stages,
                 after_shrink, finish, before_shrink=False):
        assert finish is None  # one row finishes in the Gluon kernel: tested on the GPU
        part = ws.view(split, x.shape[0], meta[3])
        for s, ks in enumerate(torch.arange(meta[4]).chunk(split)):
            part[s] = (x.double()[:, ks] @ W[:, ks].T).float()
        seen.append(split)

    def fold_stand_in(x, W_q, scale, zero, meta, ws, lora_A, index, t, *, block_p, split,
                      stages, block_r, launch_dependents):
        # The folded kernel: the base's partials as above, and t's: each row's
        # x @ A[index[row]]ᵀ over a split (every row the one A without an index; 0 for
        # rows outside the bank).
        rows = x.shape[0]
        part, tp = ws.view(split, rows, meta[3]), t.view(split, rows, block_r)
        A3 = lora_A if lora_A.ndim == 3 else lora_A[None]
        ks_row = torch.zeros(rows, dtype=torch.long) if index is None else index.long()
        for s, ks in enumerate(torch.arange(meta[4]).chunk(split)):
            part[s] = (x.double()[:, ks] @ W[:, ks].T).float()
            tp[s] = 0
            for i, k in enumerate(ks_row.tolist()):
                if 0 <= k < A3.shape[0]:
                    tp[s, i, : A3.shape[1]] = (x[i, ks].double() @ A3[k][:, ks].double().T).float()
        seen.append(split)
        folded.append(rows)

    folded = []
    _gluon.supported = lambda *a: True
    _gluon.base_partials = stand_in
    _gluon_fold.fits = lambda *a: True  # the stand-in takes any split
    _gluon_fold.fold_partials = fold_stand_in
    _decode.FINISH_ROWS = 0  # the Triton kernel finishes every row count here
    n, r = 3, 8
    A, B = torch.randn(n, r, 512) * 0.05, torch.randn(n, 256, r) * 0.05
    s, is_dora = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([True, False, True])
    mag, norm = torch.rand(n, 256) + 0.5, torch.rand(n, 256) + 0.5
    # Rows of several adapters (above 16 rows each row's tile of B is loaded before the
    # wait, after the bank's own shrink kernel) and of one adapter (a bank of one, adapter
    # 2 of these).
    # Over a bank above 16 rows the terms come from a kernel of their own (GATHER_SIDE), or
    # from the Triton kernel after the Gluon kernel (the last case).
    cases = ((1, 2, 64, 5), (2, 1, 64, 5), (5, 2, 32, 5), (16, 4, 64, 5), (16, 2, 64, 1), (17, 4, 32, 1),
             (17, 8, 16, 1), (40, 8, 64, 1), (40, 2, 32, 1), (17, 4, 32, 5), (40, 8, 16, 5),
             (33, 2, 64, 5), (33, 2, 64, 5, False))
    for (rows, split, tile, kinds, *side), fold in itertools.product(cases, (False, True)):
        # Folded (GATHER_FOLD over a bank above 16 rows beside no second stream, FOLD_ONE
        # elsewhere), t's partials come from the folded kernel, a split each.
        _decode.GATHER_FOLD = _decode.FOLD_ONE = fold
        folded.clear()
        _decode.GATHER_SIDE = 1 if side == [] else 0
        # (TUNED_GATHER: a bank of several adapters above 16 rows)
        _decode.TUNED_GLUON[(256, 512, rows)] = (64, split, 8, 3, tile)
        _decode.TUNED_GATHER[(256, 512, rows)] = (64, split, 8, 3)
        _decode.TUNED_FOLD_ONE[(256, 512, rows)] = (64, split, 3)
        _decode.GATHER_BLOCK_P = tile
        x = torch.randn(rows, 512).half()
        if kinds == 5:  # -1, 0, 1, 2, 3 (past the bank: NaN): several adapters' terms
            index, kept = torch.arange(rows) % 5 - 1, slice(None)
        else:  # one adapter and rows of none: its terms kept in registers
            index, kept = torch.where(torch.arange(rows) % 3 == 0, -1, 0), slice(2, 3)
        with torch.no_grad():
            got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A[kept],
                                      lora_B=B[kept], scaling=s[kept], index=index,
                                      magnitude=mag[kept], weight_norm=norm[kept],
                                      is_dora=is_dora[kept], bias=layer.bias)
        assert seen[-1] == split, (rows, seen)
        assert bool(folded) == (fold and (rows <= 16 or kinds == 1 or side == [False])), rows
        for i in range(rows):
            k = int(index[i]) + (2 if kinds == 1 and index[i] >= 0 else 0)
            if k == 3:
                assert torch.isnan(got[i]).all(), (rows, i)
                continue
            ref = x[i].double() @ W.T
            if k >= 0:
                ref = ref + s[k].double() * (x[i].double() @ A[k].double().T) @ B[k].double().T
                if is_dora[k]:
                    ref = ref * (mag[k] / norm[k]).double()
            ref = ref + layer.bias.double()
            err = (got[i].double() - ref).abs().max().item()
            assert err <= 2**-10 * ref.abs().max().item(), (rows, i, k, err)
    _decode.GATHER_SIDE = 2
    _decode.GATHER_FOLD = _decode.FOLD_ONE = False

    # Banks above 16 rows, the launches recorded: rank 40 (64 slots: the Triton kernel's
    # tiles shrink to 8 outputs), rank 9 at 64 rows (the shrink's last rank slice is
    # partial), the shrink's K loop in several steps (BANK_SHRINK_FLOATS 256), the K-split
    # shrink's partials under the early loads (BANK_SHRINK_ROWS past 64), and rank 160
    # (past GATHER_MAX_RANK: the Triton modes).
    launches = []

    def spy(name):
        real = getattr(_decode, name)

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    launches.append((name, kw))
                    return real[grid](*args, **kw)
                return launch

        setattr(_decode, name, Spy())

    for name in ("_bank_shrink_kernel", "_bank_terms_kernel", "_shrink_kernel", "_main_kernel"):
        spy(name)
    _decode.GATHER_BLOCK_P = 16
    for rank, rows, floats, shrink_rows, tile, side in (
            (40, 17, 4096, 17, 4, True), (40, 40, 4096, 17, 4, True), (40, 40, 4096, 17, 4, False),
            (9, 64, 256, 17, 16, True), (9, 64, 256, 17, 16, False), (16, 33, 4096, 65, 16, True),
            (160, 20, 4096, 17, None, True)):
        _decode.BANK_SHRINK_FLOATS, _decode.BANK_SHRINK_ROWS = floats, shrink_rows
        _decode.GATHER_SIDE = int(side)
        _decode.TUNED_GATHER[(256, 512, rows)] = (64, 2, 8, 3)
        Ar, Br = torch.randn(n, rank, 512) * 0.05, torch.randn(n, 256, rank) * 0.05
        x = torch.randn(rows, 512).half()
        index = torch.arange(rows) % 5 - 1
        launches.clear()
        with torch.no_grad():
            got = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=Ar, lora_B=Br,
                                      scaling=s, index=index, bias=layer.bias)
        names = [name for name, _ in launches]
        main = launches[-1][1]
        if tile is None:  # the Triton modes
            assert main["MODE"] != 8 and "_shrink_kernel" in names, (rank, names)
        else:
            shrink = "_bank_shrink_kernel" if shrink_rows <= rows else "_shrink_kernel"
            assert shrink in names and main["GATHER_EARLY"], (rank, rows, names)
            assert main["MODE"] == 8 and main["BLOCK_P"] == tile, (rank, main["BLOCK_P"])
            # Beside the Gluon kernel (GATHER_SIDE, after the bank's shrink kernel only):
            # the terms in a kernel of their own, added by the Triton kernel.
            terms = side and shrink == "_bank_shrink_kernel"
            assert ("_bank_terms_kernel" in names) == terms == main["TERMS_READY"], names
            if shrink == "_bank_shrink_kernel":
                block_k = launches[names.index(shrink)][1]["BLOCK_K"]
                assert floats > 4096 // 2 or block_k < 512, block_k  # several K steps
        for i in range(rows):
            k = int(index[i])
            if k == 3:
                assert torch.isnan(got[i]).all(), (rows, i)
                continue
            ref = x[i].double() @ W.T + layer.bias.double()
            if k >= 0:
                ref = ref + s[k].double() * (x[i].double() @ Ar[k].double().T) @ Br[k].double().T
            err = (got[i].double() - ref).abs().max().item()
            assert err <= 2**-10 * ref.abs().max().item(), (rank, rows, i, k, err)
    _decode.BANK_SHRINK_FLOATS, _decode.BANK_SHRINK_ROWS, _decode.GATHER_SIDE = 4096, 17, 2

    # One adapter without an index (DoRA), and no adapter at all, at 1, 16 and 40 rows,
    # the shrink folded in (FOLD_ONE) or not.
    for (rows, split), fold in itertools.product(((1, 2), (16, 4), (40, 8)), (False, True)):
        _decode.FOLD_ONE = fold
        folded.clear()
        _decode.TUNED_GLUON[(256, 512, rows)] = (64, split, 8, 3)
        _decode.TUNED_FOLD_ONE[(256, 512, rows)] = (64, split, 3)
        x = torch.randn(rows, 512).half()
        W64 = x.double() @ W.T + layer.bias.double()
        with torch.no_grad():
            one = _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A[0], lora_B=B[0],
                                      scaling=s[:1], magnitude=mag[0], weight_norm=norm[0],
                                      bias=layer.bias)
            base = _decode.lora_decode(x, W_q, scale, zero, layout, bias=layer.bias)
        assert seen[-1] == split and folded == ([rows] if fold else []), (rows, folded)
        ref = (x.double() @ W.T + s[0].double() * (x.double() @ A[0].double().T)
               @ B[0].double().T) * (mag[0] / norm[0]).double() + layer.bias.double()
        for got, want in ((one, ref), (base, W64)):
            err = (got.double() - want).abs().max().item()
            assert err <= 2**-10 * want.abs().max().item(), (rows, err)
    """
)


def test_mode8_adds_the_gluon_partials_in_row_blocks():
    interpret(MODE8_EPILOGUE)
