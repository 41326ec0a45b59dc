"""Adapter state as a plain dict of tensors: creation, validation, the delta weight.

An adapter for a layer with weight ``W`` of shape ``(out, in)`` is::

    {
        "lora_A":    Tensor[r, in],
        "lora_B":    Tensor[out, r],
        "scaling":   Tensor[()],        # lora_alpha / r, or lora_alpha / sqrt(r) (rslora)
        "magnitude": Tensor[out],       # DoRA only
    }

The layout is PEFT's (``lora_A.weight`` is ``r × in``), so PEFT state dicts map over
without transposes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hqqlora._base import HQQLinear, check_hqq_layer, quant_layout

__all__ = [
    "REQUIRED_KEYS",
    "as_adapter_list",
    "check_params",
    "delta_weight",
    "init_lora",
    "lora_scaling",
    "trainable_params",
]

REQUIRED_KEYS = ("lora_A", "lora_B", "scaling")
OPTIONAL_KEYS = ("magnitude",)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilized LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_params(
    params: object,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    name: str = "params",
) -> Mapping[str, Tensor]:
    """Checks one adapter dict and returns it unchanged.

    Args:
        params: the adapter dict.
        in_features: if given, the expected ``lora_A.shape[1]``.
        out_features: if given, the expected ``lora_B.shape[0]`` (and magnitude length).
        name: how to call ``params`` in error messages.

    Raises:
        TypeError: not a mapping, a leaf that is not a floating-point tensor, or
            ``lora_A``/``lora_B`` of different dtypes.
        ValueError: missing or unknown keys, or shapes that do not fit.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"Expected `{name}` to be a dict of tensors, got {type(params).__name__}.")
    missing = [k for k in REQUIRED_KEYS if k not in params]
    if missing:
        raise ValueError(
            f"Expected `{name}` to have keys {list(REQUIRED_KEYS)}, got {sorted(params)} "
            f"(missing {missing})."
        )
    unknown = sorted(set(params) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(
            f"Expected `{name}` keys among {list(REQUIRED_KEYS + OPTIONAL_KEYS)}, got unknown {unknown}."
        )
    for key, leaf in params.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"Expected `{name}[{key!r}]` to be a torch.Tensor, got {type(leaf).__name__}."
            )
        if not leaf.is_floating_point():
            raise TypeError(f"Expected `{name}[{key!r}]` to be floating point, got {leaf.dtype}.")
    A, B, scaling = params["lora_A"], params["lora_B"], params["scaling"]
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(
            f"Expected `{name}` lora_A of shape (r, in) and lora_B of shape (out, r), "
            f"got {tuple(A.shape)} and {tuple(B.shape)}."
        )
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"Expected `{name}` lora_A (r, in) and lora_B (out, r) to share r, "
            f"got lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}."
        )
    if A.dtype != B.dtype:
        raise TypeError(
            f"Expected `{name}` lora_A and lora_B of one dtype, got {A.dtype} and {B.dtype}."
        )
    if scaling.ndim != 0:
        raise ValueError(
            f"Expected `{name}['scaling']` to be 0-d, got shape {tuple(scaling.shape)}."
        )
    if in_features is not None and A.shape[1] != in_features:
        raise ValueError(
            f"Expected `{name}['lora_A']` of shape (r, {in_features}) to fit the layer, got {tuple(A.shape)}."
        )
    if out_features is not None and B.shape[0] != out_features:
        raise ValueError(
            f"Expected `{name}['lora_B']` of shape ({out_features}, r) to fit the layer, got {tuple(B.shape)}."
        )
    if "magnitude" in params:
        m = params["magnitude"]
        if m.shape != (B.shape[0],):
            raise ValueError(
                f"Expected `{name}['magnitude']` of shape ({B.shape[0]},), got {tuple(m.shape)}."
            )
    return params


