"""Folding adapters into the quantized weight, and taking them out again.

``merge`` adds the adapters' updates to the base weight and returns a new layer;
``unmerge`` takes them out again. Both leave their inputs alone, return plain data
(detached tensors, no autograd graph back to the adapters), and refuse an update
that is not finite, whatever the method. Three methods:

* ``"requantize"`` (default, PEFT's): dequantize, add, quantize once with the base's
  settings. Lossy: at 2–4 bits a LoRA-sized update is far smaller than one
  quantization step, so the merged layer keeps only part of it (``merge`` warns
  when less than half survives; :func:`merge_report` measures it), and
  ``unmerge(merge(base, p), p)`` is not ``base``.
* ``"same_grid"``: keep the base's scale and zero, re-round the merged weight on
  that grid, ``W_q' = clamp(round(W'/scale + zero), 0, 2^b - 1)``. Reversible:
  unmerging gives the original codes back except where the merge clamped.
* ``"zero_point"``: for a delta constant within each quantization group (a
  group-constant adapter), fold it into HQQ's float zero points,
  ``(W_q - z)·s + c = (W_q - (z - c/s))·s``; no code changes, lossless up to the
  zero dtype's precision. DoRA's row factor folds into the scales.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from hqq.core.quantize import Quantizer
from torch import Tensor

from hqqlora._base import (
    HQQLinear,
    QuantLayout,
    check_hqq_layer,
    dequantize,
    quant_config_of,
    quant_layout,
    quant_tensors,
    quantize_like,
    unpacked_codes,
)
from hqqlora._dora import as_norm_list, dora_factor, dora_weight_norm
from hqqlora._params import as_adapter_list, delta_weight

__all__ = ["METHODS", "merge", "merged_weight", "unmerge", "unmerged_weight"]

METHODS = ("requantize", "same_grid", "zero_point")

Adapters = Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]
WeightNorm = Tensor | Sequence[Tensor | None] | None

# A delta counts as constant within its groups when what is left after taking out
# each group's mean is this small relative to the delta (float64 arithmetic).
_GROUP_CONSTANT_RTOL = 1e-6
_WARN_BELOW = 0.5


def merge_dense(
    weight: Tensor, base: HQQLinear, adapters: Sequence[Mapping[str, Tensor]]
) -> Tensor:
    """``weight`` with each adapter folded in, in order (see :func:`merged_weight`)."""
    return fold(weight, *merge_terms(base, adapters, weight.shape[1]))


def merge_terms(
    base: HQQLinear, adapters: Sequence[Mapping[str, Tensor]], in_features: int
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Each adapter's ``ΔW`` ``(out, in)`` and DoRA factor ``c = m / ‖W + ΔW‖`` (``None`` for LoRA)."""
    deltas = [delta_weight(p, in_features=in_features) for p in adapters]
    factors = [
        dora_factor(p, dora_weight_norm(base, p)) if "magnitude" in p else None for p in adapters
    ]
    return deltas, factors


def fold(weight: Tensor, deltas: Sequence[Tensor], factors: Sequence[Tensor | None]) -> Tensor:
    for delta, c in zip(deltas, factors, strict=True):
        weight = weight + delta if c is None else c.unsqueeze(-1) * (weight + delta)
    return weight


