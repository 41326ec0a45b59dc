"""Prefill kernels: a mixed-adapter batch's adapter terms after the base output, in two launches.

At prefill (many tokens per row) the base product is a matmul and HQQ's own path is the
fast one; what the adapters add must not cost more than a fraction of it. The dense
bank path gathers each row's ``A`` and ``B`` (a copy per row), casts ``x`` to the
adapters' dtype (float32 by default: a second, twice larger ``x``) and adds the term in
float32 in separate passes. Two Triton kernels (Punica's SGMV, vLLM's shrink/expand)
read ``x``, the base output and each row's adapter where it lies, once:

1. ``_shrink_kernel``: ``t[tok] = s_k · x[tok] @ A_kᵀ`` in float32 for the tokens of one
   row of the batch (``k = index[row]``), ``x`` read in its own dtype and upcast in
   registers, ``A`` in the bank's dtype; split along ``in`` into partials (summed in
   order by the reader) when there are few programs. A row of index ``-1`` (or outside
   the bank) reads no adapter.
2. ``_expand_kernel``: ``y = result + t @ B_kᵀ`` per (row, token tile, output tile),
   accumulated in float32 on the base output read in its dtype, and for a DoRA entry
   ``c ⊙ (result − bias + t @ B_kᵀ) + bias`` with ``c = magnitude[k] / weight_norm[k]``;
   one rounding to the output dtype. A row of index ``-1`` gets ``result``; an index
   outside ``[-1, n)`` gives a NaN row (a kernel cannot raise).

Precision: both products run on tensor cores with ``input_precision="tf32x3"`` (each
float32 operand split into a TF32 head and a TF32 tail, three products), which is
float32-grade (about ``2⁻²¹`` per product) where plain TF32 is ``2⁻¹¹``; bf16/fp16 ``x``
is exact in TF32. Sums are float32, the partials summed in a fixed order, so the same
inputs give the same bits on every call. The term is thus within float32 accumulation
error of the float64 product, better than the dense path for bf16/fp16 banks (which
computes the term in the bank's dtype), and the output is rounded once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hqqlora import _decode
from hqqlora._base import base_forward, quant_layout
from hqqlora._triton import device_of

if TYPE_CHECKING:
    from hqqlora._bank import AdapterBank
    from hqqlora._base import HQQLinear, QuantLayout

try:  # Triton is optional: only CUDA prefill uses these kernels.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["eligible", "lora_prefill", "mixed_prefill", "prefill_config"]

_BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]  # Triton ships no types for its JIT
    def _shrink_kernel(  # type: ignore[no-untyped-def]  # Triton reads kernel annotations itself
        x_ptr,
        a_ptr,
        idx_ptr,
        scaling_ptr,
        t_ptr,
        L,
        K,
        R,
        n_bank,
        n_tb,
        n_rb,
        stride_a_bank,
        t_split_stride,
        r_pad,
        k_per_split,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Program (row of the batch, token tile, rank tile), the rank tile fastest: the
        # programs of one row are neighbours, so its A is read from HBM about once.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        rb = pid % n_rb
        tb = (pid // n_rb) % n_tb
        b = (pid // (n_rb * n_tb)).to(tl.int64)
        k_row = tl.load(idx_ptr + b)
        if (k_row >= 0) & (k_row < n_bank):  # no adapter: nothing to read, nothing written
            tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
            tok_ok = tok < L
            flat = b * L + tok
            r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = r < R
            a_row = a_ptr + k_row.to(tl.int64) * stride_a_bank
            acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            k_start = split * k_per_split
            for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < K
                xs = tl.load(
                    x_ptr + flat[:, None] * K + kk[None, :],
                    mask=tok_ok[:, None] & k_ok[None, :],
                    other=0,
                ).to(tl.float32)
                a = tl.load(  # (BLOCK_K, BLOCK_R): a tile of Aᵀ
                    a_row + r[None, :] * K + kk[:, None],
                    mask=k_ok[:, None] & r_ok[None, :],
                    other=0,
                ).to(tl.float32)
                acc = tl.dot(xs, a, acc, input_precision="tf32x3")
            s = tl.load(scaling_ptr + k_row).to(tl.float32)
            tl.store(
                t_ptr + split * t_split_stride + flat[:, None] * r_pad + r[None, :],
                acc * s,
                mask=tok_ok[:, None],
            )

    @triton.jit  # type: ignore[untyped-decorator]
    def _expand_kernel(  # type: ignore[no-untyped-def]
        t_ptr,
        b_ptr,
        idx_ptr,
        res_ptr,
        mag_ptr,
        norm_ptr,
        is_dora_ptr,
        bias_ptr,
        out_ptr,
        L,
        N,
        R,
        n_bank,
        n_tb,
        n_nb,
        splits,
        stride_b_bank,
        stride_mag,
        stride_norm,
        t_split_stride,
        r_pad,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        HAS_DORA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        # Program (row of the batch, token tile, output tile), the output tile fastest:
        # the programs of one row reuse its t tile and its B from the cache.
        pid = tl.program_id(0)
        nb = pid % n_nb
        tb = (pid // n_nb) % n_tb
        b = (pid // (n_nb * n_tb)).to(tl.int64)
        k_row = tl.load(idx_ptr + b)
        valid = (k_row >= 0) & (k_row < n_bank)
        k_safe = tl.where(valid, k_row, 0).to(tl.int64)
        tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_ok = tok < L
        flat = b * L + tok
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        ok = tok_ok[:, None] & n_ok[None, :]
        res = tl.load(res_ptr + flat[:, None] * N + n[None, :], mask=ok, other=0).to(tl.float32)
        term = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        if valid:
            b_row = b_ptr + k_safe * stride_b_bank
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < R
                t = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
                for s_i in range(splits):  # the shrink's partials, in order
                    t += tl.load(
                        t_ptr + s_i * t_split_stride + flat[:, None] * r_pad + r[None, :],
                        mask=tok_ok[:, None] & r_ok[None, :],
                        other=0,
                    )
                bt = tl.load(  # (BLOCK_R, BLOCK_N): a tile of Bᵀ
                    b_row + n[None, :] * R + r[:, None],
                    mask=r_ok[:, None] & n_ok[None, :],
                    other=0,
                ).to(tl.float32)
                term = tl.dot(t, bt, term, input_precision="tf32x3")
        y = res + term
        if HAS_DORA:  # noqa: SIM102 - Triton: a constexpr branch, then a runtime one
            if valid & (tl.load(is_dora_ptr + k_safe) != 0):
                mag = tl.load(mag_ptr + k_safe * stride_mag + n, mask=n_ok, other=1)
                nrm = tl.load(norm_ptr + k_safe * stride_norm + n, mask=n_ok, other=1)
                c = mag.to(tl.float32) / nrm.to(tl.float32)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + n, mask=n_ok, other=0).to(tl.float32)
                    y = ((res - bias[None, :]) + term) * c[None, :] + bias[None, :]
                else:
                    y = y * c[None, :]
        # An index outside [-1, n) reads nothing and makes its row NaN: loud, never a
        # plausible wrong row.
        bad = (k_row < -1) | (k_row >= n_bank)
        y = tl.where(bad, float("nan"), y)
        tl.store(out_ptr + flat[:, None] * N + n[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def eligible(x: Tensor, layout: QuantLayout, *held: Tensor | None) -> bool:
    """Whether a call may take the prefill kernels: :func:`hqqlora._decode.eligible`'s
    conditions without its row limit and its layout checks (these kernels read the
    base output, not the codes): CUDA, ``x`` in the layer's bf16/fp16 compute dtype,
    no autocast, no ``torch.func`` transform, no gradient wanted through ``x`` or
    ``held``, everything on ``x``'s device, at least one token."""
    if layout.compute_dtype not in (torch.float16, torch.bfloat16) or x.numel() == 0:
        return False
    return _decode.kernel_call_allowed(x, layout, *held)


