"""Decode kernels: a quantized layer and its adapters at a few tokens, in two launches.

At decode a layer multiplies a few rows of ``x`` by a weight it must read whole, so
its cost is the bytes it reads. Two Triton kernels (in :mod:`hqqlora._decode_kernels`;
this module picks their launches) read each of them once:

1. ``_shrink_kernel``: ``t[i] = x[i] @ A[k_i]ᵀ`` in float32, split along ``in`` (one
   partial per split, summed by the reader), ``x`` read in its own dtype and upcast in
   registers; each row reads its own adapter's ``A`` (rows that share an adapter hit
   the cache), so a bank is never copied per row. It also zeroes the second kernel's
   counters, so no memset runs. Under MODE 8 over a bank of several adapters above 16
   rows, and before the one-row tensor-core GEMV (:data:`GEMV`, one adapter or a bank),
   ``_bank_shrink_kernel`` instead: a program per row and slice of its adapter's rank,
   all of ``in`` in long contiguous runs, ``t`` whole (no partials); where
   :data:`GATHER_SIDE` takes it, it runs on a second stream beside the Gluon kernel,
   followed there by ``_bank_terms_kernel`` (each row's ``s_k · t[i] @ B[k_i]ᵀ`` into a
   float32 workspace, which the main kernel adds instead of computing the terms).
   Elsewhere (:data:`GATHER_FOLD`, where :func:`hqqlora._gluon_fold.supported` takes the
   call) no shrink kernel runs: the Gluon kernel of :mod:`hqqlora._gluon_fold` computes
   ``t``'s partials per K split in partitions of its own programs, beside the base term.
2. ``_main_kernel``: HQQ's packed codes, read in HQQ's own layout (one byte gives the
   output rows of all its slots), times ``x`` with float32 accumulation. Split along
   ``in``: each split writes its float32 partial and computes the adapter term
   ``s_k · t[i] @ B[k_i]ᵀ`` of its share of the rows, each row reading the column tile
   of its own B (at one token added to the partial; above, stored apart: 16 rows that
   share one adapter read its tile once and take one tensor-core dot, rows of several
   adapters a few at a time in one gathered load); the last split of each column tile
   (a counter) sums the partials in split order, adds the terms and writes
   ``c ⊙ (base + term) + bias`` in the output dtype (``c`` = DoRA's
   ``magnitude / weight_norm``, 1 for LoRA rows).

On Hopper and later the second kernel is a programmatic dependent launch: it starts
while the shrink kernel runs, reads the codes, and waits (``gdc_wait``) only before it
reads ``t`` or the counters (1 µs of 10 at one token on an H100).

Variants of the second kernel (``MODE``, per shape in :data:`TUNED`, else
:func:`decode_config`'s rule), all measured on an H100:

- 4, the default at one row: a CUDA-core GEMV. Codes become float32 by the exponent
  trick (``0x4B000000 | q`` read as float32 is ``2²³ + q``; minus ``2²³``, exact), no
  int-to-float conversion; 256 inputs a program in one step (a one-shot split-K).
  Per group, the scale and zero are applied to the partial sums,
  ``s · (Σ x·q − z · Σ x)``: the product with the unrounded ``(q − z)·s``.
- 5, the default at 2–16 rows: tensor cores with the operands swapped,
  ``codes @ xᵀ``, so the codes are the wide operand and the few rows of ``x`` the narrow
  one; codes become bf16 ``128 + q`` (fp16 ``1024 + q``) by the same trick, then ``q``
  by an exact subtraction (8-bit codes in bf16 are converted instead: ``128 + q`` is
  not exact above 127); scale and zero per group on the partial sums, as MODE 4.
- 6: HQQ's own weights dequantized in registers,
  ``(q − z)`` rounded to the compute dtype, then ``· s`` rounded (as HQQ's dense path
  and :mod:`hqqlora._triton` do), then ``w @ xᵀ`` on tensor cores with no per-group
  rescale of the accumulator (4–8% faster than MODE 5 at 64 rows).
- 7, the default at 17–64 rows: MODE 6's weights, computed in the compute dtype two at
  a time (packed bf16/fp16 instructions, a quarter fewer in the loop; the same bits):
  9–11% faster than MODE 6 at 64 rows.
- 8 (H100, 4-bit codes in groups of 64, per shape in :data:`TUNED_GLUON`): the base
  term is :mod:`hqqlora._gluon`'s kernel (HQQ's weights, MODE 7's arithmetic,
  dequantized straight into the tensor-core operand's registers), one float32 partial
  per K split; this kernel then adds the partials in order, the adapter terms, DoRA and
  the bias, a program per 16 rows (at one row the Gluon kernel does that itself); the
  Gluon kernel goes first there and the shrink kernel beside it (:data:`GLUON_FIRST`).
  Over a bank of several adapters above 16 rows (:data:`TUNED_GATHER`), its programs
  take 32 outputs (fewer above rank 16) and load each row's tile of B before they wait
  for the kernels before them, or (:data:`GATHER_SIDE`) add the terms that
  ``_bank_terms_kernel`` computed on a stream beside the Gluon kernel.
- 8 at one row through :mod:`hqqlora._gluon_gemv` (where :data:`GEMV` is on, per shape in
  :data:`TUNED_GEMV`): the base term on ``mma.sync`` with the weights and ``x`` both in
  registers (no shared memory), 16 outputs a warp per MMA tile, the row finished by its
  last split as the Gluon kernel does, after ``_bank_shrink_kernel`` (``t`` whole).
- 3: as 5 with ``x @ codesᵀ``; 0: every slot of the tile unpacked and reshaped in
  registers; 1: a program per slot; 2: a GEMV without the trick, with a register
  reshape. Slower on the H100 (``benchmarks/tune_decode.py``), kept for other GPUs'
  tuning.

In MODES 4–7 a program's K loop loads one step ahead (:data:`PREFETCH`, per shape in
:data:`TUNED`): Triton 3.6 pipelines the codes and ``x`` through shared memory itself
where a program takes several steps, but loads scale and zero in the step that uses
them, a round trip to memory per step; loading them (or everything) a step ahead took
4096×14336 at 64 rows from 80.8 to 69.4 µs and 4096² at 16 rows from 17.6 to 15.7 µs.

The result does not depend on the launch order (partials are summed in a fixed
order): the same inputs give the same bits on every call.

Precision: MODES 0–5's base product is exact up to float32 accumulation of exact
products (codes and bf16/fp16 ``x`` are exact in the compute dtype); against HQQ's dense
``x @ dequantize(W)ᵀ`` it differs by HQQ's two roundings of each weight (the dense
path rounds ``q − z`` and ``(q − z)·s`` to the compute dtype; these modes do not).
MODES 6, 7 and 8 multiply HQQ's rounded weights themselves: they differ from the dense path
only in the order of the float32 sums (HQQ keeps scale and zero in the compute dtype;
were they wider, MODE 7 would round both to it first and MODE 6 the scale only, each
within one rounding of the weight). The adapter term is computed in float32 from the
adapters' own values (a float32 adapter is not rounded to bf16); where 16 rows share an
adapter, its dot is TF32 three times (split operands, float32 accumulation: about
float32's precision, not its bits). One rounding to the output dtype at the end.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hqqlora._triton import device_of

if TYPE_CHECKING:
    from hqqlora._base import QuantLayout

try:  # Triton is optional: only CUDA decode uses these kernels.
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

from hqqlora import _gluon, _gluon_fold, _gluon_gemv

GLUON = _gluon.AVAILABLE
"""Whether MODE 8 (the Gluon base kernel) may run; set False to keep the Triton modes."""

__all__ = ["MAX_ROWS", "decode_config", "eligible", "gluon_config", "lora_decode", "supported"]

MAX_ROWS = 64
"""Rows (tokens) at most per call: the whole row block is one tile."""

PDL = os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True")
"""Whether the main kernel may use programmatic dependent launch on Hopper and later
(Triton's interpreter has no grid dependency control)."""

_SUPPORTED_PACKINGS = {"8bit_u8": (8, 1), "4bit_u8": (4, 2), "2bit_u8": (2, 4), "1bit_u8": (1, 8)}


if triton is not None:
    from hqqlora._decode_kernels import (
        _bank_shrink_kernel,
        _bank_terms_kernel,
        _main_kernel,
        _shrink_kernel,
    )


def supported(W_q: Tensor, layout: QuantLayout, rows: int) -> bool:
    """Whether the decode kernels handle this layer (and this many rows)."""
    if triton is None or not W_q.is_cuda or rows > MAX_ROWS or rows < 1:
        return False
    if layout.axis != 1 or layout.view_as_float or layout.packing not in _SUPPORTED_PACKINGS:
        return False
    if layout.compute_dtype not in (torch.float16, torch.bfloat16):
        return False
    _, per = _SUPPORTED_PACKINGS[layout.packing]
    out_features, in_features = layout.shape
    group = layout.group_size
    power_of_two = group >= 16 and group & (group - 1) == 0
    return out_features % per == 0 and in_features % group == 0 and power_of_two


def eligible(
    x: Tensor, W_q: Tensor, layout: QuantLayout, max_rows: int, *held: Tensor | None
) -> bool:
    """Whether a call may take the decode kernels: CUDA, a supported layer, at most
    ``max_rows`` rows of ``x`` in the compute dtype, no autocast, no ``torch.func``
    transform, and no gradient wanted through ``x`` or ``held`` (the kernels have no
    backward; callers pass every tensor the result depends on, the layer's bias
    included: HQQ's bias is a non-leaf that requires grad by default)."""
    if not kernel_call_allowed(x, layout, W_q, *held):
        return False
    rows = x.numel() // max(layout.in_features, 1)
    return rows <= max_rows and supported(W_q, layout, rows)


def kernel_call_allowed(x: Tensor, layout: QuantLayout, *held: Tensor | None) -> bool:
    """The conditions every Triton path shares: Triton, ``x`` on CUDA in the layer's
    compute dtype, no autocast, no ``torch.func`` transform, no gradient wanted through
    ``x`` or ``held``, and everything on ``x``'s device (else the dense path names the
    mismatch)."""
    if triton is None or not x.is_cuda or x.dtype != layout.compute_dtype:
        return False
    if (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    if torch.is_autocast_enabled("cuda"):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in held)
    ):
        return False
    return all(t is None or t.device == x.device for t in held)


