"""The base term of 4-bit decode on Hopper, written in Gluon: ``x @ dequantize(W)ᵀ`` for
1–64 rows of ``x``, partial sums per K split into a float32 workspace that
``_decode_kernels._main_kernel`` (MODE 8) adds up in a fixed order with the adapter
terms; or, for few rows (``_decode.FINISH_ROWS``), the last split of each tile adds them
itself (with the adapter terms, DoRA's norms and the bias) and writes the output.

Why Gluon: the Triton kernels of ``_decode_kernels`` dequantize in one register layout
and let the compiler move the weights into the tensor-core operand layout through shared
memory every K step (``STS`` + ``LDSM`` + barriers), with a wait after each ``HGMMA``.
Gluon names the layouts, so here each thread loads exactly the codes its operand
fragment needs and the weights never leave its registers:

- ``wgmma`` with the weights as operand A (registers) and ``x`` as operand B (shared
  memory): ``acc (outputs × rows) = W · xᵀ``, rows padded to 8–64 (``BM``).
- HQQ's 4-bit packing puts output ``j`` in the high nibble and ``N/2 + j`` in the low
  nibble of the same byte. A thread of the operand layout holds rows ``r`` and ``r + 8``
  of each 16-row block; here they are the high and low outputs of one packed row, so a
  byte feeds two weights of the same thread.
- The MMA sums over K in any order, as long as the weights and ``x`` share it. The order
  chosen makes a thread's 16 codes of a step contiguous in memory (one 16-byte load):
  the operand's ``k = 16c + 8h + 2q + e`` (lane ``q = lane % 4``, chunk ``c``, half
  ``h``, pair element ``e``) is byte ``16q + 4c + 2h + e`` of the step's codes, and
  ``x`` is loaded into shared memory permuted the same way, 4 bytes (a pair) at a time.
- Weights as HQQ computes them: ``(q − z)`` rounded to the compute dtype, then ``· s``
  rounded (MODE 7's arithmetic: codes by the exponent trick, two per instruction), so
  the product is of HQQ's own weights, accumulated in float32.
- Codes and ``x`` stream through ``STAGES`` shared-memory buffers by ``cp.async``; zero
  and scale come two steps ahead in registers.

Only 4-bit codes in groups of 64 along the input (``axis=1``), fp16/bf16, on compute
capability 9.0 (``wgmma``); :func:`supported` says when. Everything else keeps the
Triton modes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

try:  # Gluon ships with Triton 3.5 and later (see TESTED_TRITON)
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

TESTED_TRITON = ("3.6.",)
"""Triton versions this kernel was written and tested against: Gluon is an experimental
API whose names and layouts move between releases, so other versions keep the Triton
modes rather than fail to compile at the first call."""

AVAILABLE = gluon is not None and triton.__version__.startswith(TESTED_TRITON)
"""Whether this Triton has Gluon, in a tested version."""

GROUP = 64
"""Inputs a K step (one group of codes)."""


def supported(x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, meta: list[int]) -> bool:
    """Whether :func:`base_partials` takes this call: Gluon, a CUDA device of compute
    capability 9.0, 4-bit codes in groups of 64, scale and zero in ``x``'s dtype, at most
    64 rows, ``out/2`` a multiple of 64, and the 16-byte alignment ``cp.async`` needs."""
    bits, per, group, n_out, k_in = meta
    if not AVAILABLE or x.device.type != "cuda" or _capability(x.device.index) != (9, 0):
        return False
    if bits != 4 or per != 2 or group != GROUP or x.shape[0] > 64:
        return False
    if scale.dtype != x.dtype or zero.dtype != x.dtype:
        return False
    if (n_out // 2) % 64 or k_in % GROUP or W_q.numel() >= 2**31:
        return False
    return all(t.data_ptr() % 16 == 0 for t in (x, W_q))


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


if gluon is not None:
    STEP_K = gl.constexpr(GROUP)

    @gluon.constexpr_function
    def _codes_layout(P, num_warps, in_k_order):  # type: ignore[no-untyped-def]
        # A step's codes, (P packed rows, 64 bytes): lane q of a row's quad holds bytes
        # 16q..16q+15, rows lane // 4 + 8·warp (+ 8·warps per repeat). ``in_k_order``:
        # the same registers read in the MMA's K order, k = 16c + 8h + 2q + e.
        reps = [[8 * num_warps << i, 0] for i in range(int(math.log2(P // (8 * num_warps))))]
        if in_k_order:
            regs, lanes = [[0, 1], [0, 8], [0, 16], [0, 32]], [[0, 2], [0, 4]]
        else:
            regs, lanes = [[0, 1], [0, 2], [0, 4], [0, 8]], [[0, 16], [0, 32]]
        return gl.DistributedLinearLayout(
            [*regs, *reps],
            [*lanes, [1, 0], [2, 0], [4, 0]],
            [[8 << i, 0] for i in range(int(math.log2(num_warps)))],
            [],
            [P, GROUP],
        )

    @gluon.constexpr_function
    def _mma_layout(BM, num_warps):  # type: ignore[no-untyped-def]
        return gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16]
        )

    @gluon.constexpr_function
    def _rows_layout(cols, vec, num_warps):  # type: ignore[no-untyped-def]
        # Copies: ``vec`` elements a thread, a row's threads side by side.
        across = min(cols // vec, 32)
        return gl.BlockedLayout([1, vec], [32 // across, across], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _nibble_asm(magic2):  # type: ignore[no-untyped-def]
        # Four code bytes b0..b3 (one register) to their high and low nibbles as
        # ``magic + q`` in the compute dtype, two to a register: [b0, 0, b1, 0] then mask.
        return (
            "{ .reg .b32 t0, t1;"
            " prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;"
            f" lop3.b32 $2, t0, 0x000F000F, {magic2}, 0xea;"
            f" lop3.b32 $3, t1, 0x000F000F, {magic2}, 0xea;"
            " shr.u32 t0, t0, 4; shr.u32 t1, t1, 4;"
            f" lop3.b32 $0, t0, 0x000F000F, {magic2}, 0xea;"
            f" lop3.b32 $1, t1, 0x000F000F, {magic2}, 0xea; }}"
        )

    @gluon.jit  # type: ignore[untyped-decorator]
    def _issue(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, x_smem, c_smem, slot, step, p0, M, K,
        BM: gl.constexpr, P: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # cp.async of one K step into ``slot``: x (rows past M read as 0) in the MMA's K
        # order, a pair (4 bytes) at a time, and the codes of the tile's packed rows.
        xl: gl.constexpr = _rows_layout(STEP_K // 2, 1, num_warps)
        cl: gl.constexpr = _rows_layout(STEP_K, 16, num_warps)
        m = gl.arange(0, BM, layout=gl.SliceLayout(1, xl))
        t = gl.arange(0, STEP_K // 2, layout=gl.SliceLayout(0, xl))  # pair 8c + 4h + q
        pair = step * (STEP_K // 2) + 8 * (t % 4) + 2 * (t // 8) + (t // 4) % 2
        cp.async_copy_global_to_shared(
            x_smem.index(slot), x_ptr + m[:, None] * (K // 2) + pair[None, :],
            mask=(m < M)[:, None],
        )  # fmt: skip
        p = p0 + gl.arange(0, P, layout=gl.SliceLayout(1, cl))
        k = step * STEP_K + gl.arange(0, STEP_K, layout=gl.SliceLayout(0, cl))
        cp.async_copy_global_to_shared(c_smem.index(slot), packed_ptr + p[:, None] * K + k[None, :])
        cp.commit_group()

    @gluon.jit  # type: ignore[untyped-decorator]
    def _meta(  # type: ignore[no-untyped-def]
        scale_ptr, zero_ptr, first_row, groups, step, P: gl.constexpr, num_warps: gl.constexpr
    ):
        # Zero and scale of outputs first_row .. first_row + P at one step.
        L: gl.constexpr = _codes_layout(P, num_warps, True)
        r = first_row + gl.arange(0, P, layout=gl.SliceLayout(1, L))
        return gl.load(zero_ptr + r * groups + step), gl.load(scale_ptr + r * groups + step)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _metas(  # type: ignore[no-untyped-def]
        scale_ptr, zero_ptr, p0, half, groups, step, P: gl.constexpr, num_warps: gl.constexpr
    ):
        # Zero and scale of a tile's high (p0 ..) and low (half + p0 ..) outputs at one step.
        zh, sh = _meta(scale_ptr, zero_ptr, p0, groups, step, P, num_warps)
        zl, sl = _meta(scale_ptr, zero_ptr, half + p0, groups, step, P, num_warps)
        return zh, sh, zl, sl

    @gluon.jit  # type: ignore[untyped-decorator]
    def _wait_previous() -> None:
        # Wait for the kernel this one was launched beside (a programmatic dependent
        # launch) to finish and its writes to be visible.
        gl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )

    @gluon.jit  # type: ignore[untyped-decorator]
    def _finish_last(  # type: ignore[no-untyped-def]
        count_ptr, tile, ws_ptr, tail, M, N, p0, half,
        P: gl.constexpr, SPLITS: gl.constexpr, ROWS: gl.constexpr, BLOCK_R: gl.constexpr,
        T_SPLITS: gl.constexpr, HAS_LORA: gl.constexpr, HAS_IDX: gl.constexpr,
        HAS_DORA: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # Up to 16 rows: the tile's last split to arrive (a counter) finishes the rows,
        # adding the partials in a fixed order. The barrier: every thread's partial is
        # stored before the counter is released, and before this program reads its own
        # partials back (stored by other threads) at a single split.
        gl.thread_barrier()
        done = 0
        if SPLITS > 1:
            done = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == SPLITS - 1:
            _finish_rows(
                ws_ptr, tail, M, N, p0, half, P, SPLITS, ROWS, BLOCK_R, T_SPLITS,
                HAS_LORA, HAS_IDX, HAS_DORA, HAS_BIAS, num_warps,
            )  # fmt: skip

    @gluon.jit  # type: ignore[untyped-decorator]
    def _launch_dependents() -> None:
        # The next kernel, a programmatic dependent launch, may start now.
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
            is_pure=False, pack=1,
        )  # fmt: skip

    @gluon.jit  # type: ignore[untyped-decorator]
    def _slots(  # type: ignore[no-untyped-def]
        dt: gl.constexpr, BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr
    ):
        # STAGES shared-memory slots of a K step: x as 4-byte pairs in a 128-byte swizzle
        # (``x_raw``, what cp.async writes), the same bytes as the compute dtype for the MMA
        # (``x_smem``), and the tile's codes (``c_smem``).
        x_raw = gl.allocate_shared_memory(
            gl.int32, [STAGES, BM, STEP_K // 2], gl.NVMMASharedLayout(128, 32)
        )
        x_smem = x_raw._reinterpret(dt, [STAGES, BM, STEP_K], gl.NVMMASharedLayout(128, 16))
        c_smem = gl.allocate_shared_memory(
            gl.uint8, [STAGES, P, STEP_K], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        )
        return x_raw, x_smem, c_smem

    @gluon.jit  # type: ignore[untyped-decorator]
    def _store_partials(  # type: ignore[no-untyped-def]
        ws_ptr, acc, split, M, N, p0, half, P: gl.constexpr, BM: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        # The accumulator into ws[split] (rows past M not stored): its row a is output
        # (a // 8) % 2 · N/2 + p0 + 8 (a // 16) + a % 8.
        mma: gl.constexpr = _mma_layout(BM, num_warps)
        a_row = gl.arange(0, 2 * P, layout=gl.SliceLayout(1, mma))
        n = ((a_row // 8) % 2) * half + p0 + 8 * (a_row // 16) + a_row % 8
        m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
        gl.store(ws_ptr + (split * M + m[None, :]) * N + n[:, None], acc, mask=(m < M)[None, :])

    @gluon.jit  # type: ignore[untyped-decorator]
    def _weights(  # type: ignore[no-untyped-def]
        c_smem, slot, zh, sh, zl, sl, MAGIC2: gl.constexpr, OFFSET: gl.constexpr,
        P: gl.constexpr, BM: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # The step's (2P, 64) weights in the wgmma operand layout, from shared memory.
        dot_a: gl.constexpr = gl.DotOperandLayout(
            operand_index=0, parent=_mma_layout(BM, num_warps), k_width=2
        )
        c = c_smem.index(slot).load(_codes_layout(P, num_warps, False))
        return _operand_a(c, zh, sh, zl, sl, MAGIC2, OFFSET, P, dot_a, num_warps)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _operand_a(  # type: ignore[no-untyped-def]
        c, zh, sh, zl, sl, MAGIC2: gl.constexpr, OFFSET: gl.constexpr, P: gl.constexpr,
        dot_a: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # A step's codes (P, 64), as loaded in _codes_layout(P, num_warps, False), to the
        # (2P, 64) weights in the MMA's operand layout ``dot_a``: A row 16b + i is the high
        # nibble of packed row 8b + i, A row 16b + 8 + i its low nibble (i < 8).
        c = gl.permute(gl.reshape(c, [P, 4, 4, 2, 2]), (0, 2, 3, 1, 4))  # (q c h e) to (c h q e)
        c = gl.convert_layout(
            gl.reshape(c, [P, STEP_K]), _codes_layout(P, num_warps, True), assert_trivial=True
        )
        qh, ql = gl.inline_asm_elementwise(
            _nibble_asm(MAGIC2),
            "=r,=r,=r,=r,r",
            [c],
            dtype=(zh.dtype, zh.dtype),
            is_pure=True,
            pack=4,
        )
        wh = ((qh - OFFSET) - zh[:, None]) * sh[:, None]  # HQQ's (q − z) · s, each rounded
        wl = ((ql - OFFSET) - zl[:, None]) * sl[:, None]
        a = gl.permute(gl.reshape(gl.join(wh, wl), [P // 8, 8, STEP_K, 2]), (0, 3, 1, 2))
        return gl.convert_layout(gl.reshape(a, [2 * P, STEP_K]), dot_a, assert_trivial=True)

    @gluon.jit  # type: ignore[untyped-decorator]
    def _finish_rows(  # type: ignore[no-untyped-def]
        ws_ptr, tail, M, N, p0, half,
        P: gl.constexpr, SPLITS: gl.constexpr, ROWS: gl.constexpr, BLOCK_R: gl.constexpr,
        T_SPLITS: gl.constexpr, HAS_LORA: gl.constexpr, HAS_IDX: gl.constexpr,
        HAS_DORA: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # The tile's last program, up to 16 rows, two at a time: the splits' partials in
        # order, then ``s_k · t @ B_kᵀ`` (each row's own tile of B), DoRA's ``m / n``, the
        # bias and the NaN of an index outside the bank, as the Triton kernel's epilogue
        # does; stored in the output dtype.
        (t_ptr, b_ptr, idx_ptr, scaling_ptr, mag_ptr, norm_ptr, is_dora_ptr, bias_ptr, out_ptr,
         R, t_splits, stride_b_bank, stride_dora_bank, n_bank) = tail  # fmt: skip
        L3: gl.constexpr = gl.BlockedLayout(
            [1, 1, BLOCK_R], [1, 32, 1], [1, num_warps, 1], [2, 1, 0]
        )
        L2: gl.constexpr = gl.SliceLayout(2, L3)  # (rows, outputs)
        i = gl.arange(0, 2 * P, layout=gl.SliceLayout(0, L2))
        n = (i // P) * half + p0 + i % P
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        r_ok = r < R
        ts = gl.arange(0, T_SPLITS, layout=gl.SliceLayout(0, L2))
        for c in gl.static_range(ROWS // 2):
            m = 2 * c + gl.arange(0, 2, layout=gl.SliceLayout(1, L2))
            m_ok = m < M
            ok = m_ok[:, None] & (n[None, :] >= 0)
            total = gl.zeros([2, 2 * P], gl.float32, layout=L2)
            for s_i in gl.static_range(SPLITS):
                total += gl.load(
                    ws_ptr + (s_i * M + m[:, None]) * N + n[None, :], mask=ok, other=0.0,
                    cache_modifier=".cg",
                )  # fmt: skip
            if HAS_IDX:
                k = gl.load(idx_ptr + m, mask=m_ok, other=-1).to(gl.int64)
            else:
                k = gl.where(m_ok, 0, -1).to(gl.int64)
            valid = (k >= 0) & (k < n_bank)
            k_safe = gl.where(valid, k, 0)
            if HAS_LORA:
                t_part = gl.load(
                    t_ptr + (ts[None, :, None] * M + m[:, None, None]) * BLOCK_R
                    + r[None, None, :],
                    mask=valid[:, None, None] & (ts[None, :, None] < t_splits)
                    & r_ok[None, None, :],
                    other=0.0,
                )  # fmt: skip
                s_k = gl.load(scaling_ptr + k_safe, mask=valid, other=0.0).to(gl.float32)
                s_k = gl.convert_layout(s_k, gl.SliceLayout(1, gl.SliceLayout(1, L3)))
                t_rows = gl.sum(t_part, axis=1) * s_k[:, None]  # (2, BLOCK_R)
                b = gl.load(
                    b_ptr + k_safe[:, None, None] * stride_b_bank + n[None, :, None] * R
                    + r[None, None, :],
                    mask=valid[:, None, None] & r_ok[None, None, :],
                    other=0.0,
                ).to(gl.float32)  # fmt: skip
                # Rows without an adapter get 0, not 0 · B (a NaN in B stays its own).
                total += gl.where(valid[:, None], gl.sum(b * t_rows[:, None, :], axis=2), 0.0)
            if HAS_DORA:
                if HAS_IDX:
                    dora = valid & (gl.load(is_dora_ptr + k_safe, mask=valid, other=0) != 0)
                else:
                    dora = valid
                where = k_safe[:, None] * stride_dora_bank + n[None, :]
                mag = gl.load(mag_ptr + where, mask=dora[:, None], other=1.0).to(gl.float32)
                nrm = gl.load(norm_ptr + where, mask=dora[:, None], other=1.0).to(gl.float32)
                total = total * (mag / nrm)
            if HAS_BIAS:
                total += gl.load(bias_ptr + n).to(gl.float32)[None, :]
            if HAS_IDX:
                total = gl.where(((k < -1) | (k >= n_bank))[:, None], float("nan"), total)
            gl.store(
                out_ptr + m[:, None] * N + n[None, :], total.to(out_ptr.dtype.element_ty),
                mask=ok,
            )  # fmt: skip

    @gluon.jit  # type: ignore[untyped-decorator]
    def _base_kernel(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, scale_ptr, zero_ptr, ws_ptr, count_ptr, tail, M, N, K, steps_per_split,
        BM: gl.constexpr, P: gl.constexpr, STAGES: gl.constexpr, MAGIC2: gl.constexpr,
        OFFSET: gl.constexpr, WAIT_PREVIOUS: gl.constexpr, FIRST: gl.constexpr,
        FINISH: gl.constexpr,
        SPLITS: gl.constexpr, ROWS: gl.constexpr, BLOCK_R: gl.constexpr,
        T_SPLITS: gl.constexpr, HAS_LORA: gl.constexpr, HAS_IDX: gl.constexpr,
        HAS_DORA: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        if WAIT_PREVIOUS or FIRST:
            # The next kernel may launch now: it waits for this one before reading (FIRST:
            # the shrink kernel, beside this one, waits for it before it finishes).
            _launch_dependents()
        dt: gl.constexpr = scale_ptr.dtype.element_ty
        tile = gl.program_id(0)
        split = gl.program_id(1)
        half = N // 2
        groups = K // STEP_K
        p0 = tile * P
        first = split * steps_per_split
        last = first + steps_per_split - 1
        mma: gl.constexpr = _mma_layout(BM, num_warps)
        x_raw, x_smem, c_smem = _slots(dt, BM, P, STAGES)
        # The steps past ``last`` load ``last`` again: no bounds, nothing read twice used.
        for s in gl.static_range(STAGES - 1):
            _issue(
                x_ptr, packed_ptr, x_raw, c_smem, s, gl.minimum(first + s, last), p0, M, K,
                BM, P, num_warps,
            )  # fmt: skip
        zh, sh, zl, sl = _metas(scale_ptr, zero_ptr, p0, half, groups, first, P, num_warps)
        second = gl.minimum(first + 1, last)
        nzh, nsh, nzl, nsl = _metas(scale_ptr, zero_ptr, p0, half, groups, second, P, num_warps)
        acc = gl.zeros([2 * P, BM], gl.float32, layout=mma)
        for i in range(steps_per_split):
            slot = i % STAGES
            # Step i has landed in every thread's copies; every warpgroup has finished
            # step i − 1's MMA, so its buffers take step i + STAGES − 1.
            cp.wait_group(STAGES - 2)
            gl.thread_barrier()
            _issue(
                x_ptr, packed_ptr, x_raw, c_smem, (i + STAGES - 1) % STAGES,
                gl.minimum(first + i + STAGES - 1, last), p0, M, K, BM, P, num_warps,
            )  # fmt: skip
            a = _weights(c_smem, slot, zh, sh, zl, sl, MAGIC2, OFFSET, P, BM, num_warps)
            zh, sh, zl, sl = nzh, nsh, nzl, nsl
            ahead = gl.minimum(first + i + 2, last)
            nzh, nsh, nzl, nsl = _metas(scale_ptr, zero_ptr, p0, half, groups, ahead, P, num_warps)
            acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
            # Waited here, before the next step writes registers the MMA reads (else
            # ptxas serializes every MMA).
            acc = warpgroup_mma_wait(0, deps=(acc,))
        cp.wait_group(0)
        _store_partials(ws_ptr, acc, split, M, N, p0, half, P, BM, num_warps)
        if WAIT_PREVIOUS:
            # Launched early beside the shrink kernel: go on only after it (its ``t`` and
            # zeroed counters), so that a kernel waiting for this one sees them too.
            _wait_previous()
        if FINISH:
            _finish_last(
                count_ptr, tile, ws_ptr, tail, M, N, p0, half, P, SPLITS, ROWS, BLOCK_R,
                T_SPLITS, HAS_LORA, HAS_IDX, HAS_DORA, HAS_BIAS, num_warps,
            )  # fmt: skip


def base_partials(
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
    stages: int,
    after_shrink: bool,
    finish: dict[str, Any] | None,
    before_shrink: bool = False,
) -> None:
    """Writes ``x @ dequantize(W)ᵀ`` over split ``s`` of K into ``ws[s]`` (``(split,
    rows, out)`` float32), ``block_p`` packed rows (``2·block_p`` outputs) a program.
    ``after_shrink``: launched early beside the shrink kernel (programmatic dependent
    launch), finishing after it. ``before_shrink``: launched first, the shrink kernel a
    programmatic dependent launch beside it (finishing after it). ``finish`` (at most 16
    rows): the flags of the epilogue (``HAS_LORA``, ``HAS_IDX``, ``HAS_DORA``,
    ``HAS_BIAS``, ``BLOCK_R``, ``T_SPLITS``) that the last split of each tile then
    applies, writing the output (``tail``: the adapter, index, DoRA, bias and output
    tensors and sizes, as ``_decode`` passes them; ``counts`` zeroed, one per tile). The
    caller checks :func:`supported`."""
    _, _, _, n_out, k_in = meta
    rows = x.shape[0]
    steps = k_in // GROUP
    if steps % split or (n_out // 2) % block_p or block_p % (8 * warps):
        raise ValueError(
            f"base_partials: split {split} must divide the {steps} steps and block_p "
            f"{block_p} divide out/2 = {n_out // 2} and be a multiple of 8 · {warps} warps"
        )
    if finish is not None and rows > 16:
        raise ValueError(f"base_partials: finish takes at most 16 rows, got {rows}")
    if before_shrink and (after_shrink or finish is not None):
        raise ValueError(
            "base_partials: before_shrink excludes after_shrink and finish (the shrink "
            "kernel's t is not there yet)"
        )
    flags = dict(
        HAS_LORA=False, HAS_IDX=False, HAS_DORA=False, HAS_BIAS=False, BLOCK_R=16, T_SPLITS=1
    )
    flags.update(finish or {})
    magic2, offset = ("0x64006400", 1024.0) if x.dtype == torch.float16 else ("0x43004300", 128.0)
    _base_kernel[(n_out // 2 // block_p, split)](
        x.view(torch.int32), W_q, scale, zero, ws, counts, tail, rows, n_out, k_in,
        steps // split, BM=max(8, triton.next_power_of_2(rows)), P=block_p, STAGES=stages,
        MAGIC2=magic2, OFFSET=offset, WAIT_PREVIOUS=after_shrink, FIRST=before_shrink,
        FINISH=finish is not None,
        SPLITS=split, ROWS=max(2, triton.next_power_of_2(rows)), num_warps=warps,
        launch_pdl=after_shrink, **flags,
    )  # fmt: skip
