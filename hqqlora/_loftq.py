"""LoftQ-style initialization: quantize and adapt together so that ``dequant(Q) + ΔW ≈ W``."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from hqq.core.quantize import HQQLinear
from torch import Tensor

from hqqlora._base import dequantize
from hqqlora._params import lora_scaling

__all__ = ["loftq"]


def _quantize(
    weight: Tensor, quant_config: Mapping[str, Any], compute_dtype: torch.dtype, device: str
) -> HQQLinear:
    # from_weights handles group_size=None as HQQ does; the bias is carried separately.
    return HQQLinear.from_weights(
        weight.clone(),
        None,
        copy.deepcopy(dict(quant_config)),
        compute_dtype=compute_dtype,
        device=device,
    )


def loftq(
    weight: Tensor,
    /,
    quant_config: Mapping[str, Any],
    r: int,
    lora_alpha: float = 8,
    *,
    compute_dtype: torch.dtype,
    device: str = "cpu",
    num_iters: int = 5,
    use_rslora: bool = False,
    bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[HQQLinear, dict[str, Tensor]]:
    """Quantizes ``weight`` and fits a rank-``r`` adapter to what quantization lost.

    Alternates (LoftQ, Li et al. 2023) for ``t = 1..num_iters``, from ``ΔW₀ = 0``::

        Q_t  = HQQ(W - ΔW_{t-1})
        ΔW_t = SVD_r(W - dequant(Q_t))        # best rank-r fit of the residual

    and returns the pair with the smallest ``‖W - (dequant(Q_t) + ΔW_t)‖`` (HQQ's
    optimizer is not a projection, so later iterates are not always better). With
    ``SVD_r = U_r S_r V_rᵀ`` and ``scaling = lora_alpha / r`` (``/ √r`` with
    rslora), ``lora_B = U_r √S_r / √scaling`` and ``lora_A = √S_r V_rᵀ / √scaling``,
    so ``delta_weight(params) = ΔW``. The first iterate's quantization is plain
    quantization, and its SVD step can only lower the error, so the result is
    never worse than plain quantization of ``weight``.

    Args:
        weight: the full-precision weight, shape ``(out, in)``.
        quant_config: HQQ's quant config (``hqq.core.quantize.BaseQuantizeConfig``).
        r: the adapter rank, ``1 <= r <= min(out, in)``.
        lora_alpha: the LoRA alpha, a finite number ``> 0``.
        compute_dtype: the quantized layer's compute dtype.
        device: where the layer lives (``"cpu"`` on a machine without a GPU).
        num_iters: the number of alternations, at least 1.
        use_rslora: ``scaling = lora_alpha / √r``.
        bias: an optional bias ``(out,)`` to carry onto the layer.
        dtype: adapter dtype, float32 by default.

    Returns:
        ``(layer, params)``: a new ``HQQLinear`` and a LoRA adapter dict for it.

    Raises:
        TypeError: ``weight`` is not a floating-point tensor, ``quant_config`` not a
            dict, ``dtype`` or ``compute_dtype`` not a floating-point dtype.
        ValueError: ``weight`` is not 2-d, or ``r``, ``lora_alpha``, ``num_iters``,
            ``use_rslora`` or ``bias`` do not fit.

    Example:
        >>> layer, params = loftq(W, BaseQuantizeConfig(nbits=2, group_size=64), r=16,
        ...                       lora_alpha=32, compute_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(
            f"Expected `weight` to be a floating-point tensor, got {type(weight).__name__}."
        )
    if weight.ndim != 2:
        raise ValueError(f"Expected `weight` of shape (out, in), got {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    if (
        isinstance(r, bool)
        or not isinstance(r, int)
        or not 1 <= r <= min(out_features, in_features)
    ):
        raise ValueError(
            f"Expected `r` an int in [1, {min(out_features, in_features)}], got {r!r}."
        )
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, Real)
        or not (math.isfinite(lora_alpha) and lora_alpha > 0)
    ):
        raise ValueError(f"Expected `lora_alpha` a finite number > 0, got {lora_alpha!r}.")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"Expected `num_iters` a positive int, got {num_iters!r}.")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"Expected `use_rslora` a bool, got {use_rslora!r}.")
    if not isinstance(quant_config, Mapping):
        raise TypeError(
            "Expected `quant_config` to be a dict (hqq's BaseQuantizeConfig), "
            f"got {type(quant_config).__name__}."
        )
    for name, value in (("compute_dtype", compute_dtype), ("dtype", dtype)):
        if (value is not None or name == "compute_dtype") and (
            not isinstance(value, torch.dtype) or not value.is_floating_point
        ):
            raise TypeError(f"Expected `{name}` a floating-point torch.dtype, got {value!r}.")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_features,)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"Expected `bias` of shape ({out_features},) or None, got {got}.")
    dtype = torch.float32 if dtype is None else dtype
    scaling = lora_scaling(r, lora_alpha, use_rslora)

    target = weight.detach().float()
    delta = torch.zeros_like(target)
    best = None
    for _ in range(num_iters):
        layer = _quantize(target - delta, quant_config, compute_dtype, device)
        residual = target - dequantize(layer).float().to(target.device)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
        delta = (U * S) @ Vh
        error = float(torch.linalg.norm(residual - delta))
        if best is None or error < best[0]:
            best = (error, layer, U, S, Vh)
    _, layer, U, S, Vh = best

    root = S.sqrt() / math.sqrt(scaling)
    device_of = layer.W_q.device
    params = {
        "lora_A": (root.unsqueeze(-1) * Vh).to(device=device_of, dtype=dtype),
        "lora_B": (U * root).to(device=device_of, dtype=dtype),
        "scaling": torch.tensor(scaling, device=device_of),
    }
    if bias is not None:
        layer.bias = bias.detach().clone().to(device=device_of, dtype=compute_dtype)
    return layer, params
