"""Variant of hqqlora/_gluon.py for benchmarks/ab_gluon.py: two consumer warpgroups in turn.

A producer partition streams x and the codes into STAGES shared-memory slots (cp.async,
signalled through ``ready`` mbarriers). Two consumer warpgroups take the K steps in turn
(even steps the default partition, odd steps a worker), each with its own accumulator, so
that one dequantizes while the other's wgmma runs; at the end the odd steps' sum goes
through shared memory and the even warpgroup adds it (``even + odd``: a fixed order) and
stores the partial. STAGES is even, so a slot always serves the same warpgroup. Rows that
the Gluon kernel finishes itself (``finish``) keep the library's kernel.
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
CREGS = 200
"""Registers a thread of the odd-step consumer warpgroup (the even one gets the rest)."""
MAXNREG = 168
"""The kernel's register cap (12 warps)."""
FENCE = True
"""Whether the consumers fence the async proxy after each slot's wait."""
STAGES_EVEN = "up"
"""An odd launch's stages: "up" adds one, "down" takes one off."""


@gluon.constexpr_function
def _magic(fp16):  # type: ignore[no-untyped-def]
    return "0x64006400" if fp16 else "0x43004300"


@gluon.jit
def _producer(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, acc_smem, x_raw, x_smem, c_smem, ready,
    empty, done, p0, half, groups, first, steps, split, M, N, K,
    BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, FP16: gl.constexpr,
    OFFSET: gl.constexpr, DO_FENCE: gl.constexpr, PW: gl.constexpr,
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
        step = first + i
        cp.async_copy_global_to_shared(x_raw.index(slot), x_rows + step * (STEP_K // 2), mask=m_ok)
        cp.async_copy_global_to_shared(c_smem.index(slot), c_rows + step * STEP_K)
        cp.mbarrier_arrive(ready.index(slot), increment_count=False)


@gluon.jit
def _steps(
    scale_ptr, zero_ptr, x_smem, c_smem, ready, empty, p0, half, groups, first, steps,
    PARITY: gl.constexpr, BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr,
    FP16: gl.constexpr, OFFSET: gl.constexpr, DO_FENCE: gl.constexpr, CW: gl.constexpr,
):  # fmt: skip
    # Steps PARITY, PARITY + 2, ... of the split; zero and scale one own step ahead.
    mma: gl.constexpr = _mma_layout(BM, CW)
    last = first + steps - 1
    s0 = gl.minimum(first + PARITY, last)
    zh, sh = _meta(scale_ptr, zero_ptr, p0, groups, s0, P, CW)
    zl, sl = _meta(scale_ptr, zero_ptr, half + p0, groups, s0, P, CW)
    s1 = gl.minimum(first + PARITY + 2, last)
    nzh, nsh = _meta(scale_ptr, zero_ptr, p0, groups, s1, P, CW)
    nzl, nsl = _meta(scale_ptr, zero_ptr, half + p0, groups, s1, P, CW)
    acc = gl.zeros([2 * P, BM], gl.float32, layout=mma)
    for j in range((steps - PARITY + 1) // 2):
        i = 2 * j + PARITY
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        if DO_FENCE:
            fence_async_shared()
        a = _weights(c_smem, slot, zh, sh, zl, sl, _magic(FP16), OFFSET, P, BM, CW)
        zh, sh, zl, sl = nzh, nsh, nzl, nsl
        ahead = gl.minimum(first + i + 4, last)
        nzh, nsh = _meta(scale_ptr, zero_ptr, p0, groups, ahead, P, CW)
        nzl, nsl = _meta(scale_ptr, zero_ptr, half + p0, groups, ahead, P, CW)
        acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index(slot), count=1)
    return acc


@gluon.jit
def _odd(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, acc_smem, x_raw, x_smem, c_smem, ready,
    empty, done, p0, half, groups, first, steps, split, M, N, K,
    BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, FP16: gl.constexpr,
    OFFSET: gl.constexpr, DO_FENCE: gl.constexpr, PW: gl.constexpr,
):  # fmt: skip
    acc = _steps(
        scale_ptr, zero_ptr, x_smem, c_smem, ready, empty, p0, half, groups, first, steps,
        1, BM, P, STAGES, FP16, OFFSET, DO_FENCE, 4,
    )  # fmt: skip
    acc_smem.store(acc)
    mbarrier.arrive(done, count=1)


@gluon.jit
def _even(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, acc_smem, x_raw, x_smem, c_smem, ready,
    empty, done, p0, half, groups, first, steps, split, M, N, K,
    BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, FP16: gl.constexpr,
    OFFSET: gl.constexpr, DO_FENCE: gl.constexpr, PW: gl.constexpr,
):  # fmt: skip
    mma: gl.constexpr = _mma_layout(BM, 4)
    acc = _steps(
        scale_ptr, zero_ptr, x_smem, c_smem, ready, empty, p0, half, groups, first, steps,
        0, BM, P, STAGES, FP16, OFFSET, DO_FENCE, 4,
    )  # fmt: skip
    mbarrier.wait(done, 0)
    acc = acc + acc_smem.load(mma)
    a_row = gl.arange(0, 2 * P, layout=gl.SliceLayout(1, mma))
    n = ((a_row // 8) % 2) * half + p0 + 8 * (a_row // 16) + a_row % 8
    m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    gl.store(ws_ptr + (split * M + m[None, :]) * N + n[:, None], acc, mask=(m < M)[None, :])


@gluon.jit
def _pp_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, M, N, K, steps_per_split,
    BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, FP16: gl.constexpr,
    OFFSET: gl.constexpr, WAIT_PREVIOUS: gl.constexpr, FIRST: gl.constexpr,
    PW: gl.constexpr, PR: gl.constexpr, CR: gl.constexpr, DO_FENCE: gl.constexpr,
    num_warps: gl.constexpr,
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
    x_raw = gl.allocate_shared_memory(
        gl.int32, [STAGES, BM, STEP_K // 2], gl.NVMMASharedLayout(128, 32)
    )
    x_smem = x_raw._reinterpret(dt, [STAGES, BM, STEP_K], gl.NVMMASharedLayout(128, 16))
    c_smem = gl.allocate_shared_memory(
        gl.uint8, [STAGES, P, STEP_K], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    acc_smem = gl.allocate_shared_memory(
        gl.float32, [2 * P, BM], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=32 * PW)
        mbarrier.init(empty.index(s), count=1)
    mbarrier.init(done, count=1)
    gl.warp_specialize(
        [
            (_even, (
                    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, acc_smem, x_raw, x_smem, c_smem, ready,
                    empty, done, p0, half, groups, first, steps_per_split, split, M, N, K, BM, P, STAGES,
                    FP16, OFFSET, DO_FENCE, PW,
                )),
            (_odd, (
                    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, acc_smem, x_raw, x_smem, c_smem, ready,
                    empty, done, p0, half, groups, first, steps_per_split, split, M, N, K, BM, P, STAGES,
                    FP16, OFFSET, DO_FENCE, PW,
                )),
            (_producer, (
                    x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, acc_smem, x_raw, x_smem, c_smem, ready,
                    empty, done, p0, half, groups, first, steps_per_split, split, M, N, K, BM, P, STAGES,
                    FP16, OFFSET, DO_FENCE, PW,
                )),
        ],
        [4, PW],
        [CR, PR],
    )  # fmt: skip
    if WAIT_PREVIOUS:
        gl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )


def launch_args(x, W_q, scale, zero, meta, ws, *, block_p, split, warps, stages,
                after_shrink, before_shrink):  # fmt: skip
    """(grid, args, kwargs) of the kernel; ``warps`` is ignored (two warpgroups of 4)."""
    _, _, _, n_out, k_in = meta
    rows = x.shape[0]
    steps = k_in // GROUP
    fp16 = x.dtype == torch.float16
    offset = 1024.0 if fp16 else 128.0
    if stages % 2:
        stages = stages + 1 if STAGES_EVEN == "up" else max(2, stages - 1)
    grid = (n_out // 2 // block_p, split)
    args = (x.view(torch.int32), W_q, scale, zero, ws, rows, n_out, k_in, steps // split)
    kwargs = dict(
        BM=max(8, triton.next_power_of_2(rows)), P=block_p, STAGES=stages,
        FP16=fp16, OFFSET=offset, WAIT_PREVIOUS=after_shrink, FIRST=before_shrink,
        PW=PWARPS, PR=PREGS, CR=CREGS, DO_FENCE=FENCE, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
    return grid, args, kwargs


def base_partials(x, W_q, scale, zero, meta, ws, counts, tail, *, block_p, split, warps,
                  stages, after_shrink, finish, before_shrink=False):  # fmt: skip
    if finish is not None or block_p % 32:
        return _LIBRARY(
            x, W_q, scale, zero, meta, ws, counts, tail, block_p=block_p, split=split,
            warps=warps, stages=stages, after_shrink=after_shrink, finish=finish,
            before_shrink=before_shrink,
        )  # fmt: skip
    grid, args, kwargs = launch_args(
        x, W_q, scale, zero, meta, ws, block_p=block_p, split=split, warps=warps,
        stages=stages, after_shrink=after_shrink, before_shrink=before_shrink,
    )  # fmt: skip
    _pp_kernel[grid](*args, launch_pdl=after_shrink, **kwargs)
    return None