# (shrink: tokens a tile, rank a tile, inputs a step, warps, stages;
#  expand: tokens a tile, outputs a tile, warps, stages) by (tokens per row, rank, in, out).
TUNED: dict[tuple[int, int, int, int], tuple[int, int, int, int, int, int, int, int, int]] = {}


def prefill_config(tokens: int, rank: int, k_in: int, n_out: int) -> tuple[int, ...]:
    """Launch configuration at ``tokens`` tokens per row, for a bank of rank ``rank``.

    The shrink takes 64 tokens a tile (32, then 16, for shorter rows), the rank in tiles
    of at most 64 (padded to a power of two ≥ 16: the tensor cores' smallest step), 64
    inputs a step (32 at ranks above 32). The expand takes 64 tokens a tile (down to 16
    for short rows) and 64 outputs, 4 warps. The best of ``benchmarks/tune_prefill.py``
    on an H100 at 64 rows × 128 tokens, 4096², r=16: 488 µs with HQQ's base matmul
    included, against 565 µs for 32-token shrink tiles and 128-output expand tiles.
    """
    key = (tokens, rank, k_in, n_out)
    if key in TUNED:
        return TUNED[key]
    block_r = min(64, max(16, triton.next_power_of_2(rank)))
    s_block_t = 64 if tokens >= 64 else (32 if tokens >= 32 else 16)
    block_k = 64 if block_r <= 32 else 32
    e_block_t = 64 if tokens >= 64 else (32 if tokens >= 32 else 16)
    return (s_block_t, block_r, block_k, 4, 3, e_block_t, 64, 4, 2)


