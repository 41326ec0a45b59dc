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

A *group-constant* adapter (QA-LoRA's pooling, ``init_lora(..., group_constant=True)``)
has ``lora_A`` of shape ``(r, in // group_size)``: its input is summed over each run of
``group_size`` consecutive features before ``lora_A``, so its update is constant within
each quantization group of an ``axis=1`` layer. Its width alone marks it, so every leaf
stays a tensor. It behaves exactly like the ordinary adapter whose ``lora_A`` repeats
each column ``group_size`` times (:func:`expand_group_constant`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor

from hqqlora._base import HQQLinear, QuantLayout, check_hqq_layer, quant_layout

__all__ = [
    "COMPUTE_DTYPES",
    "REQUIRED_KEYS",
    "as_adapter_list",
    "check_norm_values",
    "check_params",
    "delta_weight",
    "expand_group_constant",
    "expand_groups",
    "init_lora",
    "lora_scaling",
    "pool_groups",
    "pooling_group_size",
    "trainable_params",
]

REQUIRED_KEYS = ("lora_A", "lora_B", "scaling")
OPTIONAL_KEYS = ("magnitude",)
# The dtypes the forward computes in. float8 tensors are floating point too, but matmuls
# and elementwise maths refuse them (or need scaled kernels): refuse them at the boundary.
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPUTE_DTYPE_SET = frozenset(COMPUTE_DTYPES)
_LORA_KEYS = frozenset(REQUIRED_KEYS)
_DORA_KEYS = frozenset(REQUIRED_KEYS + OPTIONAL_KEYS)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilized LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_params(
    params: object,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    group_size: int | None = None,
    name: str = "params",
) -> Mapping[str, Tensor]:
    """Checks one adapter dict and returns it unchanged.

    Args:
        params: the adapter dict.
        in_features: if given, the expected ``lora_A.shape[1]``.
        out_features: if given, the expected ``lora_B.shape[0]`` (and magnitude length).
        group_size: if given (with ``in_features``), ``lora_A`` may also be a
            group-constant one of shape ``(r, in_features // group_size)``.
        name: how to call ``params`` in error messages.

    Raises:
        TypeError: not a mapping, a leaf that is not a tensor in one of
            :data:`COMPUTE_DTYPES` (float8 adapters are refused: the forward cannot
            compute in them), or ``lora_A``/``lora_B`` of different dtypes.
        ValueError: missing or unknown keys, shapes that do not fit, rank 0 (``lora_A``
            without rows), a leaf on the meta device (no data), or ``lora_A``,
            ``lora_B`` and ``magnitude`` on different devices.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"Expected `{name}` to be a dict of tensors, got {type(params).__name__}.")
    keys = params.keys()
    if keys != _LORA_KEYS and keys != _DORA_KEYS:
        missing = [k for k in REQUIRED_KEYS if k not in params]
        if missing:
            raise ValueError(
                f"Expected `{name}` to have keys {list(REQUIRED_KEYS)}, got {sorted(params)} "
                f"(missing {missing})."
            )
        unknown = sorted(set(params) - _DORA_KEYS)
        raise ValueError(
            f"Expected `{name}` keys among {list(REQUIRED_KEYS + OPTIONAL_KEYS)}, got unknown {unknown}."
        )
    for key, leaf in params.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"Expected `{name}[{key!r}]` to be a torch.Tensor, got {type(leaf).__name__}."
            )
        if leaf.dtype not in _COMPUTE_DTYPE_SET:
            if not leaf.is_floating_point():
                raise TypeError(
                    f"Expected `{name}[{key!r}]` to be floating point, got {leaf.dtype}."
                )
            raise TypeError(
                f"Expected `{name}[{key!r}]` in a dtype the forward computes in "
                f"({', '.join(str(d) for d in COMPUTE_DTYPES)}), got {leaf.dtype}."
            )
        if leaf.is_meta:
            raise ValueError(
                f"Expected `{name}[{key!r}]` to hold data, got a tensor on the meta device."
            )
    A, B, scaling = params["lora_A"], params["lora_B"], params["scaling"]
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(
            f"Expected `{name}` lora_A of shape (r, in) and lora_B of shape (out, r), "
            f"got {tuple(A.shape)} and {tuple(B.shape)}."
        )
    rank = A.shape[0]
    if rank != B.shape[1]:
        raise ValueError(
            f"Expected `{name}` lora_A (r, in) and lora_B (out, r) to share r, "
            f"got lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}."
        )
    if rank == 0:
        raise ValueError(
            f"Expected `{name}` of rank r >= 1, got lora_A of shape {tuple(A.shape)} (rank 0)."
        )
    device = A.device
    magnitude = params.get("magnitude")
    if B.device != device or (magnitude is not None and magnitude.device != device):
        devices = {
            key: params[key].device for key in ("lora_A", "lora_B", "magnitude") if key in params
        }
        got = ", ".join(f"{key} on {device}" for key, device in devices.items())
        raise ValueError(f"Expected the tensors of `{name}` on one device, got {got}.")
    scaling_device = scaling.device
    if scaling_device != device and scaling_device.type != "cpu":
        # A 0-d CPU tensor mixes with tensors of any device; another accelerator does not.
        raise ValueError(
            f"Expected `{name}['scaling']` on {device} (or the CPU), got {scaling_device}."
        )
    if A.dtype != B.dtype:
        raise TypeError(
            f"Expected `{name}` lora_A and lora_B of one dtype, got {A.dtype} and {B.dtype}."
        )
    if scaling.ndim != 0:
        raise ValueError(
            f"Expected `{name}['scaling']` to be 0-d, got shape {tuple(scaling.shape)}."
        )
    pooled_width = _pooled_width(in_features, group_size)
    if in_features is not None and A.shape[1] not in (in_features, pooled_width):
        hint = (
            "" if pooled_width is None else f" (a group-constant adapter has (r, {pooled_width}))"
        )
        raise ValueError(
            f"Expected `{name}['lora_A']` of shape (r, {in_features}) to fit the layer, "
            f"got {tuple(A.shape)}{hint}."
        )
    if out_features is not None and B.shape[0] != out_features:
        raise ValueError(
            f"Expected `{name}['lora_B']` of shape ({out_features}, r) to fit the layer, got {tuple(B.shape)}."
        )
    if magnitude is not None and magnitude.shape != (B.shape[0],):
        raise ValueError(
            f"Expected `{name}['magnitude']` of shape ({B.shape[0]},), got {tuple(magnitude.shape)}."
        )
    return params


def as_adapter_list(
    params: object,
    base: HQQLinear | None = None,
    *,
    layout: QuantLayout | None = None,
    device: torch.device | None = None,
) -> list[Mapping[str, Tensor]]:
    """One adapter dict or a sequence of them, checked (against ``base`` if given), as a list.

    With ``base``, the adapters must fit its shape and live on its device (``layout``
    and ``device``, when the caller has them at hand, are ``base``'s own).
    """
    items: list[Mapping[str, Tensor]]
    if type(params) is dict or isinstance(params, Mapping):  # the common case first
        items = [params]
    elif isinstance(params, Sequence) and not isinstance(params, str):
        items = list(params)
        if not items:
            raise ValueError("Expected at least one adapter, got an empty sequence.")
    else:
        raise TypeError(
            f"Expected `params` to be an adapter dict or a sequence of them, got {type(params).__name__}."
        )
    in_features = out_features = group_size = None
    if base is None:
        device = None
    else:
        layout = quant_layout(base) if layout is None else layout
        out_features, in_features = layout.shape
        if layout.axis == 1 and in_features % layout.group_size == 0:
            group_size = layout.group_size
        device = base.W_q.device if device is None else device
    single = len(items) == 1
    for i, p in enumerate(items):
        name = "params" if single else f"params[{i}]"
        check_params(
            p, in_features=in_features, out_features=out_features, group_size=group_size, name=name
        )
        if device is not None and p["lora_A"].device != device:
            raise ValueError(
                f"Expected `{name}` on the base layer's device {device}, got {p['lora_A'].device}."
            )
    return items


# Norms already found valid: id -> (weak reference, version counter, rows). Only ever
# skips a check of the same tensor object, unchanged since (its version counter counts
# in-place writes), so it never changes a result; it spares a held norm the host sync.
_VALID_NORMS: dict[int, tuple[weakref.ref[Tensor], int, tuple[int, ...] | None]] = {}


def _known_valid(norm: Tensor, rows: tuple[int, ...] | None) -> bool:
    entry = _VALID_NORMS.get(id(norm))
    return entry is not None and entry[0]() is norm and entry[1:] == (norm._version, rows)


def _remember_valid(norm: Tensor, rows: tuple[int, ...] | None) -> None:
    key = id(norm)

    def forget(_: object, key: int = key) -> None:
        _VALID_NORMS.pop(key, None)

    _VALID_NORMS[key] = (weakref.ref(norm, forget), norm._version, rows)


def check_norm_values(
    norm: Tensor, name: str = "weight_norm", *, rows: Sequence[int] | None = None
) -> Tensor:
    """Checks that DoRA row norms ``n = ‖W + ΔW‖`` are positive and finite; returns ``norm``.

    A zero gives ``c = magnitude / 0 = inf``, a negative entry flips the sign of its
    row's output and a NaN spreads through the row: each a silent wrong answer.

    The check reads the values, in eager mode even when ``norm`` lives on an
    accelerator (one host sync), and inside ``torch.func`` transforms (on the whole
    batch under ``vmap``); it is skipped while ``torch.compile`` traces, where a value
    cannot decide control flow. A tensor found valid is remembered (by identity and its
    version counter, which every in-place write bumps), so a ``weight_norm`` the caller
    holds costs the sync once, not on every call.

    Args:
        norm: the norms, ``(out,)`` or ``(n, out)``.
        name: how to call ``norm`` in the error.
        rows: only these rows of a 2-d ``norm`` are checked (a bank's DoRA entries).

    Raises:
        ValueError: a zero, negative or non-finite entry, or a tensor on the meta device.
    """
    if norm.is_meta:
        raise ValueError(f"Expected `{name}` to hold data, got a tensor on the meta device.")
    if torch.compiler.is_compiling():
        return norm
    rows_key = None if rows is None else tuple(rows)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(norm)
    if not wrapped and _known_valid(norm, rows_key):
        return norm
    values = norm
    while torch._C._functorch.is_functorch_wrapped_tensor(values):
        values = torch._C._functorch.get_unwrapped(values)
    values = values.detach()
    if rows_key is not None:
        values = values[list(rows_key)]
    if not bool(torch.all(torch.isfinite(values) & (values > 0))):
        bad = values[~(torch.isfinite(values) & (values > 0))]
        raise ValueError(
            f"Expected `{name}` with positive finite entries (row norms of W + ΔW), "
            f"got {bad.numel()} entries such as {bad[0].item()}."
        )
    if not wrapped:
        _remember_valid(norm, rows_key)
    return norm


def _pooled_width(in_features: int | None, group_size: int | None) -> int | None:
    if in_features is None or group_size is None or group_size <= 1:
        return None
    if in_features % group_size:
        return None
    return in_features // group_size


def pooling_group_size(params: Mapping[str, Tensor], in_features: int) -> int:
    """How many consecutive inputs ``lora_A`` sums: ``in_features // lora_A.shape[1]``.

    1 for an ordinary adapter, the quantization group size for a group-constant one.

    Raises:
        ValueError: ``lora_A.shape[1]`` does not divide ``in_features``.
    """
    width = params["lora_A"].shape[1]
    if width == 0 or in_features % width:
        raise ValueError(
            f"Expected `lora_A` of width dividing in_features={in_features}, got {tuple(params['lora_A'].shape)}."
        )
    return in_features // width


def pool_groups(x: Tensor, width: int) -> Tensor:
    """Sums the last dim of ``x`` over ``width`` runs of consecutive entries.

    ``pool_groups(x, k)[..., g] = Σ_{j<p} x[..., g·p + j]`` with ``p = x.shape[-1] // k``,
    so ``pool_groups(x, k) @ Aᵀ = x @ expand_groups(A, x.shape[-1])ᵀ``. Returns ``x``
    itself when ``width == x.shape[-1]``.

    Args:
        x: array of shape ``(..., in)``.
        width: the number of groups ``k``, dividing ``in``.

    Returns:
        Tensor of shape ``(..., width)``.
    """
    if x.shape[-1] == width:
        return x
    return x.unflatten(-1, (width, x.shape[-1] // width)).sum(-1)  # type: ignore[no-untyped-call,no-any-return]  # torch's Tensor.unflatten is unannotated


def expand_groups(t: Tensor, in_features: int) -> Tensor:
    """Repeats each column of ``t`` (shape ``(n, k)``) ``in_features // k`` times: ``(n, in_features)``."""
    if t.shape[-1] == in_features:
        return t
    return t.repeat_interleave(in_features // t.shape[-1], dim=-1)


def expand_group_constant(params: Mapping[str, Tensor], in_features: int) -> dict[str, Tensor]:
    """The ordinary adapter equal to a group-constant one: ``lora_A`` with repeated columns.

    The result has ``lora_A`` of shape ``(r, in_features)`` and the same forward,
    delta and merge; use it to save a group-constant adapter in PEFT's format.
    The other leaves are shared, not copied.
    """
    check_params(params)
    pooling_group_size(params, in_features)
    return {**params, "lora_A": expand_groups(params["lora_A"], in_features)}


def delta_weight(params: Mapping[str, Tensor], *, in_features: int | None = None) -> Tensor:
    """The LoRA update ``ΔW = (lora_B @ lora_A) * scaling``.

    For a group-constant adapter (``lora_A`` of shape ``(r, in // group_size)``) the
    update is ``expand_groups((lora_B @ lora_A) * scaling, in_features)``: each
    column repeated ``group_size`` times. Without ``in_features`` it comes compact,
    one column per group.

    Args:
        params: an adapter dict with ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``.
        in_features: the layer's input width; needed to expand a group-constant update.

    Returns:
        Tensor of shape ``(out, in)`` in the adapters' dtype.

    Example:
        >>> p = {"lora_A": torch.ones(2, 3), "lora_B": torch.ones(4, 2), "scaling": torch.tensor(0.5)}
        >>> delta_weight(p)[0, 0].item()
        1.0
    """
    check_params(params)
    delta = (params["lora_B"] @ params["lora_A"]) * params["scaling"]
    if in_features is None:
        return delta
    pooling_group_size(params, in_features)
    return expand_groups(delta, in_features)


@overload
def trainable_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]: ...
@overload
def trainable_params(
    params: Mapping[str, Mapping[str, Tensor]],
) -> dict[str, dict[str, Tensor]]: ...
def trainable_params(params: Mapping[str, Any]) -> dict[str, Any]:
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
    group_constant: bool = False,
) -> dict[str, Tensor]:
    """A new adapter for ``base``, with PEFT's initialization.

    ``init_lora_weights``:
      * ``True``: ``lora_A`` kaiming-uniform (a=√5), i.e. U(-1/√in, 1/√in); ``lora_B`` zero.
      * ``"gaussian"``: ``lora_A ~ N(0, 1/r)`` (std ``1/r``, as PEFT); ``lora_B`` zero.
      * ``False``: both random (``nn.Linear``'s default init), so the adapter is not a no-op.

    With ``use_dora``, ``magnitude = ‖dequantize(W) + scaling·B@A‖`` row-wise.

    With ``group_constant`` (QA-LoRA's pooling), ``lora_A`` has shape
    ``(r, in // group_size)`` and sees the input summed over each quantization
    group, so ``ΔW`` stays constant within every group through training and
    ``merge(..., method="zero_point")`` folds it into the zero points without loss.
    Summing (not averaging) keeps the maths plain: the adapter equals the ordinary
    one whose ``lora_A`` repeats each column ``group_size`` times. ``lora_A`` is
    drawn as that ordinary adapter's entries would be (fan-in ``in``), so the
    adapter's activations start at the usual scale. Needs an ``axis=1`` layer whose
    group size divides ``in``.

    Args:
        base: the quantized layer, of weight shape ``(out, in)``.
        r: the rank, a positive int.
        lora_alpha: the LoRA alpha; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rslora).
        generator: makes the initialization reproducible.
        dtype: adapter dtype, float32 by default.
        group_constant: make a group-constant (pooled) adapter.

    Returns:
        The adapter dict, on the base layer's device.

    Raises:
        ValueError: ``r <= 0``, an unknown ``init_lora_weights``, or
            ``group_constant`` on a layout that does not allow it.
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
    layout = quant_layout(base)
    out_features, in_features = layout.shape
    width: int | None
    width = in_features
    if group_constant:
        width = None
        if layout.axis == 1:
            width = (
                in_features
                if layout.group_size == 1
                else _pooled_width(in_features, layout.group_size)
            )
        if width is None:
            raise ValueError(
                "Expected an axis=1 layer whose group size divides in_features for "
                f"`group_constant=True`, got axis={layout.axis}, group_size={layout.group_size}, "
                f"in_features={in_features}."
            )
    device = base.W_q.device
    # Initialize in float32 so that the values do not depend on `dtype`.
    A = torch.empty(r, width, device=device)
    B = torch.empty(out_features, r, device=device)
    if init_lora_weights == "gaussian":
        torch.nn.init.normal_(A, std=1 / r, generator=generator)
    elif width == in_features:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    else:
        # kaiming-uniform(a=√5) with the layer's fan-in, not the pooled width.
        gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        bound = math.sqrt(3.0) * gain / math.sqrt(in_features)
        torch.nn.init.uniform_(A, -bound, bound, generator=generator)
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
