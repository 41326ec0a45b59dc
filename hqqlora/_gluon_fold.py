"""MODE 8 with the adapters' shrink folded into the Gluon base kernel, as partitions of one
warp-specialized kernel: over a bank of several adapters (``_decode.GATHER_FOLD``), and
for one adapter where ``_decode.TUNED_FOLD_ONE`` names the shape (``_decode.FOLD_ONE``).

The bank's own shrink kernel (``_decode_kernels._bank_shrink_kernel``) and the Gluon base
kernel, run one beside the other, share the SMs: on an H100 the base kernel's K loop took
twice its time beside it (4096² at 64 rows over 64 float32 adapters: 10.6 µs alone, 21
beside). Here each program of the base kernel has three partitions:

- the default partition (one warpgroup): the base term, as :mod:`hqqlora._gluon`'s kernel
  computes it (the same weights, dequantization and ``wgmma``s, in the same order: the
  same partials, bit for bit), waiting on an mbarrier per shared-memory slot instead of
  a barrier of the whole program;
- a producer (``PWARPS`` warps): ``cp.async`` of ``x`` and the codes into the slots, each
  slot's copies signalled through its ``ready`` mbarrier, refilled when the default
  partition releases it (``empty``);
- a shrink (``SWARPS`` warps): for the rows of this program's tile (rows are dealt out to
  tiles), ``t[split, row] = x[row, K_split] @ A[k_row, :, K_split]ᵀ`` in float32 over
  this program's split of K, two steps of ``A`` in flight. Rows whose index is outside
  the bank read no ``A`` and get ``0 · x`` (0, or NaN where their ``x`` is not finite);
  the Triton kernel after it never reads them (it gives those rows no term, or NaN).
  Without an index (one adapter, ``_decode.FOLD_ONE``) every row reads the one ``A``.

The Triton kernel after it (``_main_kernel``, MODE 8; with ``GATHER_EARLY`` over a bank
above 16 rows) adds ``t``'s partials in split order, the partials of the base term in
split order, and the terms.
Only where :func:`supported` says so (the Gluon kernel's conditions, a rank of at most
32, 32 or 64 packed rows a program, a split of K that the shrink's steps divide) and
``_decode`` finds ``x`` and each adapter's ``A`` contiguous; elsewhere the two kernels as
before.
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
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

PWARPS = 4
"""Warps of the producer partition."""

PREGS = 48
"""Registers a thread of the producer partition."""

SWARPS = 4
"""Warps of the shrink partition."""

SREGS = 128
"""Registers a thread of the shrink partition."""

MAXNREG = 128
"""Registers a thread at most over the program (the default partition gets what the other
two leave, up to 256)."""

SHRINK_FLOATS = 4096
"""Floats of ``A`` a step of the shrink partition loads (rank × inputs; two steps in flight)."""

MAX_RANK = 32
"""Padded rank at most that the shrink partition takes."""


def shrink_inputs(block_r: int) -> int:
    """Inputs of ``A`` a step of the shrink partition loads at padded rank ``block_r``."""
    return max(128, SHRINK_FLOATS // block_r)


def fits(meta: list[int], block_r: int, split: int, block_p: int) -> bool:
    """Whether the folded kernel takes a launch that the Gluon base kernel takes: a padded
    rank of at most :data:`MAX_RANK`, one warpgroup's packed rows (32 or 64), and a split
    of K whose inputs the shrink's two steps divide."""
    k_in = meta[4]
    return (
        block_r <= MAX_RANK
        and block_p in (32, 64)
        and k_in % split == 0
        and (k_in // split) % (2 * shrink_inputs(block_r)) == 0
    )


def supported(
    x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, meta: list[int], block_r: int,
    split: int, block_p: int,
) -> bool:  # fmt: skip
    """Whether :func:`fold_partials` takes this call: :func:`_gluon.supported` and
    :func:`fits`."""
    return _gluon.supported(x, W_q, scale, zero, meta) and fits(meta, block_r, split, block_p)


if gluon is not None:
    STEP_K = gl.constexpr(_gluon.GROUP)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _producer(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr, idx_ptr, t_ptr, x_raw,
        x_smem, c_smem, ready, empty, tile, split, p0, half, groups, first, steps, M, N, K, R,
        stride_a_bank, n_bank, rows_per_tile,
        BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, MAGIC2: gl.constexpr,
        OFFSET: gl.constexpr, PW: gl.constexpr, SW: gl.constexpr, BLOCK_R: gl.constexpr,
        CH: gl.constexpr, HAS_IDX: gl.constexpr,
    ):  # fmt: skip
        # The slots in turn: wait until the default partition has released one, then
        # cp.async a step of x (in the MMA's K order, rows past M as 0) and of the codes;
        # the slot's ``ready`` completes when every thread's copies have landed.
        xl: gl.constexpr = _gluon._rows_layout(STEP_K // 2, 1, PW)
        cl: gl.constexpr = _gluon._rows_layout(STEP_K, 16, PW)
        m = gl.arange(0, BM, layout=gl.SliceLayout(1, xl))
        t = gl.arange(0, STEP_K // 2, layout=gl.SliceLayout(0, xl))  # pair 8c + 4h + q
        pair = 8 * (t % 4) + 2 * (t // 8) + (t // 4) % 2
        x_rows = x_ptr + m[:, None] * (K // 2) + pair[None, :]
        m_ok = (m < M)[:, None]
        p = p0 + gl.arange(0, P, layout=gl.SliceLayout(1, cl))
        k = gl.arange(0, STEP_K, layout=gl.SliceLayout(0, cl))
        c_rows = packed_ptr + p[:, None] * K + k[None, :]
        for i in range(steps):
            slot = i % STAGES
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            step = first + i
            cp.async_copy_global_to_shared(
                x_raw.index(slot), x_rows + step * (STEP_K // 2), mask=m_ok
            )
            cp.async_copy_global_to_shared(c_smem.index(slot), c_rows + step * STEP_K)
            cp.mbarrier_arrive(ready.index(slot), increment_count=False)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _shrinker(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr, idx_ptr, t_ptr, x_raw,
        x_smem, c_smem, ready, empty, tile, split, p0, half, groups, first, steps, M, N, K, R,
        stride_a_bank, n_bank, rows_per_tile,
        BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, MAGIC2: gl.constexpr,
        OFFSET: gl.constexpr, PW: gl.constexpr, SW: gl.constexpr, BLOCK_R: gl.constexpr,
        CH: gl.constexpr, HAS_IDX: gl.constexpr,
    ):  # fmt: skip
        # t[split, row] for rows tile·rows_per_tile .. + rows_per_tile: this split's inputs
        # of the row's adapter's A, CH at a time, two steps' loads issued before their sums.
        L: gl.constexpr = gl.BlockedLayout([BLOCK_R // 4, 4], [1, 32], [4, SW // 4], [1, 0])
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, L))
        kk = gl.arange(0, CH, layout=gl.SliceLayout(0, L))
        r_ok = r < R
        k_lo = first * STEP_K
        k_hi = k_lo + steps * STEP_K
        for j in range(rows_per_tile):
            row = tile * rows_per_tile + j
            if row < M:
                if HAS_IDX:  # noqa: SIM108 - Gluon wants a plain branch on a constexpr
                    k_row = gl.load(idx_ptr + row)
                else:  # one adapter: every row reads it
                    k_row = 0
                valid = (k_row >= 0) & (k_row < n_bank)
                a_rows = (
                    a_ptr + gl.where(valid, k_row, 0).to(gl.int64) * stride_a_bank
                    + r[:, None] * K + kk[None, :]
                )  # fmt: skip
                a_ok = (r_ok & valid)[:, None]
                x_row = xs_ptr + row * K + kk
                tsum = gl.zeros([BLOCK_R], gl.float32, layout=gl.SliceLayout(1, L))
                for c0 in range(k_lo, k_hi, 2 * CH):
                    a0 = gl.load(a_rows + c0, mask=a_ok, other=0.0).to(gl.float32)
                    a1 = gl.load(a_rows + (c0 + CH), mask=a_ok, other=0.0).to(gl.float32)
                    x0 = gl.load(x_row + c0).to(gl.float32)
                    x1 = gl.load(x_row + (c0 + CH)).to(gl.float32)
                    tsum += gl.sum(a0 * x0[None, :], axis=1) + gl.sum(a1 * x1[None, :], axis=1)
                gl.store(t_ptr + (split * M + row) * BLOCK_R + r, tsum)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _consumer(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr, idx_ptr, t_ptr, x_raw,
        x_smem, c_smem, ready, empty, tile, split, p0, half, groups, first, steps, M, N, K, R,
        stride_a_bank, n_bank, rows_per_tile,
        BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, MAGIC2: gl.constexpr,
        OFFSET: gl.constexpr, PW: gl.constexpr, SW: gl.constexpr, BLOCK_R: gl.constexpr,
        CH: gl.constexpr, HAS_IDX: gl.constexpr,
    ):  # fmt: skip
        # The base term of this split, one warpgroup: _gluon._base_kernel's K loop with
        # an mbarrier wait and release per slot; zero and scale two steps ahead.
        num_warps: gl.constexpr = 4
        mma: gl.constexpr = _gluon._mma_layout(BM, num_warps)
        last = first + steps - 1
        zh, sh, zl, sl = _gluon._metas(scale_ptr, zero_ptr, p0, half, groups, first, P, num_warps)
        second = gl.minimum(first + 1, last)
        nzh, nsh, nzl, nsl = _gluon._metas(
            scale_ptr, zero_ptr, p0, half, groups, second, P, num_warps
        )
        acc = gl.zeros([2 * P, BM], gl.float32, layout=mma)
        for i in range(steps):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            # cp.async wrote the slot through the generic proxy; the wgmma reads x through
            # the async one.
            fence_async_shared()
            a = _gluon._weights(c_smem, slot, zh, sh, zl, sl, MAGIC2, OFFSET, P, BM, num_warps)
            zh, sh, zl, sl = nzh, nsh, nzl, nsl
            ahead = gl.minimum(first + i + 2, last)
            nzh, nsh, nzl, nsl = _gluon._metas(
                scale_ptr, zero_ptr, p0, half, groups, ahead, P, num_warps
            )
            acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            # (The arrive waits for the whole warpgroup: Gluon puts a barrier of the
            # partition before it.)
            mbarrier.arrive(empty.index(slot), count=1)
        _gluon._store_partials(ws_ptr, acc, split, M, N, p0, half, P, BM, num_warps)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _fold_kernel(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr, idx_ptr, t_ptr,
        M, N, K, steps_per_split, R, stride_a_bank, n_bank, rows_per_tile,
        BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, MAGIC2: gl.constexpr,
        OFFSET: gl.constexpr, PW: gl.constexpr, PR: gl.constexpr, SW: gl.constexpr,
        SR: gl.constexpr, BLOCK_R: gl.constexpr, CH: gl.constexpr, HAS_IDX: gl.constexpr,
        LAUNCH_DEPENDENTS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        if LAUNCH_DEPENDENTS:
            # The Triton kernel after this one may launch now: it loads B, then waits.
            _gluon._launch_dependents()
        dt: gl.constexpr = scale_ptr.dtype.element_ty
        tile = gl.program_id(0)
        split = gl.program_id(1)
        half = N // 2
        groups = K // STEP_K
        p0 = tile * P
        first = split * steps_per_split
        x_raw, x_smem, c_smem = _gluon._slots(dt, BM, P, STAGES)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=32 * PW)  # every producer thread arrives
            mbarrier.init(empty.index(s), count=1)
        # (Each partition's arguments written out: a tuple made first would turn the
        # constexprs into tensors.)
        gl.warp_specialize(
            [
                (_consumer, (x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr,
                             idx_ptr, t_ptr, x_raw, x_smem, c_smem, ready, empty, tile, split,
                             p0, half, groups, first, steps_per_split, M, N, K, R,
                             stride_a_bank, n_bank, rows_per_tile, BM, P, STAGES, MAGIC2,
                             OFFSET, PW, SW, BLOCK_R, CH, HAS_IDX)),
                (_producer, (x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr,
                             idx_ptr, t_ptr, x_raw, x_smem, c_smem, ready, empty, tile, split,
                             p0, half, groups, first, steps_per_split, M, N, K, R,
                             stride_a_bank, n_bank, rows_per_tile, BM, P, STAGES, MAGIC2,
                             OFFSET, PW, SW, BLOCK_R, CH, HAS_IDX)),
                (_shrinker, (x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, xs_ptr, a_ptr,
                             idx_ptr, t_ptr, x_raw, x_smem, c_smem, ready, empty, tile, split,
                             p0, half, groups, first, steps_per_split, M, N, K, R,
                             stride_a_bank, n_bank, rows_per_tile, BM, P, STAGES, MAGIC2,
                             OFFSET, PW, SW, BLOCK_R, CH, HAS_IDX)),
            ],
            [PW, SW],
            [PR, SR],
        )  # fmt: skip


def fold_partials(
    x: Tensor,
    W_q: Tensor,
    scale: Tensor,
    zero: Tensor,
    meta: list[int],
    ws: Tensor,
    lora_A: Tensor,
    index: Tensor | None,
    t: Tensor,
    *,
    block_p: int,
    split: int,
    stages: int,
    block_r: int,
    launch_dependents: bool,
) -> None:
    """Writes the base term over split ``s`` of K into ``ws[s]`` (``(split, rows, out)``
    float32), as :func:`_gluon.base_partials` does (the same bits), and ``t[s]`` (``(split,
    rows, block_r)`` float32): each row's ``x @ A[index[row]]ᵀ`` over that split (``0 · x``
    for rows whose index is outside the bank). ``lora_A`` is the bank, ``(bank, rank, in)``,
    read through ``index``, or one adapter's ``(rank, in)`` that every row reads (``index``
    ``None``); each ``A[k]`` and ``x`` in contiguous rows.
    ``launch_dependents``: the next kernel (a programmatic dependent launch) may start
    early. The caller checks :func:`supported`."""
    _, _, _, n_out, k_in = meta
    rows = x.shape[0]
    steps = k_in // _gluon.GROUP
    tiles = n_out // 2 // block_p
    if not supported(x, W_q, scale, zero, meta, block_r, split, block_p):
        raise ValueError(
            f"fold_partials: this call is not one it takes (block_p {block_p}, split {split}, "
            f"padded rank {block_r}, layer {n_out}x{k_in})"
        )
    magic2, offset = ("0x64006400", 1024.0) if x.dtype == torch.float16 else ("0x43004300", 128.0)
    bank = lora_A.ndim == 3
    args: tuple[Any, ...] = (
        x.view(torch.int32), W_q, scale, zero, ws, x, lora_A, x if index is None else index, t,
        rows, n_out, k_in, steps // split, lora_A.shape[-2], lora_A.stride(0) if bank else 0,
        lora_A.shape[0] if bank else 1, -(-rows // tiles),
    )  # fmt: skip
    _fold_kernel[(tiles, split)](
        *args, BM=max(8, triton.next_power_of_2(rows)), P=block_p, STAGES=stages,
        MAGIC2=magic2, OFFSET=offset, PW=PWARPS, PR=PREGS, SW=SWARPS, SR=SREGS,
        BLOCK_R=block_r, CH=shrink_inputs(block_r), HAS_IDX=index is not None,
        LAUNCH_DEPENDENTS=launch_dependents,
        num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
