"""Variant of hqqlora/_gluon.py for benchmarks/ab_gluon.py: the base kernel warp-specialized.

A producer partition (PWARPS warps) streams x and the codes into STAGES shared-memory
slots with cp.async, each slot signalled through an mbarrier (``ready``); the default
partition (the kernel's warps) waits on ``ready``, dequantizes, runs the wgmma and
releases the slot (``empty``). No CTA-wide barrier in the K loop. Rows that the Gluon
kernel finishes itself (``finish``) keep the library's kernel.
"""

from __future__ import annotations

import torch
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

from hqqlora import _gluon
from hqqlora._gluon import GROUP, _meta, _mma_layout, _rows_layout, _weights

_LIBRARY = _gluon.base_partials
STEP_K = gl.constexpr(GROUP)

PWARPS = 4
"""Warps of the producer partition."""
PREGS = 48
"""Registers a thread of the producer partition."""
MAXNREG = 128
"""The kernel's register cap (the default partition gets what the producer leaves)."""
FENCE = True
"""Whether the consumer fences the async proxy after each slot's wait."""
STAGES_PLUS = 0
"""Stages added to the launch's."""
KNOCKOUT = 0
"""Timing only (results wrong): 1 no x copies, 2 no code copies, 4 no dequantization (a
constant operand), 16 zero and scale of the first step throughout."""
PAIRS = False
"""Two steps a round in the consumer (steps even, ROTATE 0)."""
ROTATE = 0
"""1: program of tile j takes its split's steps from step j mod steps (spreads the tiles'
reads of x over the split's steps, rather than every tile reading the same x at once)."""


