"""A one-row base kernel on tensor cores without shared memory (a Gluon variant, not in the
library): ``x @ dequantize(W)ᵀ`` for 1–8 rows of ``x``, HQQ's 4-bit codes in groups of 64.

The fifteenth pass found the library's one-row GEMV (``_decode`` MODE 4) bound by its own
arithmetic on CUDA cores (8.1 instructions a weight), and torch's tinygemm 0.78× gemlite
at one token on tensor cores. This variant tries tinygemm's way on HQQ's own layout:

- ``mma.sync`` (``mma_v2``, m16n8k16) with the weights as operand A and ``x`` as operand B,
  both in registers: each warp takes 16 outputs (8 packed rows: a byte's high nibble is
  row ``r``, its low nibble row ``r + 8`` of the warp's block, as in ``hqqlora/_gluon.py``)
  and the 8 columns of B are up to 8 rows of ``x``.
- Each thread loads its 16 codes of a step in one 16-byte load straight from global memory
  into the operand's registers (the K order permuted as in ``hqqlora/_gluon.py``), and its
  16 values of ``x`` (the same permutation); no shared memory, no barriers in the K loop.
  The next step's codes, ``x``, zero and scale are loaded before this step's arithmetic.
- Weights as HQQ computes them (``(q − z)`` then ``· s``, each rounded to the compute
  dtype), float32 accumulation; K split across programs, the last split of each tile (a
  counter) adds the partials in split order and writes the output.

No adapter term, no bias: timing and error of the base term only, against the library's
base path, gemlite and tinygemm (``python benchmarks/variants/gemv_mma.py``, CUDA). The
library's ``hqqlora/_gluon_gemv.py`` is this kernel's two-step loop (``carry`` off) with
``_gluon``'s finish (adapter terms, DoRA, bias) and the dependent launch after the shrink
kernel.
"""

import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from hqqlora._gluon import _codes_layout, _metas, _nibble_asm

STEP_K = gl.constexpr(64)


@gluon.constexpr_function
def _mma2_layout(num_warps):
    return gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8]
    )


@gluon.jit
def _load_codes(packed_ptr, p0, step, K, P: gl.constexpr, num_warps: gl.constexpr):
    L: gl.constexpr = _codes_layout(P, num_warps, False)
    p = p0 + gl.arange(0, P, layout=gl.SliceLayout(1, L))
    k = step * STEP_K + gl.arange(0, STEP_K, layout=gl.SliceLayout(0, L))
    return gl.load(packed_ptr + p[:, None] * K + k[None, :])


