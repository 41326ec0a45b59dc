"""One-kernel dequantization for CUDA tensors, bit for bit what HQQ computes.

HQQ's own dequantization runs one kernel per packed slot, then a subtraction and a
multiplication over the whole weight: about ten launches for a 4-bit layer, which
dominates eager inference at small batch sizes. This kernel reads each packed byte
once and writes the weight once. It rounds exactly like PyTorch's elementwise ops
in the compute dtype (``(q - zero)`` rounded, then ``* scale`` rounded; float32
intermediates round correctly for bf16/fp16 operands), so the result is identical.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hqqlora._base import QuantLayout

__all__ = ["available", "dequantize_cuda", "device_of"]

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


def device_of(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """``t``'s CUDA device made current, else nothing.

    Triton launches on the current device's current stream, not on its arguments'
    device: a layer on ``cuda:1`` while ``cuda:0`` is current would run unordered with
    PyTorch's work on ``cuda:1`` (or read across devices).
    """
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


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
    with device_of(W_q):
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