@gluon.jit
def _producer(
    x_ptr, packed_ptr, x_raw, c_smem, ready, empty, p0, M, K, first, steps, rot,
    BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, PW: gl.constexpr,
    KO: gl.constexpr,
):  # fmt: skip
    xl: gl.constexpr = _rows_layout(STEP_K // 2, 1, PW)
    cl: gl.constexpr = _rows_layout(STEP_K, 16, PW)
    m = gl.arange(0, BM, layout=gl.SliceLayout(1, xl))
    t = gl.arange(0, STEP_K // 2, layout=gl.SliceLayout(0, xl))
    pair = 8 * (t % 4) + 2 * (t // 8) + (t // 4) % 2
    x_rows = x_ptr + m[:, None] * (K // 2) + pair[None, :]
    m_ok = (m < M)[:, None]
    p = p0 + gl.arange(0, P, layout=gl.SliceLayout(1, cl))
    k = gl.arange(0, STEP_K, layout=gl.SliceLayout(0, cl))
    c_rows = packed_ptr + p[:, None] * K + k[None, :]
    for i in range(steps):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        step = first + (i + rot) % steps
        if KO & 1 == 0:
            cp.async_copy_global_to_shared(
                x_raw.index(slot), x_rows + step * (STEP_K // 2), mask=m_ok
            )
        if KO & 2 == 0:
            cp.async_copy_global_to_shared(c_smem.index(slot), c_rows + step * STEP_K)
        cp.mbarrier_arrive(ready.index(slot), increment_count=False)


@gluon.jit
def _consumer(
    scale_ptr, zero_ptr, ws_ptr, x_smem, c_smem, ready, empty, p0, half, groups, first, last,
    steps, split, rot, M, N, BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr,
    MAGIC2: gl.constexpr, OFFSET: gl.constexpr, DO_FENCE: gl.constexpr, KO: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    mma: gl.constexpr = _mma_layout(BM, num_warps)
    step0 = first + rot % steps
    zh, sh = _meta(scale_ptr, zero_ptr, p0, groups, step0, P, num_warps)
    zl, sl = _meta(scale_ptr, zero_ptr, half + p0, groups, step0, P, num_warps)
    second = first + (1 + rot) % steps
    nzh, nsh = _meta(scale_ptr, zero_ptr, p0, groups, second, P, num_warps)
    nzl, nsl = _meta(scale_ptr, zero_ptr, half + p0, groups, second, P, num_warps)
    acc = gl.zeros([2 * P, BM], gl.float32, layout=mma)
    for i in range(steps):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        if DO_FENCE:
            fence_async_shared()
        if KO & 4:
            a = gl.full(
                [2 * P, STEP_K], 1.0, scale_ptr.dtype.element_ty,
                gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
            )  # fmt: skip
        else:
            a = _weights(c_smem, slot, zh, sh, zl, sl, MAGIC2, OFFSET, P, BM, num_warps)
        if KO & 16 == 0:
            zh, sh, zl, sl = nzh, nsh, nzl, nsl
            ahead = first + (i + 2 + rot) % steps
            nzh, nsh = _meta(scale_ptr, zero_ptr, p0, groups, ahead, P, num_warps)
            nzl, nsl = _meta(scale_ptr, zero_ptr, half + p0, groups, ahead, P, num_warps)
        acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        if num_warps > 4:
            gl.thread_barrier()
        mbarrier.arrive(empty.index(slot), count=1)
    a_row = gl.arange(0, 2 * P, layout=gl.SliceLayout(1, mma))
    n = ((a_row // 8) % 2) * half + p0 + 8 * (a_row // 16) + a_row % 8
    m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    gl.store(ws_ptr + (split * M + m[None, :]) * N + n[:, None], acc, mask=(m < M)[None, :])


@gluon.jit
def _consumer2(
    scale_ptr, zero_ptr, ws_ptr, x_smem, c_smem, ready, empty, p0, half, groups, first, last,
    steps, split, rot, M, N, BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr,
    MAGIC2: gl.constexpr, OFFSET: gl.constexpr, DO_FENCE: gl.constexpr, KO: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    # Two steps a round: the first step's MMA runs while the second step is dequantized;
    # one wait a round. Both operands stay live until it (``deps``), so the second's
    # weights take other registers. ``steps`` even.
    mma: gl.constexpr = _mma_layout(BM, num_warps)
    last = first + steps - 1
    z0h, s0h = _meta(scale_ptr, zero_ptr, p0, groups, first, P, num_warps)
    z0l, s0l = _meta(scale_ptr, zero_ptr, half + p0, groups, first, P, num_warps)
    z1h, s1h = _meta(scale_ptr, zero_ptr, p0, groups, first + 1, P, num_warps)
    z1l, s1l = _meta(scale_ptr, zero_ptr, half + p0, groups, first + 1, P, num_warps)
    n0 = gl.minimum(first + 2, last)
    n1 = gl.minimum(first + 3, last)
    y0h, t0h = _meta(scale_ptr, zero_ptr, p0, groups, n0, P, num_warps)
    y0l, t0l = _meta(scale_ptr, zero_ptr, half + p0, groups, n0, P, num_warps)
    y1h, t1h = _meta(scale_ptr, zero_ptr, p0, groups, n1, P, num_warps)
    y1l, t1l = _meta(scale_ptr, zero_ptr, half + p0, groups, n1, P, num_warps)
    acc = gl.zeros([2 * P, BM], gl.float32, layout=mma)
    for j in range(steps // 2):
        i = 2 * j
        sa = i % STAGES
        sb = (i + 1) % STAGES
        mbarrier.wait(ready.index(sa), (i // STAGES) & 1)
        if DO_FENCE:
            fence_async_shared()
        a0 = _weights(c_smem, sa, z0h, s0h, z0l, s0l, MAGIC2, OFFSET, P, BM, num_warps)
        acc = warpgroup_mma(a0, x_smem.index(sa).permute((1, 0)), acc, is_async=True)
        mbarrier.wait(ready.index(sb), ((i + 1) // STAGES) & 1)
        if DO_FENCE:
            fence_async_shared()
        a1 = _weights(c_smem, sb, z1h, s1h, z1l, s1l, MAGIC2, OFFSET, P, BM, num_warps)
        acc = warpgroup_mma(a1, x_smem.index(sb).permute((1, 0)), acc, is_async=True)
        z0h, s0h, z0l, s0l = y0h, t0h, y0l, t0l
        z1h, s1h, z1l, s1l = y1h, t1h, y1l, t1l
        n0 = gl.minimum(first + i + 4, last)
        n1 = gl.minimum(first + i + 5, last)
        y0h, t0h = _meta(scale_ptr, zero_ptr, p0, groups, n0, P, num_warps)
        y0l, t0l = _meta(scale_ptr, zero_ptr, half + p0, groups, n0, P, num_warps)
        y1h, t1h = _meta(scale_ptr, zero_ptr, p0, groups, n1, P, num_warps)
        y1l, t1l = _meta(scale_ptr, zero_ptr, half + p0, groups, n1, P, num_warps)
        acc, a0, a1 = warpgroup_mma_wait(0, deps=(acc, a0, a1))
        mbarrier.arrive(empty.index(sa), count=1)
        mbarrier.arrive(empty.index(sb), count=1)
    a_row = gl.arange(0, 2 * P, layout=gl.SliceLayout(1, mma))
    n = ((a_row // 8) % 2) * half + p0 + 8 * (a_row // 16) + a_row % 8
    m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    gl.store(ws_ptr + (split * M + m[None, :]) * N + n[:, None], acc, mask=(m < M)[None, :])


@gluon.jit
def _ws_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, M, N, K, steps_per_split,
    BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, MAGIC2: gl.constexpr,
    OFFSET: gl.constexpr, WAIT_PREVIOUS: gl.constexpr, FIRST: gl.constexpr,
    PW: gl.constexpr, PR: gl.constexpr, DO_FENCE: gl.constexpr, ROT: gl.constexpr,
    KO: gl.constexpr, PAIRS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    if WAIT_PREVIOUS or FIRST:
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
            is_pure=False, pack=1,
        )  # fmt: skip
    dt: gl.constexpr = scale_ptr.dtype.element_ty
    tile = gl.program_id(0)
    split = gl.program_id(1)
    half = N // 2
    groups = K // STEP_K
    p0 = tile * P
    first = split * steps_per_split
    rot = 0
    if ROT:
        rot = tile % steps_per_split
    x_raw = gl.allocate_shared_memory(
        gl.int32, [STAGES, BM, STEP_K // 2], gl.NVMMASharedLayout(128, 32)
    )
    x_smem = x_raw._reinterpret(dt, [STAGES, BM, STEP_K], gl.NVMMASharedLayout(128, 16))
    c_smem = gl.allocate_shared_memory(
        gl.uint8, [STAGES, P, STEP_K], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=32 * PW)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize(
        [
            (
                _consumer2 if PAIRS else _consumer,
                (
                    scale_ptr,
                    zero_ptr,
                    ws_ptr,
                    x_smem,
                    c_smem,
                    ready,
                    empty,
                    p0,
                    half,
                    groups,
                    first,
                    first,
                    steps_per_split,
                    split,
                    rot,
                    M,
                    N,
                    BM,
                    P,
                    STAGES,
                    MAGIC2,
                    OFFSET,
                    DO_FENCE,
                    KO,
                    num_warps,
                ),
            ),
            (
                _producer,
                (
                    x_ptr,
                    packed_ptr,
                    x_raw,
                    c_smem,
                    ready,
                    empty,
                    p0,
                    M,
                    K,
                    first,
                    steps_per_split,
                    rot,
                    BM,
                    P,
                    STAGES,
                    PW,
                    KO,
                ),
            ),
        ],
        [PW],
        [PR],
    )
    if WAIT_PREVIOUS:
        gl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )


def launch_args(x, W_q, scale, zero, meta, ws, *, block_p, split, warps, stages,
                after_shrink, before_shrink):  # fmt: skip
    """(grid, args, kwargs) of the warp-specialized kernel."""
    _, _, _, n_out, k_in = meta
    rows = x.shape[0]
    steps = k_in // GROUP
    magic2, offset = ("0x64006400", 1024.0) if x.dtype == torch.float16 else ("0x43004300", 128.0)
    grid = (n_out // 2 // block_p, split)
    args = (x.view(torch.int32), W_q, scale, zero, ws, rows, n_out, k_in, steps // split)
    kwargs = dict(
        BM=max(8, triton.next_power_of_2(rows)), P=block_p, STAGES=stages + STAGES_PLUS,
        MAGIC2=magic2, OFFSET=offset, WAIT_PREVIOUS=after_shrink, FIRST=before_shrink,
        PW=PWARPS, PR=PREGS, DO_FENCE=FENCE, ROT=bool(ROTATE), KO=KNOCKOUT, PAIRS=PAIRS and (steps // split) % 2 == 0, num_warps=warps, maxnreg=MAXNREG,
    )  # fmt: skip
    return grid, args, kwargs


def base_partials(x, W_q, scale, zero, meta, ws, counts, tail, *, block_p, split, warps,
                  stages, after_shrink, finish, before_shrink=False):  # fmt: skip
    if finish is not None:
        return _LIBRARY(
            x, W_q, scale, zero, meta, ws, counts, tail, block_p=block_p, split=split,
            warps=warps, stages=stages, after_shrink=after_shrink, finish=finish,
            before_shrink=before_shrink,
        )  # fmt: skip
    grid, args, kwargs = launch_args(
        x, W_q, scale, zero, meta, ws, block_p=block_p, split=split, warps=warps,
        stages=stages, after_shrink=after_shrink, before_shrink=before_shrink,
    )  # fmt: skip
    _ws_kernel[grid](*args, launch_pdl=after_shrink, **kwargs)
    return None