SHRINK_PROGRAMS = 512
"""Shrink programs to reach by splitting ``in`` (at most 16 splits, each of 4 steps or more)."""


def _launch(
    x: Tensor,
    result: Tensor,
    index: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    is_dora: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    batch = index.shape[0]
    n_tokens, k_in = x.shape
    n_out = result.shape[1]
    tokens = n_tokens // batch
    n_bank, rank, _ = lora_A.shape
    s_block_t, block_r, block_k, s_warps, s_stages, e_block_t, block_n, e_warps, e_stages = (
        prefill_config(tokens, rank, k_in, n_out)
    )
    n_rb = triton.cdiv(rank, block_r)
    r_pad = n_rb * block_r
    s_tb = triton.cdiv(tokens, s_block_t)
    programs = batch * s_tb * n_rb
    k_steps = triton.cdiv(k_in, block_k)
    splits = 1
    while programs * splits < SHRINK_PROGRAMS and k_steps >= 8 * splits and splits < 16:
        splits *= 2
    k_per_split = triton.cdiv(k_steps, splits) * block_k
    splits = triton.cdiv(k_in, k_per_split)
    device = x.device
    t = torch.empty(splits * n_tokens * r_pad, dtype=torch.float32, device=device)
    _shrink_kernel[(programs, splits)](
        x, lora_A, index, scaling, t,
        tokens, k_in, rank, n_bank, s_tb, n_rb, lora_A.stride(0), n_tokens * r_pad, r_pad,
        k_per_split,
        BLOCK_T=s_block_t, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=s_warps, num_stages=s_stages,
    )  # fmt: skip
    out = torch.empty_like(result)
    e_tb = triton.cdiv(tokens, e_block_t)
    n_nb = triton.cdiv(n_out, block_n)
    has_dora = magnitude is not None
    dummy = out
    _expand_kernel[(batch * e_tb * n_nb,)](
        t, lora_B, index, result,
        magnitude if has_dora else dummy, weight_norm if has_dora else dummy,
        is_dora if has_dora else dummy, bias if bias is not None else dummy, out,
        tokens, n_out, rank, n_bank, e_tb, n_nb, splits, lora_B.stride(0),
        magnitude.stride(0) if magnitude is not None else 0,
        weight_norm.stride(0) if weight_norm is not None else 0,
        n_tokens * r_pad, r_pad,
        BLOCK_T=e_block_t, BLOCK_N=block_n, BLOCK_R=block_r,
        HAS_DORA=has_dora, HAS_BIAS=bias is not None,
        num_warps=e_warps, num_stages=e_stages,
    )  # fmt: skip
    return out


if triton is not None:

    @torch.library.custom_op("hqqlora::lora_prefill", mutates_args=())
    def _lora_prefill_op(
        x: Tensor,
        result: Tensor,
        index: Tensor,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: Tensor,
        magnitude: Tensor | None,
        weight_norm: Tensor | None,
        is_dora: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        with device_of(x):  # Triton launches on the current device
            return _launch(
                x, result, index, lora_A, lora_B, scaling, magnitude, weight_norm, is_dora, bias
            )

    @_lora_prefill_op.register_fake
    def _(x: Tensor, result: Tensor, *args: Any) -> Tensor:
        return torch.empty_like(result)


def lora_prefill(
    x: Tensor,
    result: Tensor,
    index: Tensor,
    /,
    *,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    magnitude: Tensor | None = None,
    weight_norm: Tensor | None = None,
    is_dora: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``result + s_k · x @ A_kᵀ @ B_kᵀ`` per row of the batch, DoRA rows rescaled.

    With ``k = index[i]`` for every token of row ``i``: ``y = result + term`` for a
    LoRA entry, ``c ⊙ (result − bias + term) + bias`` with ``c = magnitude[k] /
    weight_norm[k]`` for a DoRA entry (``is_dora[k]``), ``result`` for ``k = -1`` and
    NaN for ``k`` outside ``[-1, n)``. The callers check the inputs; this only lays
    them out. A custom op, so ``torch.compile(fullgraph=True)`` keeps it whole.

    Args:
        x: ``(batch, ..., in)`` in bf16/fp16, with at least one token.
        result: the base output ``(batch, ..., out)``, bias included.
        index: ``(batch,)`` int32/int64, one bank entry per row (``-1``: none).
        lora_A, lora_B: banks ``(n, r, in)`` and ``(n, out, r)`` in float32, bf16 or fp16.
        scaling: ``(n,)``.
        magnitude, weight_norm: DoRA's ``(n, out)`` ``m`` and ``n``, with ``is_dora``
            ``(n,)`` bool: which entries are DoRA.
        bias: the layer's ``(out,)`` bias, which ``result`` includes (read by DoRA rows).

    Returns:
        ``(batch, ..., out)`` in ``result``'s dtype.
    """
    k_in = x.shape[-1]
    flat = x.reshape(-1, k_in).contiguous()
    res = result.reshape(flat.shape[0], -1).contiguous()
    dora = magnitude is not None
    out: Tensor = _lora_prefill_op(
        flat, res, index.contiguous(), lora_A.contiguous(), lora_B.contiguous(),
        scaling.contiguous(),
        *(t.contiguous() if dora and t is not None else None
          for t in (magnitude, weight_norm, is_dora)),
        None if bias is None else bias.contiguous(),
    )  # fmt: skip
    return out.view(result.shape)


def mixed_prefill(
    x: Tensor, bank: AdapterBank, index: Tensor, base: HQQLinear, weight_norm: Tensor | None
) -> Tensor | None:
    """:func:`~hqqlora.mixed_batch_indexed`'s layer output through HQQ's base path and the
    prefill kernels, or ``None`` if they do not apply (:func:`eligible`, a bank dtype
    other than float32/bf16/fp16). ``weight_norm``: the checked ``(n, out)`` norms when
    the bank has a DoRA entry, else ``None``."""
    if triton is None or not x.is_cuda:  # the CPU's common case, before any other work
        return None
    layout = quant_layout(base)
    dora = any(bank.dora)
    held = (
        bank.lora_A,
        bank.lora_B,
        bank.scaling,
        bank.magnitude,
        bank.is_dora,
        base.bias,
        weight_norm,
    )
    if bank.lora_A.dtype not in _BANK_DTYPES or not eligible(x, layout, base.W_q, *held):
        return None
    result = base_forward(base, x, layout)
    return lora_prefill(
        x, result, index,
        lora_A=bank.lora_A, lora_B=bank.lora_B, scaling=bank.scaling,
        magnitude=bank.magnitude if dora else None, weight_norm=weight_norm if dora else None,
        is_dora=bank.is_dora if dora else None, bias=base.bias,
    )  # fmt: skip