def unmerge_terms(
    adapters: Sequence[Mapping[str, Tensor]], norms: Sequence[Tensor | None], in_features: int
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Each adapter's ``ΔW`` and DoRA factor ``c = m / n`` from the given norms ``n``."""
    deltas = [delta_weight(p, in_features=in_features) for p in adapters]
    factors = [
        dora_factor(p, cast(Tensor, n)) if "magnitude" in p else None  # DoRA has its norm
        for p, n in zip(adapters, norms, strict=True)
    ]
    return deltas, factors


def _unfold(weight: Tensor, deltas: Sequence[Tensor], factors: Sequence[Tensor | None]) -> Tensor:
    for delta, c in reversed(list(zip(deltas, factors, strict=True))):
        weight = weight - delta if c is None else weight / c.unsqueeze(-1) - delta
    return weight


def unmerge_dense(
    weight: Tensor, adapters: Sequence[Mapping[str, Tensor]], norms: Sequence[Tensor | None]
) -> Tensor:
    """``weight`` with the adapters taken out, last-in first-out (see :func:`unmerged_weight`)."""
    return _unfold(weight, *unmerge_terms(adapters, norms, weight.shape[1]))


def require_finite_updates(
    deltas: Sequence[Tensor], factors: Sequence[Tensor | None], action: str
) -> None:
    """Raises unless every ``ΔW`` and DoRA factor ``c`` is finite (``1/c`` too, to unmerge).

    One ``isfinite`` reduction per tensor and a single host sync for all adapters.
    """
    flags = []
    for delta, c in zip(deltas, factors, strict=True):
        flag = torch.isfinite(delta).all()
        if c is not None:
            flag = flag & torch.isfinite(c).all()
            if action == "unmerge":
                flag = flag & torch.isfinite(c.reciprocal()).all()
        flags.append(flag.to(deltas[0].device))
    bad = [i for i, ok in enumerate(torch.stack(flags).tolist()) if not ok]
    if bad:
        raise ValueError(
            f"Expected finite updates to {action}, got NaN/inf in the update of adapter(s) {bad} "
            "(ΔW = scaling·lora_B@lora_A, or DoRA's factor magnitude / weight_norm"
            + (", or its inverse" if action == "unmerge" else "")
            + f"): the adapter seems broken. Nothing was {action}d."
        )


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
    return merge_dense(dequantize(base), base, adapters)


def _checked_norms(
    merged: HQQLinear, adapters: Sequence[Mapping[str, Tensor]], weight_norm: WeightNorm
) -> list[Tensor | None]:
    norms = as_norm_list(weight_norm, adapters, merged)
    for i, (p, n) in enumerate(zip(adapters, norms, strict=True)):
        if "magnitude" in p and n is None:
            raise ValueError(
                f"Expected `weight_norm` for DoRA adapter {i}: the merged weight does not determine "
                "DoRA's norm; pass dora_weight_norm(base, params) computed before the merge."
            )
    return norms


def unmerged_weight(
    merged: HQQLinear, params: Adapters, /, *, weight_norm: WeightNorm = None
) -> Tensor:
    """The dense weight that :func:`unmerge` quantizes: the merge undone last-in first-out."""
    check_hqq_layer(merged, "merged")
    adapters = as_adapter_list(params, merged)
    norms = _checked_norms(merged, adapters, weight_norm)
    return unmerge_dense(dequantize(merged), adapters, norms)


def _require_finite_layer(layer: HQQLinear) -> None:
    """``safe_merge``: raises unless the weight the merged layer holds is finite.

    A non-finite dense weight makes its whole quantization group non-finite, so this
    one check on ``dequantize(layer)`` (one host sync) also covers the dense merge.
    """
    weight = dequantize(layer)
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"Expected finite merged weights, got {bad} NaN/inf entries: the update overflows "
            f"the layer's {layer.compute_dtype}. Nothing was merged."
        )


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {METHODS}, got {method!r}.")
    return method


