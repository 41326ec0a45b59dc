"""How much of an adapter a merged layer kept: ``merge_report``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hqqlora._base import HQQLinear, check_hqq_layer, dequantize, quant_layout, quant_tensors
from hqqlora._merge import (
    as_float64,
    dequantize_float64,
    fold,
    merge,
    merge_terms,
    require_finite_updates,
    round_to_grid,
)
from hqqlora._params import as_adapter_list

__all__ = ["merge_report"]


def merge_report(
    base: HQQLinear,
    params: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    /,
    merged: HQQLinear | None = None,
    *,
    method: str = "requantize",
) -> dict[str, float | int]:
    """Measures how much of the adapters' update a merged layer holds.

    With ``W = dequantize(base)``, the intended update
    ``ΔW = merged_weight(base, params) - W`` (so DoRA and sequences are covered)
    and ``M = dequantize(merged)``, all in float64:

    * ``captured = ⟨M - W, ΔW⟩ / ‖ΔW‖²``: the share of the update that arrived
      (1.0 for a lossless merge, about 0 when the update is far below one step);
    * ``rel_error = ‖M - (W + ΔW)‖ / ‖ΔW‖``: what the merge got wrong, relative
      to the update;
    * ``delta_norm = ‖ΔW‖`` (Frobenius);
    * ``step_ratio = max|ΔW| / median(scale)``: the largest update entry in units
      of one quantization step (below about 0.5, re-rounding cannot see it);
    * ``clamped``: how many merged weights fall off ``base``'s grid (a
      ``"same_grid"`` merge clamps them and cannot undo them), out of ``numel``.

    ``captured`` and ``rel_error`` are NaN when ``ΔW`` is zero.

    Args:
        base: the quantized layer before the merge, weight ``(out, in)``.
        params: the adapter dict, or a sequence of them, that was merged.
        merged: the merged layer (by position or by name); ``None`` merges with
            ``method`` here (a non-finite update then raises, as in :func:`merge`).
        method: the merge method when ``merged`` is ``None``.

    Returns:
        A dict of Python floats and ints with the keys above.

    Raises:
        TypeError, ValueError: layers or adapters that do not fit each other.
        ValueError: an update that is not finite (NaN/inf in ``ΔW`` or DoRA's factor).

    Example:
        >>> report = merge_report(base, params)  # doctest: +SKIP
        >>> report["captured"]  # doctest: +SKIP
        0.04
    """
    check_hqq_layer(base)
    adapters = as_adapter_list(params, base)
    if merged is None:
        merged = merge(base, adapters, method=method, warn=False)
    check_hqq_layer(merged, "merged")
    layout = quant_layout(base)
    if quant_layout(merged).shape != layout.shape:
        raise ValueError(
            f"Expected `merged` of weight shape {layout.shape}, got {quant_layout(merged).shape}."
        )
    adapters64 = [as_float64(p) for p in adapters]
    W = dequantize(base).double()
    deltas, factors = merge_terms(base, adapters64, layout.in_features)
    # A report on a broken adapter would be NaNs that read like "nothing captured".
    require_finite_updates(deltas, factors, "merge")
    delta = fold(W, deltas, factors) - W
    M = dequantize(merged).double().to(W.device)
    delta_norm = float(torch.linalg.norm(delta))
    if delta_norm > 0:
        captured = float(torch.sum((M - W) * delta)) / delta_norm**2
        rel_error = float(torch.linalg.norm(M - W - delta)) / delta_norm
    else:
        captured = rel_error = float("nan")
    _, scale, _ = quant_tensors(base)
    step = float(scale.double().abs().median())
    _, clamped = round_to_grid(fold(dequantize_float64(base), deltas, factors), base)
    return {
        "captured": captured,
        "rel_error": rel_error,
        "delta_norm": delta_norm,
        "step_ratio": float(delta.abs().max()) / step if step > 0 else float("inf"),
        "clamped": clamped,
        "numel": delta.numel(),
    }