# (packed rows per tile, groups per K step, K splits, warps, stages, MODE[, registers per
# thread at most (0: no cap)[, PREFETCH]]) by (out, in, codes per byte, rows): the best of
# benchmarks/tune_decode.py on an H100 (CUDA-graph timing, LoRA r=16, shrink included; at
# 64 rows one adapter read through an index, as a mixed batch whose rows share it); other
# shapes take decode_config's rule, fitted to these. 1024×4096 at one row: 4 outputs a
# program, all of K in one step, no split (``--modes deep``), 5.0 µs against the rule's 5.6
# (RESULTS.md, fifteenth pass); on 4096² the same kind of launch took 9.4 against 9.3.
TUNED: dict[tuple[int, int, int, int], tuple[int, ...]] = {
    (4096, 4096, 2, 1): (32, 4, 16, 4, 1, 4),
    (4096, 4096, 2, 16): (32, 1, 8, 4, 2, 5),
    (4096, 4096, 2, 64): (64, 1, 4, 8, 3, 7, 0, 1),
    (14336, 4096, 2, 1): (32, 4, 16, 4, 1, 4),
    (14336, 4096, 2, 16): (32, 1, 4, 4, 3, 5),
    (14336, 4096, 2, 64): (32, 1, 4, 4, 3, 7, 128, 1),
    (4096, 14336, 2, 1): (32, 2, 8, 4, 1, 4),
    (4096, 14336, 2, 16): (32, 1, 8, 4, 3, 5),
    (4096, 14336, 2, 64): (64, 1, 4, 8, 3, 7),
    (1024, 4096, 2, 1): (2, 64, 1, 8, 3, 4),
    (1024, 4096, 2, 16): (32, 1, 8, 4, 2, 5),
    (1024, 4096, 2, 64): (64, 1, 8, 8, 3, 7),
}