def as_adapter_list(params: object, base: HQQLinear | None = None) -> list[Mapping[str, Tensor]]:
    """One adapter dict or a sequence of them, checked, as a list."""
    if isinstance(params, Mapping):
        items = [params]
    elif isinstance(params, Sequence) and not isinstance(params, str):
        items = list(params)
        if not items:
            raise ValueError("Expected at least one adapter, got an empty sequence.")
    else:
        raise TypeError(
            f"Expected `params` to be an adapter dict or a sequence of them, got {type(params).__name__}."
        )
    shape = quant_layout(base).shape if base is not None else (None, None)
    return [
        check_params(
            p,
            in_features=shape[1],
            out_features=shape[0],
            name="params" if len(items) == 1 else f"params[{i}]",
        )
        for i, p in enumerate(items)
    ]


def delta_weight(params: Mapping[str, Tensor]) -> Tensor:
    """The LoRA update ``ΔW = (lora_B @ lora_A) * scaling``.

    Args:
        params: an adapter dict with ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``.

    Returns:
        Tensor of shape ``(out, in)`` in the adapters' dtype.

    Example:
        >>> p = {"lora_A": torch.ones(2, 3), "lora_B": torch.ones(4, 2), "scaling": torch.tensor(0.5)}
        >>> delta_weight(p)[0, 0].item()
        1.0
    """
    check_params(params)
    return (params["lora_B"] @ params["lora_A"]) * params["scaling"]


def trainable_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The trainable leaves of an adapter: every key but ``scaling``.

    Works on one adapter dict and on a model-level dict (module path → adapter).
    """
    if params and all(isinstance(v, Mapping) for v in params.values()):
        return {k: trainable_params(v) for k, v in params.items()}
    return {k: v for k, v in params.items() if k != "scaling"}


def init_lora(
    base: HQQLinear,
    r: int,
    lora_alpha: float = 8,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: bool | str = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """A new adapter for ``base``, with PEFT's initialization.

    ``init_lora_weights``:
      * ``True``: ``lora_A`` kaiming-uniform (a=√5), i.e. U(-1/√in, 1/√in); ``lora_B`` zero.
      * ``"gaussian"``: ``lora_A ~ N(0, 1/r)`` (std ``1/r``, as PEFT); ``lora_B`` zero.
      * ``False``: both random (``nn.Linear``'s default init), so the adapter is not a no-op.

    With ``use_dora``, ``magnitude = ‖dequantize(W) + scaling·B@A‖`` row-wise.

    Args:
        base: the quantized layer, of weight shape ``(out, in)``.
        r: the rank, a positive int.
        lora_alpha: the LoRA alpha; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rslora).
        generator: makes the initialization reproducible.
        dtype: adapter dtype, float32 by default.

    Returns:
        The adapter dict, on the base layer's device.

    Raises:
        ValueError: ``r <= 0`` or an unknown ``init_lora_weights``.
        TypeError: ``base`` is not an ``HQQLinear``.
    """
    check_hqq_layer(base)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"Expected `r` to be a positive int, got {r!r}.")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(
            f"Expected `init_lora_weights` in (True, False, 'gaussian'), got {init_lora_weights!r}."
        )
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"Expected a floating-point `dtype`, got {dtype}.")
    out_features, in_features = quant_layout(base).shape
    device = base.W_q.device
    # Initialize in float32 so that the values do not depend on `dtype`.
    A = torch.empty(r, in_features, device=device)
    B = torch.empty(out_features, r, device=device)
    if init_lora_weights == "gaussian":
        torch.nn.init.normal_(A, std=1 / r, generator=generator)
    else:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    if init_lora_weights is False:
        torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
    else:
        torch.nn.init.zeros_(B)
    params = {
        "lora_A": A.to(dtype),
        "lora_B": B.to(dtype),
        "scaling": torch.tensor(lora_scaling(r, lora_alpha, use_rslora), device=device),
    }
    if use_dora:
        from hqqlora._dora import dora_weight_norm

        params["magnitude"] = dora_weight_norm(base, params).to(dtype)
    return params
