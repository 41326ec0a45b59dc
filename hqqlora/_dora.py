"""DoRA (weight-decomposed LoRA) on a quantized base, as PEFT defines it.

With ``W = dequantize(base)``, ``ΔW = scaling·B@A``, the row norms
``n = ‖W + ΔW‖`` (detached) and ``c = magnitude / n``, the layer computes

    y = base(x) + (c - 1) ⊙ (x @ Wᵀ) + c ⊙ scaling · x @ Aᵀ @ Bᵀ

which equals ``c ⊙ (x @ (W + ΔW)ᵀ) + bias``. ``n`` only depends on the frozen
base and on ``A``, ``B``: :func:`dora_weight_norm` computes it once so that
inference need not dequantize the whole weight on every call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hqqlora._base import HQQLinear, QuantLayout, check_hqq_layer, dequantize, quant_layout
from hqqlora._params import as_adapter_list, check_norm_values, expand_groups, pool_groups

__all__ = ["as_norm_list", "dora_factor", "dora_weight_norm"]


def dora_weight_norm(base: HQQLinear, params: Mapping[str, Tensor], /) -> Tensor:
    """The detached row norms ``n = ‖dequantize(W) + scaling·B@A‖₂`` of a DoRA layer.

    Computed in the adapters' dtype, as PEFT does. Hold the result and pass it as
    ``weight_norm=`` to :func:`apply_lora`, :func:`mixed_batch` or :func:`unmerge`
    to skip recomputing it; it changes only when ``lora_A``/``lora_B`` do.

    Args:
        base: the quantized layer, weight of shape ``(out, in)``.
        params: an adapter dict (``magnitude`` is not needed).

    Returns:
        Tensor of shape ``(out,)`` in the adapters' dtype, detached.
    """
    check_hqq_layer(base)
    (params,) = as_adapter_list(params, base)
    A, B = params["lora_A"].detach(), params["lora_B"].detach()
    weight = dequantize(base).to(A.dtype)
    delta = expand_groups(params["scaling"].detach() * (B @ A), weight.shape[1])
    norm: Tensor = torch.linalg.norm(weight + delta, dim=1)
    return norm.to(weight.dtype).detach()


def dora_factor(params: Mapping[str, Tensor], weight_norm: Tensor) -> Tensor:
    """``c = magnitude / weight_norm``, of shape ``(out,)``."""
    return params["magnitude"] / weight_norm.detach()


def as_norm_list(
    weight_norm: object,
    adapters: Sequence[Mapping[str, Tensor]],
    base: HQQLinear,
    *,
    layout: QuantLayout | None = None,
) -> list[Tensor | None]:
    """Matches ``weight_norm`` (a tensor, ``None``, or one entry per adapter) to ``adapters``.

    Each norm must be positive and finite (:func:`~hqqlora._params.check_norm_values`):
    its values are read in eager mode, with one host sync for a norm on an
    accelerator, and not while ``torch.compile`` traces.

    Raises:
        ValueError: wrong length, a norm given for a LoRA adapter, a wrong shape or
            device, or a zero, negative or non-finite entry.
        TypeError: an entry that is not a tensor or ``None``.
    """
    if weight_norm is None:
        return [None] * len(adapters)
    norms: list[Tensor | None]
    if isinstance(weight_norm, Tensor):
        norms = [weight_norm]
    elif isinstance(weight_norm, Sequence):
        norms = list(weight_norm)
    else:
        raise TypeError(
            f"Expected `weight_norm` to be a tensor, None or a sequence of them, got {type(weight_norm).__name__}."
        )
    if len(norms) != len(adapters):
        raise ValueError(
            f"Expected one `weight_norm` entry per adapter ({len(adapters)}), got {len(norms)}."
        )
    out_features = (quant_layout(base) if layout is None else layout).out_features
    device = base.W_q.device
    for i, (n, p) in enumerate(zip(norms, adapters, strict=True)):
        if n is None:
            continue
        if not isinstance(n, Tensor):
            raise TypeError(
                f"Expected `weight_norm[{i}]` to be a tensor or None, got {type(n).__name__}."
            )
        if "magnitude" not in p:
            raise ValueError(
                f"Expected no `weight_norm[{i}]` for a LoRA adapter (no magnitude), got a tensor."
            )
        if n.shape != (out_features,):
            raise ValueError(
                f"Expected `weight_norm[{i}]` of shape ({out_features},), got {tuple(n.shape)}."
            )
        if n.device != device and not n.is_meta:
            raise ValueError(
                f"Expected `weight_norm[{i}]` on the base layer's device {device}, got {n.device}."
            )
        check_norm_values(n, f"weight_norm[{i}]")
    return norms


def add_dora_term(
    base: HQQLinear,
    params: Mapping[str, Tensor],
    x: Tensor,
    result: Tensor,
    weight_norm: Tensor | None,
    *,
    dropped: bool,
) -> Tensor:
    """``result`` plus the DoRA term of one adapter, in ``x``'s dtype (PEFT's forward).

    Without dropout the term is ``(c - 1) ⊙ (result - bias) + c ⊙ scaling · x @ Aᵀ @ Bᵀ``
    on the running output ``result``: for the first adapter ``result - bias = x @ Wᵀ``,
    and for a later one it holds the earlier adapters' terms too, so that the forward
    of several active adapters is what merging them in order (``W ← c ⊙ (W + ΔW)``)
    computes, up to the earlier updates' share of the norm, as PEFT's forward is. The sum is computed as ``c ⊙ (result - bias + lora) + bias``.

    Args:
        x: the (possibly dropped-out) input, ``(..., in)``, in the adapters' dtype.
        result: the output so far, ``(..., out)``.
        weight_norm: ``n``, or ``None`` to compute it from the base.
        dropped: whether dropout changed ``x``: then ``x @ Wᵀ`` is recomputed on the
            dropped input in place of ``result - bias``, as PEFT does in training.
    """
    if weight_norm is None:
        weight_norm = dora_weight_norm(base, params)
    c = dora_factor(params, weight_norm)
    dtype = x.dtype
    h = F.linear(pool_groups(x, params["lora_A"].shape[1]), params["lora_A"])
    scaled_lora = F.linear(h * params["scaling"], params["lora_B"])
    if dropped:
        weight = dequantize(base).to(dtype)
        return result + (c - 1) * F.linear(x, weight) + c * scaled_lora
    if base.bias is None:
        return c * (result.to(dtype) + scaled_lora)
    bias = base.bias.to(dtype)
    return torch.addcmul(bias, result.to(dtype) - bias + scaled_lora, c)