def as_float64(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapter with every leaf detached and in float64 (for exact bookkeeping)."""
    return {k: v.detach().double() for k, v in params.items()}


# ---- the quantization grid, read and written in float64 -------------------------


def max_code(layout: QuantLayout) -> int:
    """The largest code, ``round(2^nbits - 1)``, as HQQ's quantizer uses it."""
    return cast(int, round(2**layout.nbits - 1))


def grid(base: HQQLinear) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, scale, zero)`` in float64, in HQQ's grouped view.

    ``codes`` has shape ``(num_groups, group_size)`` for ``axis=1`` and
    ``(group_size, numel // group_size)`` for ``axis=0``; ``scale`` and ``zero``
    broadcast against it, and ``(codes - zero) * scale`` reshaped to ``(out, in)``
    is the weight.
    """
    layout = quant_layout(base)
    W_q, scale, zero = quant_tensors(base)
    codes = unpacked_codes(W_q, layout, torch.float64)
    return codes, scale.double(), zero.double()


def dequantize_float64(base: HQQLinear) -> Tensor:
    """``(codes - zero) * scale`` in float64, shape ``(out, in)``: the grid's exact values."""
    codes, scale, zero = grid(base)
    return ((codes - zero) * scale).reshape(quant_layout(base).shape)


def round_to_grid(weight: Tensor, base: HQQLinear) -> tuple[Tensor, int]:
    """Codes of ``weight`` on ``base``'s grid, and how many had to be clamped.

    ``codes = clamp(round(weight / scale + zero), 0, 2^b - 1)`` in the grouped view.
    """
    _, scale, zero = grid(base)
    layout = quant_layout(base)
    view = (-1, layout.group_size) if layout.axis == 1 else (layout.group_size, -1)
    codes = torch.round(weight.double().reshape(view) / scale + zero)
    top = max_code(layout)
    clamped = int(((codes < 0) | (codes > top)).sum())
    return codes.clamp(0, top), clamped


def _pack(codes: Tensor, base: HQQLinear) -> Tensor:
    layout = quant_layout(base)
    if layout.packing is None:
        return codes.to(base.W_q.dtype)
    W_q: Tensor = Quantizer.pack[layout.packing](codes.to(torch.uint8))
    if layout.view_as_float:
        W_q = W_q.view(layout.compute_dtype)
    return W_q


def _rebuild(base: HQQLinear, *, W_q: Tensor, scale: Tensor, zero: Tensor) -> HQQLinear:
    """A new ``HQQLinear`` with ``base``'s config, meta and bias but these tensors.

    No quantizer runs: the codes, scales and zeros are taken as given.
    """
    _, old_scale, old_zero = quant_tensors(base)
    meta = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in base.meta.items()}
    scale = scale.detach().to(dtype=old_scale.dtype, device=old_scale.device).clone()
    zero = zero.detach().to(dtype=old_zero.dtype, device=old_zero.device).clone()
    if "zero_scale" in meta:
        meta["zero_scale"] = torch.stack((zero, scale)).to(meta["zero_scale"].dtype).cpu()
    else:
        meta["scale"], meta["zero"] = scale, zero
    layer = HQQLinear(
        None, quant_config_of(base), compute_dtype=base.compute_dtype, device=base.device
    )
    layer.W_q = W_q.to(device=base.W_q.device)
    layer.meta = meta
    layer.out_features, layer.in_features = quant_layout(base).shape
    if base.bias is not None:
        layer.bias = base.bias.detach().clone()
    layer.cuda(base.device)
    layer.ready = True
    return layer


# ---- zero_point: fold group-constant deltas into the zero points -----------------


def _check_zero_point_layout(layout: QuantLayout) -> None:
    if layout.axis != 1 or layout.in_features % layout.group_size:
        raise ValueError(
            "Expected an axis=1 layer whose group size divides in_features for "
            f"method='zero_point', got axis={layout.axis}, group_size={layout.group_size}, "
            f"in_features={layout.in_features}."
        )


def _group_constant(delta: Tensor, layout: QuantLayout, index: int) -> Tensor:
    """The per-group value ``(num_groups, 1)`` of a group-constant ``delta`` ``(out, in)``."""
    groups = delta.reshape(layout.num_groups, layout.group_size)
    value = groups.mean(dim=1, keepdim=True)
    spread = torch.linalg.norm(groups - value)
    size = torch.linalg.norm(groups)
    if spread > _GROUP_CONSTANT_RTOL * size:
        raise ValueError(
            f"Expected the update of adapter {index} to be constant within each quantization group "
            f"for method='zero_point', got a relative spread of {float(spread / size):.2e}; "
            "train a group-constant adapter (init_lora(..., group_constant=True)) or use "
            "method='same_grid'."
        )
    return value


