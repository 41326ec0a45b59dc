"""Folding adapters into the quantized weight, and taking them out again.

``merge`` dequantizes the base, adds the adapters' updates and quantizes once with
the base's own settings; ``unmerge`` subtracts and quantizes again. Both return
new layers and leave their inputs alone.

Requantization is lossy: at 2–4 bits a LoRA-sized update is far smaller than one
quantization step, so a merged layer keeps only part of it, and
``unmerge(merge(base, p), p)`` is not ``base`` (see the README for measured drift).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hqqlora._base import HQQLinear, check_hqq_layer, dequantize, quantize_like
from hqqlora._dora import as_norm_list, dora_factor, dora_weight_norm
from hqqlora._params import as_adapter_list, delta_weight

__all__ = ["merge", "merged_weight", "unmerge", "unmerged_weight"]

Adapters = Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]


def merged_weight(base: HQQLinear, params: Adapters, /) -> Tensor:
    """The dense weight that :func:`merge` quantizes.

    Starting from ``W = dequantize(base)``, each adapter in order does
    ``W ← W + ΔW`` (LoRA) or ``W ← c ⊙ (W + ΔW)`` (DoRA, with ``c`` from the
    unmerged base, as PEFT).

    Returns:
        Tensor of shape ``(out, in)``, in the promoted dtype of base and adapters.
    """
    check_hqq_layer(base)
    adapters = as_adapter_list(params, base)
    weight = dequantize(base)
    for p in adapters:
        delta = delta_weight(p)
        if "magnitude" in p:
            c = dora_factor(p, dora_weight_norm(base, p))
            weight = c.unsqueeze(-1) * (weight + delta)
        else:
            weight = weight + delta
    return weight


def unmerged_weight(
    merged: HQQLinear,
    params: Adapters,
    /,
    *,
    weight_norm: Tensor | Sequence[Tensor | None] | None = None,
) -> Tensor:
    """The dense weight that :func:`unmerge` quantizes: the merge undone last-in first-out."""
    check_hqq_layer(merged, "merged")
    adapters = as_adapter_list(params, merged)
    norms = as_norm_list(weight_norm, adapters, merged)
    for i, (p, n) in enumerate(zip(adapters, norms, strict=True)):
        if "magnitude" in p and n is None:
            raise ValueError(
                f"Expected `weight_norm` for DoRA adapter {i}: the merged weight does not determine "
                "DoRA's norm; pass dora_weight_norm(base, params) computed before the merge."
            )
    weight = dequantize(merged)
    for p, n in reversed(list(zip(adapters, norms, strict=True))):
        delta = delta_weight(p)
        if "magnitude" in p:
            weight = weight / dora_factor(p, n).unsqueeze(-1) - delta
        else:
            weight = weight - delta
    return weight


def _check_finite(weight: Tensor) -> None:
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"Expected finite merged weights, got {bad} NaN/inf entries: the adapter seems broken."
        )


def merge(base: HQQLinear, params: Adapters, /, *, safe_merge: bool = False) -> HQQLinear:
    """A new ``HQQLinear`` with the adapters folded into its weight.

    Computes ``W' = W + ΔW`` (LoRA) or ``W' = c ⊙ (W + ΔW)`` (DoRA) for each
    adapter in order, then quantizes once with ``base``'s quant config (nbits,
    group size, axis, ``offload_meta``), compute dtype and device. The bias is
    kept. ``base`` is never modified.

    Args:
        base: the quantized layer.
        params: an adapter dict or a sequence of them.
        safe_merge: raise instead of returning a layer with non-finite weights.

    Returns:
        The merged ``HQQLinear``.

    Raises:
        ValueError: ``safe_merge`` and a non-finite merged weight; adapters that do not fit.
    """
    weight = merged_weight(base, params)
    if safe_merge:
        _check_finite(weight)
    return quantize_like(weight, base, base.bias)


def unmerge(
    merged: HQQLinear,
    params: Adapters,
    /,
    *,
    weight_norm: Tensor | Sequence[Tensor | None] | None = None,
) -> HQQLinear:
    """A new ``HQQLinear`` with the adapters taken out again, by requantization.

    Undoes :func:`merge` last-in first-out: ``W ← W - ΔW`` (LoRA) or
    ``W ← W / c - ΔW`` (DoRA). Lossy: the result is requantized, so it drifts from
    the layer that was merged. To get the original back exactly, keep it (the
    ``HqqLoraLinear`` shim does).

    Args:
        merged: a merged layer.
        params: the adapter(s) that were merged, in merge order.
        weight_norm: for DoRA adapters, ``dora_weight_norm(base, params)`` of the
            unmerged base (one entry per adapter for a sequence, ``None`` for LoRA).

    Returns:
        The unmerged ``HQQLinear``.

    Raises:
        ValueError: a DoRA adapter without its ``weight_norm``; adapters that do not fit.
    """
    weight = unmerged_weight(merged, params, weight_norm=weight_norm)
    return quantize_like(weight, merged, merged.bias)
