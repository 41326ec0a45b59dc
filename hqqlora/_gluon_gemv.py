"""One row of 4-bit decode on Hopper's tensor cores without shared memory, written in Gluon:
``x @ dequantize(W)ᵀ`` for 1–8 rows of ``x``, partial sums per K split into a float32
workspace, the last split of each tile finishing the rows (adapter terms, DoRA, bias) as
:mod:`hqqlora._gluon`'s kernel does.

Why: at one row the Triton GEMV (``_decode`` MODE 4) does every weight's arithmetic on
CUDA cores (8.1 instructions a weight, compiled for sm_90), and :mod:`hqqlora._gluon`'s
kernel stages every K step through shared memory with ``cp.async`` and a barrier, for a
``wgmma`` of at least 64 outputs. Here, as in torch's tinygemm:

- ``mma.sync`` (m16n8k16) with the weights as operand A and ``x`` as operand B, both in
  registers: a warp takes 16 outputs a tile of the MMA (8 packed rows; a byte's high
  nibble is row ``r`` of the tile, its low nibble row ``r + 8``, as in
  :mod:`hqqlora._gluon`), one tile or more, and the 8 columns of B are up to 8 rows of ``x``.
- A thread loads its 16 codes of a step in one 16-byte load from global memory straight
  into the operand's registers (the K order permuted as in :mod:`hqqlora._gluon`), its 16
  values of ``x`` in the same order, and the zero and scale of its rows; no shared memory
  and no barrier in the K loop, which takes two steps an iteration (both steps' loads
  written first; compiled for sm_90, the second step's code load is issued after most of
  the first step's MMAs).
- HQQ's weights (``(q − z)`` rounded to the compute dtype, then ``· s`` rounded: MODE 7's
  arithmetic, two weights an instruction), float32 accumulation.

4-bit codes in groups of 64 along the input, fp16/bf16, compute capability 9.0
(:func:`hqqlora._gluon.supported`), at most 8 rows; per shape in ``_decode.TUNED_GEMV``,
where ``_decode.GEMV`` is on (as shipped). With an adapter, ``_decode`` launches it after
the whole-K shrink kernel, so the finish reads ``t`` whole: with ``t`` in splits, their sum
across threads (compiled for sm_90) held the finish's other loads back until ``t`` came,
one more trip to memory (an H100 measured 0.5–0.6 µs for the adapter against 1.2 µs
before, 4096², RESULTS.md, sixteenth pass).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hqqlora import _gluon

try:  # as in _gluon: Gluon ships with Triton 3.5 and later
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

MAX_ROWS = 8
"""Rows of ``x`` at most (the columns of one ``mma.sync``)."""


def fits(rows: int, n_out: int, k_in: int, block_p: int, split: int, warps: int) -> bool:
    """Whether :func:`gemv_partials` takes this launch: at most :data:`MAX_ROWS` rows,
    ``block_p`` packed rows a program and ``warps`` powers of two, ``block_p`` a multiple of
    ``8 · warps`` dividing ``out/2``, and ``split`` dividing K's steps of 64 into an even
    count each (and Gluon with ``mma_v2`` imported here)."""
    steps = k_in // _gluon.GROUP
    return (
        gluon is not None
        and rows <= MAX_ROWS
        and block_p & (block_p - 1) == 0
        and warps & (warps - 1) == 0
        and block_p % (8 * warps) == 0
        and (n_out // 2) % block_p == 0
        and steps % split == 0
        and (steps // split) % 2 == 0
    )


if gluon is not None:
    STEP_K = gl.constexpr(_gluon.GROUP)

    @gluon.constexpr_function
    def _mma_layout(num_warps):  # type: ignore[no-untyped-def]
        return gl.NVMMADistributedLayout(
            version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8]
        )

    @gluon.jit  # type: ignore[untyped-decorator]
    def _codes(packed_ptr, p0, step, K, P: gl.constexpr, num_warps: gl.constexpr):  # type: ignore[no-untyped-def]
        # The tile's codes of one step, (P packed rows, 64 bytes), a thread's 16 in one load.
        L: gl.constexpr = _gluon._codes_layout(P, num_warps, False)
        p = p0 + gl.arange(0, P, layout=gl.SliceLayout(1, L))
        k = step * STEP_K + gl.arange(0, STEP_K, layout=gl.SliceLayout(0, L))
        return gl.load(packed_ptr + p[:, None] * K + k[None, :])

    @gluon.jit  # type: ignore[untyped-decorator]
    def _x_operand(x_ptr, step, M, K, num_warps: gl.constexpr):  # type: ignore[no-untyped-def]
        # B[k, j] = x[j, byte(k)], byte(16c + 8h + 2q + e) = 16q + 4c + 2h + e: A's K
        # order (rows of x past M read as 0).
        dot_b: gl.constexpr = gl.DotOperandLayout(
            operand_index=1, parent=_mma_layout(num_warps), k_width=2
        )
        kk = gl.arange(0, STEP_K, layout=gl.SliceLayout(1, dot_b))
        j = gl.arange(0, 8, layout=gl.SliceLayout(0, dot_b))
        col = step * STEP_K + 16 * ((kk // 2) % 4) + 4 * (kk // 16) + 2 * ((kk // 8) % 2) + kk % 2
        return gl.load(x_ptr + j[None, :] * K + col[:, None], mask=(j < M)[None, :], other=0.0)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _weights(  # type: ignore[no-untyped-def]
        c, zh, sh, zl, sl, MAGIC2: gl.constexpr, OFFSET: gl.constexpr, P: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        # The codes already in registers, to mma.sync's operand A.
        dot_a: gl.constexpr = gl.DotOperandLayout(
            operand_index=0, parent=_mma_layout(num_warps), k_width=2
        )
        return _gluon._operand_a(c, zh, sh, zl, sl, MAGIC2, OFFSET, P, dot_a, num_warps)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _step(  # type: ignore[no-untyped-def]
        acc, x_ptr, packed_ptr, scale_ptr, zero_ptr, c, step, p0, half, groups, M, K,
        MAGIC2: gl.constexpr, OFFSET: gl.constexpr, P: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        xb = _x_operand(x_ptr, step, M, K, num_warps)
        zh, sh, zl, sl = _gluon._metas(scale_ptr, zero_ptr, p0, half, groups, step, P, num_warps)
        a = _weights(c, zh, sh, zl, sl, MAGIC2, OFFSET, P, num_warps)
        return mma_v2(a, xb, acc)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _gemv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, count_ptr, tail, M, N, K, steps_per_split,
        P: gl.constexpr, MAGIC2: gl.constexpr, OFFSET: gl.constexpr,
        WAIT_PREVIOUS: gl.constexpr, FINISH: gl.constexpr, SPLITS: gl.constexpr,
        ROWS: gl.constexpr, BLOCK_R: gl.constexpr, T_SPLITS: gl.constexpr,
        HAS_LORA: gl.constexpr, HAS_IDX: gl.constexpr, HAS_DORA: gl.constexpr,
        HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        if WAIT_PREVIOUS:
            _gluon._launch_dependents()
        tile = gl.program_id(0)
        split = gl.program_id(1)
        half = N // 2
        groups = K // STEP_K
        p0 = tile * P
        first = split * steps_per_split
        mma: gl.constexpr = _mma_layout(num_warps)
        acc = gl.zeros([2 * P, 8], gl.float32, layout=mma)
        for i in range(0, steps_per_split, 2):
            # Both steps' code loads written before either's arithmetic, nothing carried
            # into the next iteration: codes carried in registers cost a byte shuffle each
            # (66 PRMT a step against 8, offline for sm_90). (Compiled, the second load
            # still issues after most of the first step's MMAs.)
            c0 = _codes(packed_ptr, p0, first + i, K, P, num_warps)
            c1 = _codes(packed_ptr, p0, first + i + 1, K, P, num_warps)
            acc = _step(
                acc, x_ptr, packed_ptr, scale_ptr, zero_ptr, c0, first + i, p0, half, groups,
                M, K, MAGIC2, OFFSET, P, num_warps,
            )  # fmt: skip
            acc = _step(
                acc, x_ptr, packed_ptr, scale_ptr, zero_ptr, c1, first + i + 1, p0, half,
                groups, M, K, MAGIC2, OFFSET, P, num_warps,
            )  # fmt: skip
        # acc row a is output ((a // 8) % 2) · N/2 + p0 + 8 (a // 16) + a % 8; column j
        # is row j of x.
        a_row = gl.arange(0, 2 * P, layout=gl.SliceLayout(1, mma))
        n = ((a_row // 8) % 2) * half + p0 + 8 * (a_row // 16) + a_row % 8
        j = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
        gl.store(ws_ptr + (split * M + j[None, :]) * N + n[:, None], acc, mask=(j < M)[None, :])
        if WAIT_PREVIOUS:
            # Launched early beside the shrink kernel: its t and zeroed counters first.
            _gluon._wait_previous()
        if FINISH:
            _gluon._finish_last(
                count_ptr, tile, ws_ptr, tail, M, N, p0, half, P, SPLITS, ROWS, BLOCK_R,
                T_SPLITS, HAS_LORA, HAS_IDX, HAS_DORA, HAS_BIAS, num_warps,
            )  # fmt: skip


def gemv_partials(
    x: Tensor,
    W_q: Tensor,
    scale: Tensor,
    zero: Tensor,
    meta: list[int],
    ws: Tensor,
    counts: Tensor,
    tail: tuple[Any, ...],
    *,
    block_p: int,
    split: int,
    warps: int,
    after_shrink: bool,
    finish: dict[str, Any] | None,
) -> None:
    """Writes ``x @ dequantize(W)ᵀ`` over split ``s`` of K into ``ws[s]`` (``(split, rows,
    out)`` float32), ``block_p`` packed rows (``2·block_p`` outputs) a program of ``warps``
    warps; ``after_shrink`` and ``finish`` (``counts`` zeroed, one per tile; ``tail`` the
    adapter, index, DoRA, bias and output tensors and sizes) as
    :func:`hqqlora._gluon.base_partials` takes them. The caller checks
    :func:`hqqlora._gluon.supported`."""
    _, _, _, n_out, k_in = meta
    rows = x.shape[0]
    if not fits(rows, n_out, k_in, block_p, split, warps):
        raise ValueError(
            f"gemv_partials: expected at most {MAX_ROWS} rows, block_p and warps powers of two, "
            f"block_p a multiple of 8 · warps dividing out/2 and a split into an even number "
            f"of K steps; got {rows} "
            f"rows, block_p {block_p}, {warps} warps, split {split}, layer {n_out}x{k_in}"
        )
    if finish is not None and rows > 16:
        raise ValueError(f"gemv_partials: finish takes at most 16 rows, got {rows}")
    flags = dict(
        HAS_LORA=False, HAS_IDX=False, HAS_DORA=False, HAS_BIAS=False, BLOCK_R=16, T_SPLITS=1
    )
    flags.update(finish or {})
    magic2, offset = ("0x64006400", 1024.0) if x.dtype == torch.float16 else ("0x43004300", 128.0)
    steps = k_in // _gluon.GROUP
    _gemv_kernel[(n_out // 2 // block_p, split)](
        x, W_q, scale, zero, ws, counts, tail, rows, n_out, k_in, steps // split,
        P=block_p, MAGIC2=magic2, OFFSET=offset, WAIT_PREVIOUS=after_shrink,
        FINISH=finish is not None, SPLITS=split, ROWS=max(2, triton.next_power_of_2(rows)),
        num_warps=warps, launch_pdl=after_shrink, **flags,
    )  # fmt: skip
