"""The adapted layer's forward: ``apply_lora``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hqqlora import _decode
from hqqlora._base import (
    HQQLinear,
    QuantLayout,
    base_forward,
    check_hqq_layer,
    quant_layout,
    quant_tensors,
)
from hqqlora._dora import add_dora_term, as_norm_list, dora_weight_norm
from hqqlora._params import as_adapter_list, pool_groups

__all__ = ["apply_lora", "check_input", "lora_dropout"]


def check_input(x: object, in_features: int, device: torch.device | None = None) -> Tensor:
    """Checks that ``x`` is a floating tensor of shape ``(..., in_features)``.

    It must hold data (not on the meta device) and, if ``device`` is given, live there.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `x` to be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"Expected `x` to be floating point, got {x.dtype}.")
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"Expected `x` of shape (..., {in_features}), got {tuple(x.shape)}.")
    if x.is_meta:
        raise ValueError("Expected `x` to hold data, got a tensor on the meta device.")
    if device is not None and x.device != device:
        raise ValueError(f"Expected `x` on the base layer's device {device}, got {x.device}.")
    return x


def lora_dropout(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Inverted dropout: zeroes entries with probability ``p`` and scales the rest by ``1/(1-p)``.

    With a ``generator``, the same generator state gives the same mask.
    """
    if p == 0.0:
        return x
    keep = torch.bernoulli(torch.full_like(x, 1.0 - p), generator=generator)
    return x * keep / (1.0 - p)


def add_lora_term(params: Mapping[str, Tensor], x: Tensor, result: Tensor) -> Tensor:
    """``result + scaling · x @ Aᵀ @ Bᵀ`` with as few kernels as the dtypes allow.

    A group-constant ``lora_A`` (``(r, in // group_size)``) sees ``pool_groups(x)``.
    """
    A = params["lora_A"]
    h = F.linear(pool_groups(x, A.shape[1]), A) * params["scaling"]
    if result.dtype != h.dtype or result.ndim < 2:
        return result + F.linear(h, params["lora_B"])
    # One fused kernel for the up-projection and the sum.
    if result.ndim == 2:
        return torch.addmm(result, h, params["lora_B"].t())
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), params["lora_B"].t()
    )
    return flat.view(result.shape)


def apply_lora(
    base: HQQLinear,
    params: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    x: Tensor,
    /,
    *,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    weight_norm: Tensor | Sequence[Tensor | None] | None = None,
    exact: bool = False,
) -> Tensor:
    """The output of a quantized layer with LoRA or DoRA adapters.

    For a LoRA adapter::

        y = base(x) + scaling · dropout(x) @ Aᵀ @ Bᵀ

    For a DoRA adapter (with ``magnitude``), with ``W = dequantize(base)``,
    ``n = ‖W + scaling·B@A‖`` row-wise (detached) and ``c = magnitude / n``::

        y = base(x) + (c - 1) ⊙ (x @ Wᵀ) + c ⊙ scaling · x @ Aᵀ @ Bᵀ

    (with dropout, both terms see ``dropout(x)``, as in PEFT). A sequence of
    adapters adds each term in turn on the running output, as PEFT's several active
    adapters do: with ``y₀ = base(x)``::

        y_k = y_{k-1} + s_k · x @ A_kᵀ @ B_kᵀ                                     (LoRA)
        y_k = y_{k-1} + (c_k - 1) ⊙ (y_{k-1} - bias) + c_k ⊙ s_k · x @ A_kᵀ @ B_kᵀ  (DoRA)

    with ``c_k = m_k / ‖W + ΔW_k‖``, so the forward matches merging in order. A
    group-constant adapter (``lora_A`` of shape ``(r, in // group_size)``) applies
    ``lora_A`` to the input summed over each group: ``pool_groups(x) @ Aᵀ``.

    Dtypes follow PEFT: ``x`` is cast to the layer's compute dtype for the base and
    to the adapters' dtype for the adapter term, and the result comes back in the
    base output's dtype. Under autocast (for ``x``'s device type) nothing is cast.
    The base term is a pure function of the layer's tensors under ``torch.func``
    transforms and ``torch.compile``, and HQQ's own forward in eager mode (same bits).

    Decode (at most 16 tokens on CUDA, ``x`` in the layer's bf16/fp16 compute dtype,
    one adapter, no dropout, no gradient wanted), eager or compiled, unless
    ``exact``: the whole layer runs in two Triton kernels that read the packed codes,
    ``x`` and the adapter once each and never build a dense weight. Precision: the
    base product accumulates exact products in float32 and applies each group's
    scale and zero to the partial sums (HQQ's two roundings of each weight are
    skipped), the adapter term is float32 from the adapters' own values, and the
    sum is rounded once to the output dtype; so the result is at least as close to
    the float64 reference as the dense path, but not its bits. ``exact=True`` gives
    the dense path (HQQ's bits for the base term) everywhere.

    Args:
        base: a quantized ``HQQLinear`` with weight of shape ``(out, in)``.
        params: an adapter dict, or a sequence of them.
        x: input of shape ``(..., in)``.
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
        generator: drives dropout; the same state gives the same mask.
        weight_norm: DoRA's ``n`` from :func:`dora_weight_norm`, to skip
            recomputing it (one entry per adapter for a sequence, ``None`` for LoRA).
        exact: compute the base term with HQQ's bits (dense weight) on every path.

    Returns:
        Tensor of shape ``(..., out)`` in the base output's dtype.

    Raises:
        TypeError, ValueError: ``base``, ``params``, ``x`` or ``weight_norm`` do not fit.
    """
    check_hqq_layer(base)
    layout = quant_layout(base)
    device = base.W_q.device
    adapters = as_adapter_list(params, base, layout=layout, device=device)
    check_input(x, layout.in_features, device)
    norms = as_norm_list(weight_norm, adapters, base, layout=layout)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"Expected `dropout` in [0, 1), got {dropout!r}.")
    autocast = torch.is_autocast_enabled(x.device.type)
    if not exact and dropout == 0 and len(adapters) == 1:
        fused = _decode_layer(base, adapters[0], x, norms[0], layout)
        if fused is not None:
            return fused
    result = base_forward(base, x, layout, exact=exact)
    out_dtype = result.dtype
    for p, n in zip(adapters, norms, strict=True):
        dtype = p["lora_A"].dtype
        x_a = x if autocast or x.dtype == dtype else x.to(dtype)
        x_d = lora_dropout(x_a, float(dropout), generator)
        if "magnitude" in p:
            result = add_dora_term(base, p, x_d, result, n, dropped=dropout > 0)
        else:
            result = add_lora_term(p, x_d, result)
        if not autocast and result.dtype != out_dtype:
            result = result.to(out_dtype)
    return result


def _decode_layer(
    base: HQQLinear,
    params: Mapping[str, Tensor],
    x: Tensor,
    weight_norm: Tensor | None,
    layout: QuantLayout,
) -> Tensor | None:
    """The whole adapted layer through the decode kernels, or ``None`` if they don't apply."""
    A = params["lora_A"]
    if A.shape[1] != layout.in_features:  # group-constant adapters take the dense path
        return None
    if not _decode.eligible(x, base.W_q, layout, 16, *params.values(), weight_norm, base.bias):
        return None
    W_q, scale, zero = quant_tensors(base)
    scaling = params["scaling"].reshape(1).to(x.device)
    if "magnitude" not in params:
        return _decode.lora_decode(
            x, W_q, scale, zero, layout,
            lora_A=A, lora_B=params["lora_B"], scaling=scaling, bias=base.bias,
        )  # fmt: skip
    if weight_norm is None:
        weight_norm = dora_weight_norm(base, params)
    return _decode.lora_decode(
        x, W_q, scale, zero, layout,
        lora_A=A, lora_B=params["lora_B"], scaling=scaling,
        magnitude=params["magnitude"], weight_norm=weight_norm, bias=base.bias,
    )  # fmt: skip