def _row_to_groups(factor: Tensor, layout: QuantLayout) -> Tensor:
    return factor.repeat_interleave(layout.in_features // layout.group_size).unsqueeze(-1)


def _zero_point_merge(
    base: HQQLinear, deltas: Sequence[Tensor], factors: Sequence[Tensor | None]
) -> HQQLinear:
    layout = quant_layout(base)
    W_q, scale, zero = quant_tensors(base)
    s, z = scale.double(), zero.double()
    for i, (delta, c) in enumerate(zip(deltas, factors, strict=True)):
        z = z - _group_constant(delta, layout, i) / s
        if c is not None:
            # c ⊙ ((q - z')·s) = (q - z')·(c·s): DoRA's row factor goes into the scales.
            s = s * _row_to_groups(c, layout)
    return _rebuild(base, W_q=W_q.detach().clone(), scale=s, zero=z)


def _zero_point_unmerge(
    merged: HQQLinear, deltas: Sequence[Tensor], factors: Sequence[Tensor | None]
) -> HQQLinear:
    layout = quant_layout(merged)
    W_q, scale, zero = quant_tensors(merged)
    s, z = scale.double(), zero.double()
    for i, (delta, c) in reversed(list(enumerate(zip(deltas, factors, strict=True)))):
        if c is not None:
            s = s / _row_to_groups(c, layout)
        z = z + _group_constant(delta, layout, i) / s
    return _rebuild(merged, W_q=W_q.detach().clone(), scale=s, zero=z)


# ---- the public functions --------------------------------------------------------


def merge(
    base: HQQLinear,
    params: Adapters,
    /,
    *,
    safe_merge: bool = False,
    method: str = "requantize",
    warn: bool = True,
) -> HQQLinear:
    """A new ``HQQLinear`` with the adapters folded into its weight.

    The merged weight is ``W' = W + ΔW`` (LoRA) or ``W' = c ⊙ (W + ΔW)`` (DoRA) for
    each adapter in order, stored by ``method``:

    * ``"requantize"``: quantize ``W'`` once with ``base``'s quant config (nbits,
      group size, axis, ``offload_meta``), compute dtype and device (PEFT's way).
    * ``"same_grid"``: keep ``base``'s scales and zeros and re-round,
      ``W_q' = clamp(round(W'/s + z), 0, 2^b - 1)`` (computed in float64), so that
      ``unmerge(..., method="same_grid")`` gives back the original codes except
      where values clamped (``merge_report(...)["clamped"]`` counts them).
    * ``"zero_point"``: keep the codes and fold a delta ``c`` that is constant
      within each group into the zero points, ``z' = z - c/s`` (DoRA's row factor
      into the scales, ``s' = c_row·s``). Lossless up to the zero dtype's precision.
      Needs an ``axis=1`` layer whose group size divides ``in_features`` and
      group-constant updates (``init_lora(..., group_constant=True)``).

    The bias is kept; ``base`` is never modified. The merged layer is plain data:
    its tensors are detached, whatever the adapters' ``requires_grad``. An update
    that is not finite (NaN/inf in ``ΔW`` or in DoRA's factor ``c``) raises, for
    every method and with or without ``safe_merge``.

    Args:
        base: the quantized layer.
        params: an adapter dict or a sequence of them.
        safe_merge: also raise when the merged weight is not finite although the
            update is (it overflows the compute dtype); ``dequantize(merged)`` is
            checked, one host sync.
        method: ``"requantize"``, ``"same_grid"`` or ``"zero_point"``.
        warn: emit a ``UserWarning`` when the merged layer keeps less than half of
            the update (``merge_report(...)["captured"] < 0.5``).

    Returns:
        The merged ``HQQLinear``.

    Raises:
        ValueError: an update that is not finite; ``safe_merge`` and a non-finite
            merged weight; adapters that do not fit; an unknown ``method``; for
            ``"zero_point"``, a layout or an update that is not group-constant.
            Nothing is changed.
    """
    check_hqq_layer(base)
    _check_method(method)
    adapters = as_adapter_list(params, base)
    # A merged layer is plain data: no autograd graph back to trainable adapters.
    with torch.no_grad():
        return _merge(base, adapters, safe_merge=safe_merge, method=method, warn=warn)


def _merge(
    base: HQQLinear,
    adapters: Sequence[Mapping[str, Tensor]],
    *,
    safe_merge: bool,
    method: str,
    warn: bool,
) -> HQQLinear:
    layout = quant_layout(base)
    if method == "zero_point":
        _check_zero_point_layout(layout)
    if method != "requantize":
        adapters = [as_float64(p) for p in adapters]
    deltas, factors = merge_terms(base, adapters, layout.in_features)
    require_finite_updates(deltas, factors, "merge")
    if method == "zero_point":
        merged = _zero_point_merge(base, deltas, factors)
        if safe_merge:
            _require_finite_layer(merged)
        # Lossless up to the zero points' precision: nothing to warn about.
        return merged
    if method == "requantize":
        W = dequantize(base)
        weight = fold(W, deltas, factors)
        merged = quantize_like(weight, base, base.bias)
    else:
        W = dequantize_float64(base)
        weight = fold(W, deltas, factors)
        codes, _ = round_to_grid(weight, base)
        _, scale, zero = quant_tensors(base)
        merged = _rebuild(base, W_q=_pack(codes, base), scale=scale, zero=zero)
    if safe_merge:
        _require_finite_layer(merged)
    if warn:
        _warn_if_lost(base, W, weight, merged)
    return merged


def _warn_if_lost(base: HQQLinear, W: Tensor, weight: Tensor, merged: HQQLinear) -> None:
    """Warns when ``merged`` holds less than half of ``weight - W`` (merge_report's
    ``captured``, from the dense weights the merge already has, in float32)."""
    delta = (weight - W).float().flatten()
    arrived = (dequantize(merged).to(delta.device).float() - W.float()).flatten()
    # One host sync for both sums: this check runs on every merge.
    delta_sq, overlap = torch.stack([torch.dot(delta, delta), torch.dot(arrived, delta)]).tolist()
    if not delta_sq > 0:
        return
    captured = overlap / delta_sq
    if captured < _WARN_BELOW:
        rel_error = float(torch.linalg.norm(arrived - delta)) / delta_sq**0.5
        _, scale, _ = quant_tensors(base)
        step_ratio = float(delta.abs().max()) / float(scale.float().abs().median())
        warnings.warn(
            f"merge kept only {captured:.1%} of the adapters' update "
            f"(captured={captured:.3f}, rel_error={rel_error:.3f}): its largest "
            f"entry is {step_ratio:.2g} quantization steps at {quant_layout(base).nbits} bits. "
            "Keep the adapter unmerged, or train group-constant adapters (init_lora(..., "
            "group_constant=True)) and merge them losslessly with method='zero_point'; see "
            "merge_report. Pass warn=False to silence this.",
            UserWarning,
            stacklevel=4,
        )


def unmerge(
    merged: HQQLinear,
    params: Adapters,
    /,
    *,
    weight_norm: WeightNorm = None,
    method: str = "requantize",
) -> HQQLinear:
    """A new ``HQQLinear`` with the adapters taken out again.

    Undoes :func:`merge` last-in first-out: ``W ← W - ΔW`` (LoRA) or
    ``W ← W / c - ΔW`` (DoRA), stored by ``method``:

    * ``"requantize"``: quantize again. Lossy: the result drifts from the layer
      that was merged. To get the original back exactly, keep it (the
      ``HqqLoraLinear`` shim does).
    * ``"same_grid"``: re-round on the merged layer's grid (float64). After a
      ``"same_grid"`` merge of LoRA adapters this gives the original codes back,
      except where the merge clamped. DoRA rows with ``c < 1`` magnify the
      merge's rounding error by ``1/c`` and may come back one code off.
    * ``"zero_point"``: ``z ← z + c/s`` (and ``s ← s/c_row`` for DoRA); the codes
      are untouched.

    Args:
        merged: a merged layer.
        params: the adapter(s) that were merged, in merge order.
        weight_norm: for DoRA adapters, ``dora_weight_norm(base, params)`` of the
            unmerged base (one entry per adapter for a sequence, ``None`` for LoRA).
        method: ``"requantize"``, ``"same_grid"`` or ``"zero_point"``.

    Returns:
        The unmerged ``HQQLinear``.

    Raises:
        ValueError: an update that is not finite (NaN/inf in ``ΔW``, in ``c`` or in
            ``1/c``, e.g. a zero ``weight_norm``); a DoRA adapter without its
            ``weight_norm``; adapters that do not fit; an unknown ``method``; for
            ``"zero_point"``, a layout or an update that is not group-constant.
    """
    check_hqq_layer(merged, "merged")
    _check_method(method)
    adapters = as_adapter_list(params, merged)
    norms = _checked_norms(merged, adapters, weight_norm)
    with torch.no_grad():
        return _unmerge(merged, adapters, norms, method=method)


def _unmerge(
    merged: HQQLinear,
    adapters: Sequence[Mapping[str, Tensor]],
    norms: Sequence[Tensor | None],
    *,
    method: str,
) -> HQQLinear:
    layout = quant_layout(merged)
    if method == "zero_point":
        _check_zero_point_layout(layout)
    if method != "requantize":
        adapters = [as_float64(p) for p in adapters]
        norms = [None if n is None else n.detach().double() for n in norms]
    deltas, factors = unmerge_terms(adapters, norms, layout.in_features)
    require_finite_updates(deltas, factors, "unmerge")
    if method == "requantize":
        weight = _unfold(dequantize(merged), deltas, factors)
        return quantize_like(weight, merged, merged.bias)
    if method == "same_grid":
        weight = _unfold(dequantize_float64(merged), deltas, factors)
        codes, _ = round_to_grid(weight, merged)
        _, scale, zero = quant_tensors(merged)
        return _rebuild(merged, W_q=_pack(codes, merged), scale=scale, zero=zero)
    return _zero_point_unmerge(merged, deltas, factors)