@gluon.jit
def _load_x(x_ptr, step, M, K, num_warps: gl.constexpr):
    # B[k, j] = x[j, byte(k)] with byte(16c + 8h + 2q + e) = 16q + 4c + 2h + e (A's K order).
    dot_b: gl.constexpr = gl.DotOperandLayout(
        operand_index=1, parent=_mma2_layout(num_warps), k_width=2
    )
    kk = gl.arange(0, STEP_K, layout=gl.SliceLayout(1, dot_b))
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, dot_b))
    c = kk // 16
    h = (kk // 8) % 2
    q = (kk // 2) % 4
    e = kk % 2
    col = step * STEP_K + 16 * q + 4 * c + 2 * h + e
    return gl.load(x_ptr + j[None, :] * K + col[:, None], mask=(j < M)[None, :], other=0.0)


@gluon.jit
def _weights_from(c, zh, sh, zl, sl, MAGIC2: gl.constexpr, OFFSET: gl.constexpr,
                  P: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    dot_a: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=_mma2_layout(num_warps), k_width=2
    )
    c = gl.permute(gl.reshape(c, [P, 4, 4, 2, 2]), (0, 2, 3, 1, 4))
    c = gl.convert_layout(
        gl.reshape(c, [P, STEP_K]), _codes_layout(P, num_warps, True), assert_trivial=True
    )
    qh, ql = gl.inline_asm_elementwise(
        _nibble_asm(MAGIC2), "=r,=r,=r,=r,r", [c], dtype=(zh.dtype, zh.dtype), is_pure=True,
        pack=4,
    )  # fmt: skip
    wh = ((qh - OFFSET) - zh[:, None]) * sh[:, None]
    wl = ((ql - OFFSET) - zl[:, None]) * sl[:, None]
    a = gl.permute(gl.reshape(gl.join(wh, wl), [P // 8, 8, STEP_K, 2]), (0, 3, 1, 2))
    return gl.convert_layout(gl.reshape(a, [2 * P, STEP_K]), dot_a, assert_trivial=ASSERT_A)


ASSERT_A = gl.constexpr(True)


@gluon.jit
def _gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, count_ptr, out_ptr,
                 M, N, K, steps_per_split,
                 P: gl.constexpr, SPLITS: gl.constexpr, MAGIC2: gl.constexpr,
                 OFFSET: gl.constexpr, CARRY: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    tile = gl.program_id(0)
    split = gl.program_id(1)
    half = N // 2
    groups = K // STEP_K
    p0 = tile * P
    first = split * steps_per_split
    last = first + steps_per_split - 1
    mma: gl.constexpr = _mma2_layout(num_warps)
    acc = gl.zeros([2 * P, 8], gl.float32, layout=mma)
    if CARRY:
        # The next step's codes, x, zero and scale loaded before this step's arithmetic,
        # carried in registers into the next iteration.
        c = _load_codes(packed_ptr, p0, first, K, P, num_warps)
        xb = _load_x(x_ptr, first, M, K, num_warps)
        zh, sh, zl, sl = _metas(scale_ptr, zero_ptr, p0, half, groups, first, P, num_warps)
        for i in range(steps_per_split):
            nxt = gl.minimum(first + i + 1, last)
            c_n = _load_codes(packed_ptr, p0, nxt, K, P, num_warps)
            xb_n = _load_x(x_ptr, nxt, M, K, num_warps)
            zh_n, sh_n, zl_n, sl_n = _metas(
                scale_ptr, zero_ptr, p0, half, groups, nxt, P, num_warps
            )
            a = _weights_from(c, zh, sh, zl, sl, MAGIC2, OFFSET, P, num_warps)
            acc = mma_v2(a, xb, acc)
            c, xb, zh, sh, zl, sl = c_n, xb_n, zh_n, sh_n, zl_n, sl_n
    else:
        # Two steps an iteration, both loaded first; nothing carried (an even step count).
        for i in range(0, steps_per_split, 2):
            s0 = first + i
            c0 = _load_codes(packed_ptr, p0, s0, K, P, num_warps)
            c1 = _load_codes(packed_ptr, p0, s0 + 1, K, P, num_warps)
            x0 = _load_x(x_ptr, s0, M, K, num_warps)
            x1 = _load_x(x_ptr, s0 + 1, M, K, num_warps)
            zh0, sh0, zl0, sl0 = _metas(scale_ptr, zero_ptr, p0, half, groups, s0, P, num_warps)
            zh1, sh1, zl1, sl1 = _metas(scale_ptr, zero_ptr, p0, half, groups, s0 + 1, P, num_warps)
            acc = mma_v2(_weights_from(c0, zh0, sh0, zl0, sl0, MAGIC2, OFFSET, P, num_warps),
                         x0, acc)  # fmt: skip
            acc = mma_v2(_weights_from(c1, zh1, sh1, zl1, sl1, MAGIC2, OFFSET, P, num_warps),
                         x1, acc)  # fmt: skip
    # acc row a is output ((a // 8) % 2) · N/2 + p0 + 8 (a // 16) + a % 8; column j row j.
    a_row = gl.arange(0, 2 * P, layout=gl.SliceLayout(1, mma))
    n = ((a_row // 8) % 2) * half + p0 + 8 * (a_row // 16) + a_row % 8
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    ok = (j < M)[None, :]
    if SPLITS == 1:
        gl.store(out_ptr + j[None, :] * N + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        gl.store(ws_ptr + (split * M + j[None, :]) * N + n[:, None], acc, mask=ok)
        gl.thread_barrier()
        done = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == SPLITS - 1:
            total = gl.zeros([2 * P, 8], gl.float32, layout=mma)
            for s_i in gl.static_range(SPLITS):
                total += gl.load(
                    ws_ptr + (s_i * M + j[None, :]) * N + n[:, None], mask=ok, other=0.0,
                    cache_modifier=".cg",
                )  # fmt: skip
            gl.store(
                out_ptr + j[None, :] * N + n[:, None], total.to(out_ptr.dtype.element_ty),
                mask=ok,
            )  # fmt: skip


def launch_args(x, W_q, scale, zero, n_out, k_in, *, block_p, split, warps, carry=False):
    """(grid, args, kwargs) of one call, and the output and workspace it writes."""
    rows = x.shape[0]
    steps = k_in // 64
    bad_steps = steps % split or (not carry and (steps // split) % 2)
    if rows > 8 or bad_steps or (n_out // 2) % block_p or block_p % (8 * warps):
        raise ValueError(f"gemv_mma: unsupported {rows=} {split=} {block_p=} {warps=}")
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    ws = torch.empty(split * rows * n_out, dtype=torch.float32, device=x.device)
    counts = torch.zeros(n_out // 2 // block_p, dtype=torch.int32, device=x.device)
    magic2, offset = ("0x64006400", 1024.0) if x.dtype == torch.float16 else ("0x43004300", 128.0)
    grid = (n_out // 2 // block_p, split)
    args = (x, W_q, scale, zero, ws, counts, out, rows, n_out, k_in, steps // split)
    kwargs = dict(
        P=block_p, SPLITS=split, MAGIC2=magic2, OFFSET=offset, CARRY=carry, num_warps=warps
    )
    return grid, args, kwargs, out


def gemv(x, W_q, scale, zero, n_out, k_in, config):
    block_p, split, warps, carry = config
    grid, args, kwargs, out = launch_args(
        x, W_q, scale, zero, n_out, k_in, block_p=block_p, split=split, warps=warps, carry=carry
    )
    _gemv_kernel[grid](*args, **kwargs)
    return out


def main():
    import triton.testing
    from anchors_decode import tinygemm_of
    from bench_decode import gemlite_of
    from common import environment, make_hqq_layer

    import hqqlora
    from hqqlora._base import quant_tensors

    print(environment("cuda"))
    print("graph µs (do_bench_cudagraph, rep 50); the best launches then in turn, 3 rounds\n")
    cells = [((4096, 4096), 1), ((14336, 4096), 1), ((1024, 4096), 1), ((4096, 4096), 8)]
    for (n_out, k_in), rows in cells:
        torch.manual_seed(0)
        layer = make_hqq_layer(k_in, n_out, device="cuda")
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        x = torch.randn(rows, k_in, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ W.T
        results = []
        for warps in (1, 2, 4):
            for block_p in (8 * warps, 16 * warps):
                for split, carry in itertools.product((2, 4, 8, 16), (False, True)):
                    if carry and block_p != 8 * warps:
                        continue
                    programs = n_out // 2 // block_p * split
                    steps = k_in // 64 // split if (k_in // 64) % split == 0 else 1
                    if (k_in // 64) % split or not 128 <= programs <= 4096 or steps < 2:
                        continue
                    cfg = (block_p, split, warps, carry)
                    try:
                        y = gemv(x, W_q, scale, zero, n_out, k_in, cfg)
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        us = 1e3 * triton.testing.do_bench_cudagraph(
                            lambda cfg=cfg: gemv(x, W_q, scale, zero, n_out, k_in, cfg),
                            rep=20, return_mode="median",
                        )  # fmt: skip
                    except Exception as exc:
                        print(f"{cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    results.append((us, cfg, err))
        results.sort()
        for us, cfg, err in results[:4]:
            print(f"{n_out}x{k_in} rows {rows} {cfg}: {us:.2f} µs err {err:.2e}")
        if not results:
            continue
        calls = {f"mma {cfg}": (lambda cfg=cfg: gemv(x, W_q, scale, zero, n_out, k_in, cfg))
                 for _, cfg, _ in results[:2]}  # fmt: skip
        calls["library base"] = lambda: hqqlora.base_forward(layer, x)
        gl_ = gemlite_of(layer) if rows == 1 else None
        if gl_ is not None:
            calls["gemlite"] = lambda: gl_(x)
        tiny = tinygemm_of(layer)
        if tiny is not None:
            calls["tinygemm"] = lambda: tiny(x)
        times = {k: [] for k in calls}
        for _ in range(3):
            for k, fn in calls.items():
                times[k].append(1e3 * triton.testing.do_bench_cudagraph(fn, rep=50))
        for k, fn in calls.items():
            err = ((fn().double().reshape(ref.shape) - ref).norm() / ref.norm()).item()
            ts = times[k]
            print(f"  {k}: {statistics.median(ts):.2f} ({min(ts):.2f}–{max(ts):.2f}) "
                  f"err {err:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