# (packed rows per program, K splits, warps, cp.async stages[, packed rows per program of
# the Triton kernel after it]) of the Gluon base kernel (MODE 8, :mod:`hqqlora._gluon`)
# by (out, in, rows), the best of ``benchmarks/tune_decode.py --modes m8`` on an H100
# (``ab_decode.py --flag EPILOGUE_BLOCK_P`` for the 5th entry); the 16- and 64-row entries
# of 4096², 4096×14336 at 16 and 1024×4096 at 64 re-measured with the Gluon kernel first
# (GLUON_FIRST; RESULTS.md, ninth pass); 1024×4096 at 16 and 64 rows and 4096×14336 at 64
# from a sweep that adds programs of 4 warps (one warpgroup; ``--warps 4 8``, eleventh
# pass). Other shapes take :func:`gluon_config`'s rule. Rows where the Triton modes
# measured faster map to ``None``.
TUNED_GLUON: dict[tuple[int, int, int], tuple[int, ...] | None] = {
    (1024, 4096, 1): None,
    (1024, 4096, 16): (32, 8, 4, 3),
    (1024, 4096, 64): (32, 4, 4, 3),
    (4096, 4096, 1): None,
    (4096, 4096, 16): (64, 8, 8, 3),
    (4096, 4096, 64): (64, 4, 8, 4),
    (4096, 14336, 1): (128, 16, 8, 3),
    (4096, 14336, 16): (64, 8, 8, 3),
    (4096, 14336, 64): (32, 4, 4, 3),
    (14336, 4096, 1): (128, 4, 8, 3),
    (14336, 4096, 16): (64, 4, 8, 3),
    (14336, 4096, 64): (128, 2, 8, 3),
}

# The same (four fields: the Triton kernel's tile is GATHER_BLOCK_P's) for rows of a bank's
# several adapters above 16 rows (MODE 8 with the bank's shrink kernel, ``GATHER_GLUON``):
# the best on an H100 of the 64-row launches swept over a bank of 64 float32 adapters, one
# per row (``tune_decode.py --modes m8 --bank 64 --tokens 64``), in the order GATHER_SIDE
# takes for the shape (14336×4096: the adapter kernels beside the Gluon kernel; the others:
# the shrink kernel first, each row's tile of B gathered by the Triton kernel), programs
# of 4 and 8 warps (``--warps 4 8``; RESULTS.md, eleventh pass); other shapes take
# :func:`gluon_config`'s rule.
TUNED_GATHER: dict[tuple[int, int, int], tuple[int, ...] | None] = {
    (1024, 4096, 64): (64, 8, 4, 3),
    (4096, 4096, 64): (64, 4, 8, 4),
    (14336, 4096, 64): (64, 2, 4, 3),
    (4096, 14336, 64): (64, 4, 4, 3),
}

EPILOGUE_WARPS = 4
"""Warps of MODE 8's Triton kernel (adapter terms and the sums, 16 rows a program)."""

FINISH_ROWS = 1
"""Rows at most that MODE 8's Gluon kernel finishes itself (its last split of each tile;
never rows that gather a bank above 16 rows); above, a Triton kernel adds the adapter
terms, 16 rows a program. The Gluon kernel can finish up to 16 rows, but its one program
a tile is then the tail: on an H100, one row 22.2 against 26.6 µs (14336×4096), 16 rows
35.8 against 15.0 (4096²). A finish of 16 rows at once (every load before its store, t
summed once) was faster only at 4096×14336 (29.5 against 30.9 µs at 16 rows): 4096² 14.9
against 14.7, 14336×4096 35.3 against 30.4, 4096² with 16 rows of 16 adapters 47.1
against 24.4 (``benchmarks/RESULTS.md``, eighth pass)."""

GLUON_FIRST = True
"""Whether MODE 8, where a Triton kernel finishes (more than ``FINISH_ROWS`` rows that
gather no bank), launches the Gluon kernel first and the shrink kernel beside it
(programmatic dependent launch; the shrink kernel finishes after it), rather than the
Gluon kernel beside the shrink kernel. Launched second, the Gluon kernel's CTAs go where
the shrink kernel leaves room, two or three to an SM where they are small: on an H100,
4096² at 16 rows with (64, 8, 8, 3), 17.7 µs that way against 11.9 first
(``benchmarks/RESULTS.md``, ninth pass). One row (the Gluon kernel finishes, after the
shrink kernel has zeroed its counters) and a gathered bank keep the shrink kernel first
(or, there, :data:`GATHER_SIDE` puts the adapter kernels on a second stream)."""

EPILOGUE_BLOCK_P = 64
"""Packed rows a program of MODE 8's Triton kernel takes (64: 128 outputs at 4 bits)."""

BANK_SHRINK_ROWS = 17
"""Rows at least (a bank gathers from 17 rows, so lower values act as 17) from which MODE 8
over a bank of several adapters (``GATHER_GLUON``) takes ``_bank_shrink_kernel`` (a
program per row and a slice of its adapter's ``A``, all of K, no partials). The Triton
modes keep ``_shrink_kernel``, whose fewer programs leave room for the main kernel's long
K loop beside them (4096×14336 at 64 rows over 64 adapters, on an H100: 76.2 µs against
87.2 with the bank's kernel). (The one-row tensor-core GEMV takes ``_bank_shrink_kernel``
at any row count it runs, with or without a bank: :data:`GEMV`.)"""

BANK_SHRINK_PROGRAMS = 512
"""Programs at most of ``_bank_shrink_kernel`` (rows of ``A`` a program are doubled until
they fit)."""

BANK_SHRINK_FLOATS = 4096
"""Floats of ``A`` a program of ``_bank_shrink_kernel`` loads per step."""

GATHER_GLUON = True
"""Whether a bank of several adapters at more than 16 rows may take MODE 8 (the Gluon base
kernel), its Triton kernel loading each row's tile of B before it waits for the base."""

