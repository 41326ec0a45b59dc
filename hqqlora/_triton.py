"""One-kernel dequantization for CUDA tensors, bit for bit what HQQ computes.

HQQ's own dequantization runs one kernel per packed slot, then a subtraction and a
multiplication over the whole weight: about ten launches for a 4-bit layer, which
dominates eager inference at small batch sizes. This kernel reads each packed byte
once and writes the weight once. It rounds exactly like PyTorch's elementwise ops
in the compute dtype (``(q - zero)`` rounded, then ``* scale`` rounded; float32
intermediates round correctly for bf16/fp16 operands), so the result is identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hqqlora._base import QuantLayout

__all__ = ["available", "dequantize_cuda"]

try:  # Triton is optional: only CUDA eager inference uses it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]  # Triton ships no types for its JIT
    def _dequant_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations itself
        packed_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        n_packed_rows,
        n_cols,
        n_valid_rows,
        BITS: tl.constexpr,
        PER: tl.constexpr,
        PER_ROW_META: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offs < n_packed_rows * n_cols
        packed = tl.load(packed_ptr + offs, mask=in_bounds, other=0).to(tl.int32)
        row = offs // n_cols
        col = offs % n_cols
        out_dtype = out_ptr.dtype.element_ty
        for slot in tl.static_range(PER):
            code = (packed >> (BITS * (PER - 1 - slot))) & ((1 << BITS) - 1)
            out_row = slot * n_packed_rows + row
            ok = in_bounds & (out_row < n_valid_rows)
            meta_idx = out_row if PER_ROW_META else col
            zero = tl.load(zero_ptr + meta_idx, mask=ok, other=0).to(tl.float32)
            scale = tl.load(scale_ptr + meta_idx, mask=ok, other=0).to(tl.float32)
            shifted = (code.to(tl.float32) - zero).to(out_dtype).to(tl.float32)
            value = (shifted * scale).to(out_dtype)
            tl.store(out_ptr + out_row * n_cols + col, value, mask=ok)


def available(W_q: Tensor) -> bool:
    """Whether :func:`dequantize_cuda` can run on ``W_q``."""
    return triton is not None and W_q.is_cuda


def dequantize_cuda(W_q: Tensor, scale: Tensor, zero: Tensor, layout: QuantLayout) -> Tensor:
    """``reshape((unpack(W_q) - zero) * scale, shape)`` in one kernel (CUDA only).

    Args:
        W_q: packed codes of shape ``(n, cols)`` (not viewed as float).
        scale, zero: ``(groups, 1)`` for axis 1, ``(1, groups)`` for axis 0.
        layout: the layer's :class:`~hqqlora._base.QuantLayout`.

    Returns:
        Tensor of shape ``layout.shape`` in ``layout.compute_dtype``.
    """
    bits, per = layout.packing_bits
    n_packed_rows, n_cols = W_q.shape
    valid_rows = n_packed_rows * per
    if layout.nbits == 3:
        valid_rows = layout.group_size if layout.axis == 0 else layout.num_groups
    out = torch.empty(valid_rows, n_cols, dtype=layout.compute_dtype, device=W_q.device)
    block = 1024
    grid = (triton.cdiv(n_packed_rows * n_cols, block),)
    _dequant_kernel[grid](
        W_q.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        out,
        n_packed_rows,
        n_cols,
        valid_rows,
        BITS=bits,
        PER=per,
        PER_ROW_META=layout.axis == 1,
        BLOCK=block,
    )
    return out.view(layout.shape)


# -- decode: dequantize and multiply in one kernel ---------------------------------------

if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]  # Triton ships no types for its JIT
    def _gemv_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations itself
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        M,
        N,
        K,
        rows_per_slot,
        steps_per_split,
        BITS: tl.constexpr,
        PER: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_STEP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Axis-1 layout: output row n reads packed row n % rows_per_slot, slot
        # n // rows_per_slot; the group of (n, k) is n * K/GROUP + k // GROUP. One K
        # step covers GROUPS_PER_STEP whole groups. Program (i, s) sums K steps
        # [s·steps_per_split, (s+1)·steps_per_split) into a float32 output (split-K:
        # a decode step has too few output tiles to fill the GPU otherwise).
        BLOCK_K: tl.constexpr = GROUP * GROUPS_PER_STEP
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        n_ok = n < N
        packed_row = n % rows_per_slot
        shift = BITS * (PER - 1 - n // rows_per_slot)
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        j = tl.arange(0, BLOCK_K)
        gj = tl.arange(0, GROUPS_PER_STEP)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dtype = x_ptr.dtype.element_ty
        groups_per_row = K // GROUP
        for step in range(split * steps_per_split, (split + 1) * steps_per_split):
            k = step * BLOCK_K + j
            packed = tl.load(
                packed_ptr + packed_row[:, None] * K + k[None, :], mask=n_ok[:, None], other=0
            )
            code = (packed.to(tl.int32) >> shift[:, None]) & ((1 << BITS) - 1)
            meta_idx = n[:, None] * groups_per_row + step * GROUPS_PER_STEP + gj[None, :]
            zero = tl.load(zero_ptr + meta_idx, mask=n_ok[:, None], other=0).to(tl.float32)
            scale = tl.load(scale_ptr + meta_idx, mask=n_ok[:, None], other=0).to(tl.float32)
            zero = tl.reshape(
                tl.broadcast_to(zero[:, :, None], (BLOCK_N, GROUPS_PER_STEP, GROUP)),
                (BLOCK_N, BLOCK_K),
            )
            scale = tl.reshape(
                tl.broadcast_to(scale[:, :, None], (BLOCK_N, GROUPS_PER_STEP, GROUP)),
                (BLOCK_N, BLOCK_K),
            )
            # One rounding (HQQ rounds twice): this path is already not bitwise.
            w = ((code.to(tl.float32) - zero) * scale).to(dtype)
            xs = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0)
            acc += tl.dot(xs, tl.trans(w))
        tl.atomic_add(
            out_ptr + m[:, None] * N + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :]
        )


def decode_supported(W_q: Tensor, layout: QuantLayout, tokens: int) -> bool:
    """Whether :func:`dequant_matmul` handles this layer and this many tokens."""
    if triton is None or not W_q.is_cuda or layout.axis != 1 or tokens > 16:
        return False
    if layout.packing not in ("8bit_u8", "4bit_u8", "2bit_u8", "1bit_u8") or layout.view_as_float:
        return False
    _, per = layout.packing_bits
    out_features, in_features = layout.shape
    group = layout.group_size
    power_of_two = group >= 16 and group & (group - 1) == 0  # one K step per group for tl.dot
    return out_features % per == 0 and in_features % group == 0 and power_of_two


def _dequant_matmul_impl(
    x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, meta: list[int]
) -> Tensor:
    bits, per, group, n, k = meta
    m = x.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    block_n, groups_per_step, splits, warps, stages = DECODE_CONFIG
    while (k // group) % groups_per_step:
        groups_per_step //= 2
    steps = k // (group * groups_per_step)
    while steps % splits:
        splits //= 2
    _gemv_kernel[(triton.cdiv(n, block_n), splits)](
        x, W_q, scale, zero, out, m, n, k, n // per, steps // splits,
        BITS=bits, PER=per, GROUP=group, GROUPS_PER_STEP=groups_per_step,
        BLOCK_M=16, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out.to(scale.dtype)


# (BLOCK_N, groups per K step, K splits, warps, pipeline stages), tuned on an H100
# for 4096², 4-bit, group 64.
DECODE_CONFIG = (32, 2, 8, 4, 3)


if triton is not None:

    @torch.library.custom_op("hqqlora::dequant_matmul", mutates_args=())
    def _dequant_matmul_op(
        x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, meta: list[int]
    ) -> Tensor:
        return _dequant_matmul_impl(x, W_q, scale, zero, meta)

    @_dequant_matmul_op.register_fake
    def _(x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, meta: list[int]) -> Tensor:
        return x.new_empty(x.shape[0], meta[3], dtype=scale.dtype)


def dequant_matmul(
    x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, layout: QuantLayout
) -> Tensor:
    """``x @ dequantize(W)ᵀ`` for a few tokens, reading the packed weight once (CUDA).

    One Triton kernel unpacks, dequantizes (with HQQ's roundings) and multiplies, so
    a decode step moves the packed bytes instead of a dense weight. A custom op, so
    ``torch.compile(fullgraph=True)`` keeps it whole. Accumulates in float32 in its
    own order: equal to the dense path up to the compute dtype's rounding.

    Args:
        x: ``(..., in)`` with at most 16 rows in all, in the compute dtype.

    Returns:
        ``(..., out)`` in the compute dtype.
    """
    bits, per = layout.packing_bits
    out_features, in_features = layout.shape
    flat = x.reshape(-1, in_features).contiguous()
    meta = [bits, per, layout.group_size, out_features, in_features]
    out: Tensor = _dequant_matmul_op(
        flat, W_q.contiguous(), scale.contiguous(), zero.contiguous(), meta
    )
    return out.view(*x.shape[:-1], out_features)
