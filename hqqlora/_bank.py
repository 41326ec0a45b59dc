"""Adapter banks: several adapters of one layer stacked along a new axis 0.

A bank holds ``n`` adapters as ``lora_A`` ``(n, r_max, in)``, ``lora_B`` ``(n, out, r_max)``,
``scaling`` ``(n,)`` and ``magnitude`` ``(n, out)``, ranks padded with zeros to the largest
(zero rows of ``A`` and zero columns of ``B`` add nothing), so that one gather by an index
tensor picks each row's adapter (:mod:`hqqlora._mixed`). :func:`bank_weight_norm` holds
DoRA's ``‖W + s·B A‖`` per entry, computed once for serving.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hqqlora._base import HQQLinear, check_hqq_layer, quant_layout
from hqqlora._dora import dora_weight_norm
from hqqlora._params import check_norm_values, check_params

__all__ = ["BASE", "AdapterBank", "bank_weight_norm", "check_bank_fields", "stack_adapters"]

BASE = "__base__"


class AdapterBank(NamedTuple):
    """Adapters stacked along a new axis 0, built by :func:`stack_adapters`.

    Attributes:
        lora_A: ``(n, r_max, in)``; rows past an adapter's rank are zero.
        lora_B: ``(n, out, r_max)``; columns past an adapter's rank are zero.
        scaling: ``(n,)``.
        magnitude: ``(n, out)``; ones for LoRA entries.
        is_dora: ``(n,)`` bool, on the adapters' device.
        names: the adapter names, in bank order (static data).
        dora: which entries are DoRA, as static Python bools.
    """

    lora_A: Tensor
    lora_B: Tensor
    scaling: Tensor
    magnitude: Tensor
    is_dora: Tensor
    names: tuple[str, ...]
    dora: tuple[bool, ...]


def _unknown_name(name: object, known: Sequence[str]) -> ValueError:
    return ValueError(f"Expected adapter names among {[*known, BASE]}, got {name!r}.")


def _dora_needs_base(dora_names: list[str]) -> ValueError:
    return ValueError(
        f"Expected `base` for DoRA adapters {dora_names}: DoRA needs the base output."
    )


def stack_adapters(
    params_by_name: Mapping[str, Mapping[str, Tensor]],
    names_order: Sequence[str] | None = None,
    *,
    max_rank: int | None = None,
) -> AdapterBank:
    """Stacks adapters of one layer into an :class:`AdapterBank`.

    Ranks are padded with zeros to ``max_rank`` (the largest rank by default), which
    changes no adapter's output. Stacking is differentiable: gradients reach the
    original tensors.

    Args:
        params_by_name: adapter name → adapter dict, all for one layer shape and of
            one dtype.
        names_order: which adapters to stack, in which order; all of
            ``params_by_name`` in its order by default.
        max_rank: the bank's rank; fixing it keeps shapes stable across banks.

    Returns:
        The bank, on the adapters' device, in their dtype (``scaling`` in the
        promoted dtype of the scalings).

    Raises:
        ValueError: no adapters, an unknown or reserved name, shapes that differ,
            adapters on different devices, or a rank above ``max_rank``.
        TypeError: adapters of different dtypes, or a malformed adapter.

    Example:
        >>> bank = stack_adapters({"a": p_a, "b": p_b})  # doctest: +SKIP
        >>> y = mixed_batch_indexed(x, bank, torch.tensor([0, -1, 1]), base=layer)  # doctest: +SKIP
    """
    if not isinstance(params_by_name, Mapping):
        raise TypeError(
            f"Expected `params_by_name` to be a dict of adapter dicts, got {type(params_by_name).__name__}."
        )
    names = list(params_by_name) if names_order is None else list(names_order)
    if not names:
        raise ValueError("Expected at least one adapter to stack, got none.")
    for name in names:
        if name == BASE:
            raise ValueError(
                f"Expected adapter names other than the reserved {BASE!r}, got {BASE!r}."
            )
        if name not in params_by_name:
            raise _unknown_name(name, list(params_by_name))
    if len(set(names)) != len(names):
        raise ValueError(f"Expected distinct names in `names_order`, got {names}.")
    adapters = [check_params(params_by_name[n], name=f"params_by_name[{n!r}]") for n in names]
    first = adapters[0]
    out_features, dtype = first["lora_B"].shape[0], first["lora_A"].dtype
    _check_stackable(names, adapters)
    ranks = [p["lora_A"].shape[0] for p in adapters]
    r_max = max(ranks)
    if max_rank is not None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
            raise ValueError(f"Expected `max_rank` to be a positive int, got {max_rank!r}.")
        if r_max > max_rank:
            too_big = [n for n, r in zip(names, ranks, strict=True) if r > max_rank]
            raise ValueError(
                f"Expected adapter ranks <= max_rank={max_rank}, got rank {r_max} ({too_big})."
            )
        r_max = max_rank
    device = first["lora_A"].device
    lora_A = torch.stack(
        [F.pad(p["lora_A"], (0, 0, 0, r_max - r)) for p, r in zip(adapters, ranks, strict=True)]
    )
    lora_B = torch.stack(
        [F.pad(p["lora_B"], (0, r_max - r)) for p, r in zip(adapters, ranks, strict=True)]
    )
    scaling_dtype = functools.reduce(torch.promote_types, [p["scaling"].dtype for p in adapters])
    scaling = torch.stack([p["scaling"].to(device=device, dtype=scaling_dtype) for p in adapters])
    ones = torch.ones(out_features, dtype=dtype, device=device)
    magnitude = torch.stack([p.get("magnitude", ones).to(device) for p in adapters])
    dora = tuple("magnitude" in p for p in adapters)
    is_dora = torch.tensor(dora, dtype=torch.bool, device=device)
    return AdapterBank(lora_A, lora_B, scaling, magnitude, is_dora, tuple(names), dora)


def _check_stackable(names: Sequence[str], adapters: Sequence[Mapping[str, Tensor]]) -> None:
    """Checks that checked adapters share one shape, dtype and device, as a bank needs."""
    first = adapters[0]
    out_features, in_features = first["lora_B"].shape[0], first["lora_A"].shape[1]
    dtype = first["lora_A"].dtype
    for name, p in zip(names, adapters, strict=True):
        check_params(
            p, in_features=in_features, out_features=out_features, name=f"params_by_name[{name!r}]"
        )
        if p["lora_A"].dtype != dtype or p.get("magnitude", p["lora_A"]).dtype != dtype:
            raise TypeError(
                f"Expected all adapters in one dtype ({dtype}), got {p['lora_A'].dtype} for {name!r}."
            )
        if p["lora_A"].device != first["lora_A"].device:
            raise ValueError(
                f"Expected all adapters on one device ({first['lora_A'].device}), "
                f"got {p['lora_A'].device} for {name!r}."
            )


def check_bank_fields(bank: AdapterBank, name: str = "`bank`") -> None:
    """Checks that ``bank``'s fields agree in shape (a bank built by hand may not): the
    CUDA kernels index every field by ``lora_A``'s shape, reading outside a shorter one.
    ``name`` is how the messages call the bank."""
    A, B = bank.lora_A, bank.lora_B
    if not (isinstance(A, Tensor) and isinstance(B, Tensor) and A.ndim == 3 and B.ndim == 3):
        raise ValueError(
            f"Expected {name}.lora_A of shape (n, r, in) and .lora_B of shape (n, out, r), "
            f"got {getattr(A, 'shape', type(A).__name__)} and {getattr(B, 'shape', type(B).__name__)}."
        )
    n, rank, _ = A.shape
    out_features = B.shape[1]
    expected = {
        "lora_B": (n, out_features, rank),
        "scaling": (n,),
        "magnitude": (n, out_features),
        "is_dora": (n,),
    }
    for field, shape in expected.items():
        value = getattr(bank, field)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"Expected {name}.{field} of shape {shape} (lora_A: {tuple(A.shape)}), got "
                f"{got}; build banks with hqqlora.stack_adapters."
            )
    if len(bank.names) != n or len(bank.dora) != n:
        raise ValueError(
            f"Expected {n} {name}.names and {name}.dora flags (lora_A: {tuple(A.shape)}), "
            f"got {len(bank.names)} and {len(bank.dora)}."
        )


def _check_bank(bank: object) -> AdapterBank:
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"Expected `bank` to be an AdapterBank, got {type(bank).__name__}.")
    check_bank_fields(bank)
    return bank


def _check_base_fits(base: HQQLinear, bank: AdapterBank) -> None:
    check_hqq_layer(base)
    shape = quant_layout(base).shape
    bank_shape = (bank.lora_B.shape[1], bank.lora_A.shape[2])
    if shape != bank_shape:
        raise ValueError(
            f"Expected adapters of (out, in) = {shape} to fit `base`, got {bank_shape}."
        )
    if base.W_q.device != bank.lora_A.device:
        raise ValueError(
            f"Expected the adapters on the base layer's device {base.W_q.device}, "
            f"got {bank.lora_A.device}."
        )


def _check_norm_dict(
    weight_norm: object,
    params_by_name: Mapping[str, object],
    is_dora: Mapping[str, bool],
    out_features: int | None,
    device: torch.device | None,
) -> Mapping[str, Tensor]:
    """Checks a dict adapter name → DoRA row norms ``(out,)``: names, shapes, devices, values."""
    if not isinstance(weight_norm, Mapping):
        raise TypeError(
            f"Expected `weight_norm` to be a dict of tensors, got {type(weight_norm).__name__}."
        )
    for name, n in weight_norm.items():
        if name not in params_by_name:
            raise _unknown_name(name, list(params_by_name))
        if not is_dora[name]:
            raise ValueError(
                f"Expected `weight_norm` only for DoRA adapters, got one for LoRA adapter {name!r}."
            )
        shape = (out_features,) if out_features is not None else None
        if not isinstance(n, Tensor) or n.ndim != 1 or (shape is not None and n.shape != shape):
            got = tuple(n.shape) if isinstance(n, Tensor) else type(n).__name__
            raise ValueError(
                f"Expected `weight_norm[{name!r}]` of shape ({out_features or 'out'},), got {got}."
            )
        if device is not None and n.device != device and n.device.type != "meta":
            raise ValueError(
                f"Expected `weight_norm[{name!r}]` on the adapters' device {device}, got {n.device}."
            )
        check_norm_values(n, f"weight_norm[{name!r}]")
    return weight_norm


def bank_weight_norm(
    base: HQQLinear,
    bank: AdapterBank,
    weight_norm: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """DoRA's detached row norms ``n`` for every entry of a bank, stacked: ``(n, out)``.

    Entry ``k`` is ``weight_norm[names[k]]`` when given, else
    ``dora_weight_norm(base, adapter k)`` for a DoRA entry, and ones for a LoRA
    entry. Compute it once and pass it to :func:`mixed_batch_indexed` so that the
    serving loop never dequantizes the base.

    Raises:
        ValueError: a norm for an unknown or LoRA entry, of the wrong shape or device,
            or with a zero, negative or non-finite entry (values are read in eager
            mode, with one host sync per norm on an accelerator).
    """
    _check_bank(bank)
    _check_base_fits(base, bank)
    weight_norm = {} if weight_norm is None else weight_norm
    if not isinstance(weight_norm, Mapping):
        raise TypeError(
            f"Expected `weight_norm` to be a dict of tensors or None, got {type(weight_norm).__name__}."
        )
    names = dict.fromkeys(bank.names)
    _check_norm_dict(
        weight_norm,
        names,
        dict(zip(bank.names, bank.dora, strict=True)),
        bank.magnitude.shape[1],
        bank.lora_A.device,
    )
    ones = torch.ones_like(bank.magnitude[0])
    norms = []
    for k, name in enumerate(bank.names):
        if name in weight_norm:
            norms.append(weight_norm[name].detach().to(ones))
        elif bank.dora[k]:
            # The padded A and B have the same product B @ A as the original ones.
            p = {"lora_A": bank.lora_A[k], "lora_B": bank.lora_B[k], "scaling": bank.scaling[k]}
            norms.append(dora_weight_norm(base, p).to(ones))
        else:
            norms.append(ones)
    return torch.stack(norms)