GATHER_SIDE = 2
"""Where MODE 8 over a bank above 16 rows runs its adapter kernels on a second stream,
beside the Gluon kernel (``_bank_shrink_kernel``, then ``_bank_terms_kernel`` writing the
terms to ``lt``; the Triton kernel after both adds the partials, the terms, DoRA and the
bias): 0 nowhere, 1 everywhere, 2 on layers with more outputs than inputs. Elsewhere the
shrink is folded into the Gluon kernel (:data:`GATHER_FOLD`) or, where that kernel does not
take the call, the shrink kernel runs first and the Gluon kernel beside it; either way the
Triton kernel computes the terms, loading each row's tile of B before it waits. On an
H100, 64 rows over 64 float32 adapters of rank 16 (graph µs, best Gluon launch each way,
before GATHER_FOLD): 14336×4096 61.0 beside
against 67.0; 4096² 27.3 against 25.5, 4096×14336 66.9 against 64.5, 1024×4096 11.7
against 11.8 (``benchmarks/RESULTS.md``, tenth pass). Beside it, the adapters' reads slow
the Gluon kernel's K loop (4096²: 12 µs alone, 23 beside them); they pay where B, read
after the Gluon kernel otherwise, is the larger of the two adapter matrices."""

GATHER_FOLD = True
"""Whether MODE 8 over a bank above 16 rows, where :data:`GATHER_SIDE` keeps the adapter
kernels on the main stream, folds the bank's shrink into the Gluon kernel
(:mod:`hqqlora._gluon_fold`: one warp-specialized kernel whose programs run the base term
and the shrink of their tile's rows side by side; launch per shape in :data:`TUNED_FOLD`)
instead of running ``_bank_shrink_kernel`` and the Gluon kernel one beside the other."""

FOLD_ONE = True
"""Whether MODE 8 over rows that gather no bank (one adapter, a bank of one read through an
index, or a bank's several adapters at up to 16 rows), where a Triton kernel finishes
(more than :data:`FINISH_ROWS` rows), folds the shrink into the Gluon kernel as
:data:`GATHER_FOLD` does for a bank above 16 rows, instead of launching the shrink kernel
beside the Gluon kernel (:data:`GLUON_FIRST`): only on the shapes and row counts of
:data:`TUNED_FOLD_ONE`."""

# (packed rows per program, K splits, stages) of the folded kernel (GATHER_FOLD) by (out,
# in, rows): the best of an in-layer sweep on an H100 (64 rows over 64 float32 adapters of
# rank 16, graph µs; RESULTS.md, thirteenth pass): 4096² 24.2 against 26.0 unfolded,
# 4096×14336 55.2 against 58.5, 1024×4096 10.4 against 11.6. Other shapes take the
# TUNED_GATHER entry's split and stages (packed rows at most 64).
TUNED_FOLD: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (4096, 4096, 64): (64, 4, 3),
    (4096, 14336, 64): (64, 4, 3),
    (1024, 4096, 64): (32, 8, 4),
}

# The same for rows that gather no bank (FOLD_ONE), where the fold measured faster than the
# shrink kernel beside the Gluon kernel both in the in-layer sweep (``tune_fold.py --rows 16
# --bank 0`` and ``--rows 64 --bank 1``) and in the A/B after it (``ab_decode.py --flag
# FOLD_ONE 0 1 --tokens 16 64 --bank 1 --rounds 3``), H100, graph µs: 64 rows of a bank of
# one, 4096×14336 38.2 against 49.9, 1024×4096 10.7 against 11.7. Elsewhere it lost, tied
# or changed sides between the two runs (14336×4096 at 64 rows 42.4 / 44.6 then 42.9 /
# 41.3; 1024×4096 at 16 rows 8.1 / 8.5 then 8.4 / 8.4), and shapes and row counts not
# here are not folded (RESULTS.md, fourteenth pass).
TUNED_FOLD_ONE: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (4096, 14336, 64): (64, 4, 3),
    (1024, 4096, 64): (32, 8, 3),
}

GEMV = True
"""Whether one row on an H100 (4-bit codes in groups of 64) may take the tensor-core GEMV of
:mod:`hqqlora._gluon_gemv` (``mma.sync`` on operands in registers, no shared memory) as its
base kernel, finishing the row itself, after the whole-K shrink kernel: only on the shapes
of :data:`TUNED_GEMV` (RESULTS.md, sixteenth pass)."""

# (packed rows per program, K splits, warps) of the tensor-core GEMV (GEMV) by (out, in,
# rows): the best of a sweep through the library's path (LoRA r=16 float32, one adapter,
# ``benchmarks/ab_gemv.py --sweep``), then in turn with GEMV off, on an H100 (graph µs):
# 4096² 8.75 against 9.29, 14336×4096 20.46 against 21.89. 1024×4096 (the variant's K loop
# 5.40 against 3.46 for the base term) and more rows (4096² at 8 rows, 10.29 against 9.21)
# were slower, so not here (RESULTS.md, fifteenth and sixteenth passes).
TUNED_GEMV: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (4096, 4096, 1): (32, 8, 4),
    (14336, 4096, 1): (8, 4, 1),
}

GATHER_MAX_RANK = 128
"""Rank at most (padded) of a bank that MODE 8 gathers above 16 rows; larger ranks keep the
Triton modes (sm_90, offline: 174 registers a thread at rank 128, spills at 512)."""

GATHER_BLOCK_P = 16
"""Packed rows a program of MODE 8's Triton kernel takes where its rows gather several
adapters of rank up to 16 (each program reads 16 rows' tiles of B: narrower tiles, more
programs; halved with each doubling of the rank above 16)."""

SHRINK_ROWS = 4
"""Rows of ``x`` per shrink program (more rows, fewer programs but larger register tiles)."""

DOT_ROWS = 16
"""Rows of adapter terms a tensor-core dot takes at once where they share one adapter
(splits of fewer rows read each row's own tile of B)."""

TERM_FLOATS = 16384
"""Floats at most in one gathered tile of B (rows of several adapters)."""

SHRINK_PROGRAMS = 256
"""Shrink programs at most (splits along ``in`` are halved until they fit)."""

PREFETCH = 2
"""What the main kernel's K loop loads one step ahead, before this step's arithmetic: 0
nothing, 1 scale and zero, 2 the codes and ``x`` too. Triton pipelines the codes and ``x``
through shared memory itself where it can (multi-step loops), never scale and zero."""


def decode_config(n_out: int, k_in: int, per: int, group: int, rows: int) -> tuple[int, ...]:
    """Launch configuration for a layer of ``n_out × k_in`` at ``rows`` rows.

    One row: MODE 4, 64 outputs a tile, 256 inputs a step, up to 16 splits (one step a
    program where the shape allows). Up to 16 rows: MODE 5, 64 outputs a tile, one group
    a step, splits while the programs stay at most 1024. More rows: MODE 7, 128 outputs
    a tile, splits while the programs stay at most 256.
    """
    key = (n_out, k_in, per, rows)
    if key in TUNED:
        return TUNED[key]
    groups = k_in // group
    if rows == 1:
        block_p, gps, mode, programs = max(1, 64 // per), max(1, 256 // group), 4, 1 << 30
        while gps > 1 and groups % gps:
            gps //= 2
    elif rows <= 16:
        block_p, gps, mode, programs = max(1, 64 // per), 1, 5, 1024
    else:
        block_p, gps, mode, programs = max(1, 128 // per), 1, 7, 256
    steps = groups // gps
    tiles = -(-(n_out // per) // block_p)
    split = 1
    if rows == 1:
        while tiles * split < programs and steps % (split * 2) == 0 and split < 16:
            split *= 2
    else:
        while tiles * split * 2 <= programs and steps % (split * 2) == 0 and split < 16:
            split *= 2
    return (block_p, gps, split, 4, 1 if mode == 4 else 3, mode)


def gluon_config(
    n_out: int, k_in: int, rows: int, gathered: bool = False
) -> tuple[int, ...] | None:
    """The Gluon base kernel's launch for a 4-bit, group-64 layer of ``n_out × k_in`` at
    ``rows`` rows, or ``None`` where the Triton modes are the faster: per shape in
    :data:`TUNED_GLUON` (:data:`TUNED_GATHER` where ``gathered``: rows of a bank's several
    adapters, above 16 rows), else (the sweeps' pattern) ``None`` at one row and at 2–16
    rows of layers under 4096×4096, otherwise 64 packed rows (128 outputs) a program, 8
    warps, 3 stages, and K splits until the programs are at least 128 (at most 8, 2 steps
    each)."""
    key = (n_out, k_in, rows)
    table = TUNED_GATHER if gathered else TUNED_GLUON
    if key in table:
        return table[key]
    if rows == 1 or (rows <= 16 and n_out * k_in < 4096 * 4096):
        return None
    block_p, steps = 64, k_in // 64
    tiles = n_out // 2 // block_p
    split = 1
    while tiles * split < 128 and split < 8 and steps % (split * 2) == 0 and steps >= split * 4:
        split *= 2
    return (block_p, split, 8, 3)


def fold_config(
    n_out: int, k_in: int, rows: int, gathered: bool = True
) -> tuple[int, int, int] | None:
    """The folded kernel's launch, or ``None``: for rows of a bank's several adapters
    above 16 rows (``gathered``, :data:`GATHER_FOLD`) per shape in :data:`TUNED_FOLD`,
    else the gathered Gluon launch's split and stages with at most 64 packed rows; for
    other rows (:data:`FOLD_ONE`) the :data:`TUNED_FOLD_ONE` entry only."""
    key = (n_out, k_in, rows)
    if not gathered:
        return TUNED_FOLD_ONE.get(key)
    if key in TUNED_FOLD:
        return TUNED_FOLD[key]
    base = gluon_config(n_out, k_in, rows, gathered=True)
    if base is None:
        return None
    return (min(64, base[0]), base[1], base[3])


def _launch(
    x: Tensor,
    W_q: Tensor,
    scale: Tensor,
    zero: Tensor,
    meta: list[int],
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    scaling: Tensor | None,
    index: Tensor | None,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    is_dora: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    bits, per, group, n_out, k_in = meta
    rows = x.shape[0]
    config = decode_config(n_out, k_in, per, group, rows)
    # MODE 8 where the Gluon kernel applies, unless TUNED names a Triton mode for this
    # shape and TUNED_GLUON nothing. A bank of several adapters at more than DOT_ROWS rows
    # (``gathers``) has its own table and shrink kernel (GATHER_GLUON).
    base = None
    tuned_triton = (n_out, k_in, per, rows) in TUNED and (n_out, k_in, rows) not in TUNED_GLUON
    bank_size = lora_A.shape[0] if lora_A is not None and lora_A.ndim == 3 else 1
    gathers = index is not None and bank_size > 1 and rows > DOT_ROWS
    if gathers and lora_A is not None and lora_A.shape[-2] > GATHER_MAX_RANK:
        gathers_in_mode8 = False  # 16 rows' tiles of B would not fit in registers
    else:
        gathers_in_mode8 = GATHER_GLUON
    gemv = None
    if GLUON and _gluon.supported(x, W_q, scale, zero, meta):
        if gathers and gathers_in_mode8:
            base = gluon_config(n_out, k_in, rows, gathered=True)
        elif not gathers and rows <= FINISH_ROWS and GEMV and (n_out, k_in, rows) in TUNED_GEMV:
            gemv = TUNED_GEMV[(n_out, k_in, rows)]
            if _gluon_gemv.fits(rows, n_out, k_in, *gemv):
                base = (gemv[0], gemv[1], gemv[2], 0)  # (stages: none)
            else:
                gemv = None
                base = None if tuned_triton else gluon_config(n_out, k_in, rows)
        elif not gathers and not tuned_triton:
            base = gluon_config(n_out, k_in, rows)
    # MODE 8 over a bank above 16 rows runs its own adapter kernels: on a stream beside
    # the Gluon kernel (GATHER_SIDE's rule), else folded into it (GATHER_FOLD) where the
    # folded kernel takes the call, else the bank's shrink kernel first. The fold's split
    # sets the base's.
    bank_kernels = lora_A is not None and gathers and base is not None and rows >= BANK_SHRINK_ROWS
    side_rule = GATHER_SIDE == 1 or (GATHER_SIDE == 2 and n_out > k_in)
    # With one adapter (FOLD_ONE) the shrink may be folded in too, where a Triton kernel
    # finishes.
    fold_one = FOLD_ONE and lora_A is not None and base is not None and not gathers
    fold_one = fold_one and rows > FINISH_ROWS
    fold = None
    if (bank_kernels and not side_rule and GATHER_FOLD) or fold_one:
        assert lora_A is not None and base is not None
        fold = fold_config(n_out, k_in, rows, gathered=not fold_one)
        fold_r = max(16, triton.next_power_of_2(lora_A.shape[-2]))
        # (The shrink partition reads x and each A[k] as rows of k_in contiguous values.)
        contiguous = x.is_contiguous() and lora_A.stride(-1) == 1 and lora_A.stride(-2) == k_in
        # (base: the Gluon kernel takes the call, so the folded one's own conditions.)
        if fold is not None and contiguous and _gluon_fold.fits(meta, fold_r, fold[1], fold[0]):
            base = (fold[0], fold[1], 4, fold[2], *base[4:])
        else:
            fold = None
    if base is not None:
        # MODE 8: the Gluon kernel's base term; this kernel's programs each finish a tile
        # of outputs for 16 rows (adapter terms, the base's partials, DoRA, bias).
        epilogue_p = base[4] if len(base) > 4 else EPILOGUE_BLOCK_P
        if gathers and lora_A is not None:
            # Each program holds 16 rows' tiles of B in registers: fewer outputs a program
            # above rank 16 (GATHER_BLOCK_P is for rank 16).
            rank_slots = max(16, triton.next_power_of_2(lora_A.shape[-2]))
            epilogue_p = max(1, GATHER_BLOCK_P * 16 // rank_slots)
        config = (epilogue_p, 1, triton.cdiv(rows, DOT_ROWS), EPILOGUE_WARPS, 1, 8)
    block_p, gps, split, warps, stages, mode = config[:6]
    # A 7th entry caps the main kernel's registers per thread (more programs resident; 0:
    # no cap), an 8th sets PREFETCH for this shape.
    limits = {"maxnreg": config[6]} if len(config) > 6 and config[6] else {}
    prefetch = config[7] if len(config) > 7 else PREFETCH
    if mode in (2, 4) and rows != 1:  # the GEMVs take one row; the default above
        mode = 5
    block_m = 1 if mode in (2, 4) else max(16, triton.next_power_of_2(rows))
    if mode == 8:
        block_m = DOT_ROWS
    if mode == 5:
        gps = 1  # one group a step
    while gps > 1 and (k_in // group) % gps:
        gps //= 2
    steps = k_in // (group * gps)
    while split > 1 and steps % split and mode != 8:
        split //= 2
    tiles = triton.cdiv(n_out // per, block_p) * (per if mode == 1 else 1)
    device = x.device
    out = torch.empty(rows, n_out, dtype=out_dtype, device=device)
    if base is not None:
        ws = torch.empty(base[1] * rows * n_out, dtype=torch.float32, device=device)
    else:
        ws = torch.empty(
            split * block_m * n_out if split > 1 else 1, dtype=torch.float32, device=device
        )
    # The Gluon kernel's counters (one row) share the buffer.
    tiles_counted = tiles if base is None else max(tiles, n_out // 2 // base[0])
    counts = torch.empty(tiles_counted, dtype=torch.int32, device=device)
    has_lora = lora_A is not None
    has_idx = index is not None
    # Programmatic dependent launch (Hopper on): the main kernel starts while the shrink
    # kernel runs and waits for it only before the adapter term.
    pdl = has_lora and PDL and torch.cuda.get_device_capability(device)[0] >= 9
    n_bank = lora_A.shape[0] if lora_A is not None and lora_A.ndim == 3 else 1
    dummy = out
    lt = dummy  # adapter terms stored apart, where a kernel below writes them
    # MODE 8 with a Triton kernel after it: the Gluon kernel first, the shrink beside it.
    # The Triton kernel waits for the shrink kernel only; the shrink kernel waits for the
    # Gluon kernel before it ends, so the Gluon kernel's partials are written by then.
    gluon_first = GLUON_FIRST and pdl and base is not None and not gathers and rows > FINISH_ROWS
    gluon_first = gluon_first and fold is None
    # MODE 8 over a bank above 16 rows: the adapter kernels on a stream beside the Gluon
    # kernel's (GATHER_SIDE).
    side = bank_kernels and side_rule
    shrink = None
    if has_lora:
        assert lora_A is not None and lora_B is not None and scaling is not None
        rank = lora_A.shape[-2]
        block_r = max(16, triton.next_power_of_2(rank))
    # A bank gathered by its rows, or the tensor-core GEMV (which finishes its rows, so
    # its finish reads ``t`` whole and adds no splits of it: a sum across threads that,
    # compiled for sm_90, held the finish's other loads back; RESULTS.md, sixteenth pass):
    # the whole-K shrink, a program per row and slice of its adapter's rank.
    whole_t = (gathers and rows >= BANK_SHRINK_ROWS) or gemv is not None
    if has_lora and base is not None and whole_t:
        assert lora_A is not None
        r_per = 1
        while r_per < block_r and rows * triton.cdiv(rank, r_per) > BANK_SHRINK_PROGRAMS:
            r_per *= 2
        parts = triton.cdiv(rank, r_per)
        t_splits = 1 if fold is None else fold[1]
        t = torch.empty(t_splits * rows * block_r, dtype=torch.float32, device=device)
        # Counters to zero only for the GEMV's finish (gathered rows never finish in the
        # Gluon kernel). Folded (GATHER_FOLD), the Gluon kernel writes t's partials, a
        # split each.
        n_counts = tiles_counted if gemv is not None else 0
        if n_counts > rows * parts * 1024:
            counts.zero_()
        if fold is None:
            shrink = functools.partial(
                _bank_shrink_kernel[(rows, parts)],
                x, lora_A, index if has_idx else x, t, counts, n_counts, k_in, rank,
                lora_A.stride(0) if lora_A.ndim == 3 else 0, n_bank,
                R_PER=r_per, BLOCK_R=block_r,
                BLOCK_K=min(triton.next_power_of_2(k_in), max(128, BANK_SHRINK_FLOATS // r_per)),
                USE_PDL=pdl, HAS_IDX=has_idx, num_warps=4,
            )  # fmt: skip
            if not side:
                shrink()
    elif has_lora and fold is not None:
        t_splits = fold[1]  # the folded kernel writes t's partials, a split each
        t = torch.empty(t_splits * rows * block_r, dtype=torch.float32, device=device)
    elif has_lora:
        assert lora_A is not None
        t_block_m = min(SHRINK_ROWS, triton.next_power_of_2(rows))
        t_block_k = 64 if block_r * t_block_m <= 256 else 32
        k_chunks = triton.cdiv(k_in, t_block_k)
        t_splits = min(64, k_chunks)
        while t_splits > 1 and triton.cdiv(rows, t_block_m) * t_splits > SHRINK_PROGRAMS:
            t_splits //= 2
        k_per_split = triton.cdiv(k_chunks, t_splits) * t_block_k
        t_splits = triton.cdiv(k_in, k_per_split)
        t = torch.empty(t_splits * rows * block_r, dtype=torch.float32, device=device)
        if tiles_counted > triton.cdiv(rows, t_block_m) * t_splits * 1024:
            counts.zero_()
        shrink = functools.partial(
            _shrink_kernel[(triton.cdiv(rows, t_block_m), t_splits)],
            x, lora_A, index if has_idx else x, t, counts, tiles_counted, rows, k_in, rank,
            lora_A.stride(0) if lora_A.ndim == 3 else 0, k_per_split, n_bank,
            HAS_IDX=has_idx, BLOCK_M=t_block_m, BLOCK_R=block_r, BLOCK_K=t_block_k,
            USE_PDL=pdl, WAIT_AFTER=gluon_first, num_warps=4, launch_pdl=gluon_first,
        )  # fmt: skip
        if not gluon_first:
            shrink()
    else:
        rank, block_r, t_splits, t = 0, 16, 1, dummy
        # (MODE 8's splits share out rows and use no counter; its finish, up to
        # FINISH_ROWS rows that gather no bank, does.)
        if (split > 1 and base is None) or (base is not None and rows <= FINISH_ROWS):
            counts.zero_()
    has_dora = magnitude is not None
    if base is not None:
        # Up to FINISH_ROWS rows that gather no bank: the Gluon kernel's last split of each
        # tile finishes the rows itself (adapter terms, DoRA, bias), and no Triton kernel
        # follows.
        finish = None
        if rows <= FINISH_ROWS and not gathers:
            finish = dict(
                HAS_LORA=has_lora, HAS_IDX=has_idx, HAS_DORA=has_dora, HAS_BIAS=bias is not None,
                BLOCK_R=block_r, T_SPLITS=triton.next_power_of_2(t_splits),
            )  # fmt: skip
        tail = (
            t, lora_B if has_lora else dummy, index if has_idx else dummy,
            scaling if has_lora else dummy, magnitude if has_dora else dummy,
            weight_norm if has_dora else dummy,
            is_dora if has_dora and has_idx and is_dora is not None else dummy,
            bias if bias is not None else dummy, out, rank, t_splits,
            lora_B.stride(0) if has_lora and lora_B is not None and lora_B.ndim == 3 else 0,
            magnitude.stride(0) if has_dora and magnitude is not None and magnitude.ndim == 2 else 0,
            n_bank,
        )  # fmt: skip
        block_p_base, base_split, base_warps, base_stages = base[:4]
        if side:
            assert shrink is not None and lora_B is not None and scaling is not None
            lt = torch.empty(rows, n_out, dtype=torch.float32, device=device)
            terms = functools.partial(
                _bank_terms_kernel[(triton.cdiv(n_out, block_p * per), triton.cdiv(rows, DOT_ROWS))],
                t, lora_B, index, scaling, lt, rows, n_out, rank, lora_B.stride(0), n_bank,
                BLOCK_N=block_p * per, BLOCK_M=DOT_ROWS, BLOCK_R=block_r, USE_PDL=pdl,
                num_warps=4, launch_pdl=pdl,
            )  # fmt: skip
            beside = _Beside(device)  # forks here: before the Gluon kernel
        try:
            if fold is not None:
                assert lora_A is not None
                _gluon_fold.fold_partials(
                    x, W_q, scale, zero, meta, ws, lora_A, index, t, block_p=block_p_base,
                    split=base_split, stages=base_stages, block_r=block_r,
                    launch_dependents=pdl,
                )  # fmt: skip
            elif gemv is not None:
                _gluon_gemv.gemv_partials(
                    x, W_q, scale, zero, meta, ws, counts, tail, block_p=block_p_base,
                    split=base_split, warps=base_warps, after_shrink=pdl and not side,
                    finish=finish,
                )  # fmt: skip
            else:
                _gluon.base_partials(
                    x, W_q, scale, zero, meta, ws, counts, tail, block_p=block_p_base,
                    split=base_split, warps=base_warps, stages=base_stages,
                    after_shrink=pdl and not gluon_first and not side, finish=finish,
                    before_shrink=gluon_first,
                )  # fmt: skip
        except BaseException:
            if side:
                beside.join()  # a capture would otherwise end on the unjoined stream's error
            raise
        if gluon_first:
            assert shrink is not None
            shrink()
        if side:
            assert shrink is not None
            with beside:
                shrink()
                terms()
        if finish is not None:
            return out
    # MODE 3/5/7's exponent trick: bf16 holds 128 + q exactly for q < 128, fp16 1024 + q.
    magic, offset = 0, 0.0
    if mode in (3, 5, 7) and x.dtype == torch.float16:
        magic, offset = 0x6400, 1024.0
    elif mode in (3, 5, 7) and bits < 8:
        magic, offset = 0x4300, 128.0
    rows_per_split = min(rows, DOT_ROWS) if mode == 8 else triton.cdiv(rows, split)
    # Rows of adapter terms at a time: a gathered (rows, outputs, rank) tile of B of at
    # most TERM_FLOATS floats.
    nb = block_p * (1 if mode == 1 else per)
    term_rows = min(triton.next_power_of_2(rows_per_split), max(1, TERM_FLOATS // (nb * block_r)))
    if has_lora and block_m > 1 and not (mode == 8 and gathers):
        lt = torch.empty(rows, n_out, dtype=torch.float32, device=device)
    _main_kernel[(tiles, split)](
        x, W_q, scale, zero,
        t, lora_B if has_lora else dummy, index if has_idx else dummy,
        scaling if has_lora else dummy,
        magnitude if has_dora else dummy, weight_norm if has_dora else dummy,
        is_dora if has_dora and has_idx and is_dora is not None else dummy, bias if bias is not None else dummy,
        ws, lt, counts, out,
        rows, n_out, k_in, n_out // per, rank, t_splits, steps // split,
        lora_B.stride(0) if has_lora and lora_B is not None and lora_B.ndim == 3 else 0,
        magnitude.stride(0) if has_dora and magnitude is not None and magnitude.ndim == 2 else 0,
        n_bank,
        BITS=bits, PER=per, GROUP=group, GPS=gps, BLOCK_M=block_m, BLOCK_P=block_p,
        BLOCK_R=block_r, SPLIT_K=split, ROWS_PER_SPLIT=rows_per_split, TERM_ROWS=term_rows,
        DOT_ROWS=DOT_ROWS if rows_per_split >= DOT_ROWS and nb >= 16 else 0,
        T_SPLITS=triton.next_power_of_2(t_splits),
        HAS_LORA=has_lora, HAS_IDX=has_idx, HAS_DORA=has_dora, HAS_BIAS=bias is not None,
        MODE=mode, BASE_SPLITS=base[1] if base is not None else 0,
        GATHER_EARLY=mode == 8 and gathers,
        PREFETCH=prefetch if steps // split > 1 and mode != 8 else 0,
        MAGIC=magic, OFFSET=offset, USE_PDL=pdl and not side, TERMS_READY=side,
        num_warps=warps, num_stages=stages, launch_pdl=pdl and not side, **limits,
    )  # fmt: skip
    return out


class _Beside:
    """A fork of the current CUDA stream where it is made, joined again when the ``with``
    block ends: kernels launched inside run on a stream of PyTorch's pool, beside what the
    current stream runs after the fork (CUDA graphs capture the two branches). Tensors made
    before the fork may be used inside; the join comes before anything after the block can
    free them. On other devices (Triton's interpreter) the block runs in order.

    The pool hands its streams out in turn, to other callers too: the second stream is
    never the current one (a capture's stream comes from the same pool), but it may be
    one that other code also uses, and then the join waits for that code's work too."""

    def __init__(self, device: torch.device) -> None:
        self.main: torch.cuda.Stream | None = None
        self.side: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self.main = torch.cuda.current_stream(device)
            self.side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # torch's Stream.__new__ is unannotated
            if self.side == self.main:  # the pool's next stream is another one
                self.side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            self.side.wait_stream(self.main)

    def __enter__(self) -> None:
        if self.side is not None:
            torch.cuda.set_stream(self.side)

    def __exit__(self, *exc: object) -> None:
        if self.main is not None:
            torch.cuda.set_stream(self.main)
        self.join()

    def join(self) -> None:
        """The current stream waits for everything launched on the second one."""
        if self.main is not None and self.side is not None:
            self.main.wait_stream(self.side)


if triton is not None:

    @torch.library.custom_op("hqqlora::lora_decode", mutates_args=())
    def _lora_decode_op(
        x: Tensor,
        W_q: Tensor,
        scale: Tensor,
        zero: Tensor,
        meta: list[int],
        lora_A: Tensor | None,
        lora_B: Tensor | None,
        scaling: Tensor | None,
        index: Tensor | None,
        magnitude: Tensor | None,
        weight_norm: Tensor | None,
        is_dora: Tensor | None,
        bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        with device_of(x):  # Triton launches on the current device
            return _launch(
                x, W_q, scale, zero, meta, lora_A, lora_B, scaling, index,
                magnitude, weight_norm, is_dora, bias, out_dtype,
            )  # fmt: skip

    @_lora_decode_op.register_fake
    def _(
        x: Tensor, W_q: Tensor, scale: Tensor, zero: Tensor, meta: list[int], *args: Any
    ) -> Tensor:
        out_dtype = args[-1]
        return x.new_empty(x.shape[0], meta[3], dtype=out_dtype)


def lora_decode(
    x: Tensor,
    W_q: Tensor,
    scale: Tensor,
    zero: Tensor,
    layout: QuantLayout,
    *,
    lora_A: Tensor | None = None,
    lora_B: Tensor | None = None,
    scaling: Tensor | None = None,
    index: Tensor | None = None,
    magnitude: Tensor | None = None,
    weight_norm: Tensor | None = None,
    is_dora: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``c ⊙ (x @ dequantize(W)ᵀ + s_k · x @ A_kᵀ @ B_kᵀ) + bias`` per row, at decode.

    The callers (``apply_lora``, ``mixed_batch_indexed``, ``base_forward``) check the
    inputs; this only lays them out. A custom op, so ``torch.compile(fullgraph=True)``
    keeps it whole and CUDA graphs capture it (no host sync, no allocation that
    depends on values).

    Args:
        x: ``(..., in)`` in the compute dtype, at most :data:`MAX_ROWS` rows in all.
        W_q, scale, zero, layout: the layer's tensors and :class:`QuantLayout`.
        lora_A, lora_B: ``(r, in)``/``(out, r)`` for one adapter, or banks
            ``(n, r, in)``/``(n, out, r)`` read through ``index``.
        scaling: ``(1,)`` or ``(n,)`` float32.
        index: ``(rows,)`` int32/int64 adapter per row (``-1``: none), with banks; a
            value outside ``[-1, n)`` gives a NaN row.
        magnitude, weight_norm: DoRA's ``m`` and ``n`` (``(out,)`` or ``(n, out)``).
        is_dora: ``(n,)`` bool or uint8, which bank entries are DoRA (with ``index``;
            without, ``magnitude`` makes every row DoRA).
        bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)`` in the compute dtype.
    """
    bits, per = layout.packing_bits
    out_features, in_features = layout.shape
    flat = x.reshape(-1, in_features).contiguous()
    meta = [bits, per, layout.group_size, out_features, in_features]
    out: Tensor = _lora_decode_op(
        flat, W_q.contiguous(), scale.contiguous(), zero.contiguous(), meta,
        *(None if t is None else t.contiguous()
          for t in (lora_A, lora_B, scaling, index, magnitude, weight_norm, is_dora, bias)),
        layout.compute_dtype,
    )  # fmt: skip
    return out.view(*x.shape[:-1], out_features)
