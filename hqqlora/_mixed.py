"""Mixed-adapter batches: each row of a batch gets its own adapter, in one pass.

The adapters are stacked into an :class:`AdapterBank` (ranks padded with zeros to
the largest one: zero rows of ``A`` and zero columns of ``B`` add nothing), each
row gathers its adapter through an index tensor, and two batched matmuls compute
every row's term at once::

    term[i] = scaling[k] · x[i] @ A[k]ᵀ @ B[k]ᵀ          with k = index[i]

so the number of kernels does not depend on the number of adapters. Rows with
index ``-1`` (``"__base__"``) get no adapter term. A DoRA row with
``c = magnitude[k] / n[k]`` gets ``c ⊙ (base(x[i]) - bias + term[i]) + bias``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hqqlora._base import HQQLinear, base_forward, check_hqq_layer, quant_layout
from hqqlora._dora import dora_weight_norm
from hqqlora._params import check_params

__all__ = [
    "BASE",
    "AdapterBank",
    "bank_weight_norm",
    "mixed_batch",
    "mixed_batch_indexed",
    "stack_adapters",
]

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
            or a rank above ``max_rank``.
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


def _check_bank(bank: object) -> AdapterBank:
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"Expected `bank` to be an AdapterBank, got {type(bank).__name__}.")
    return bank


def _check_base_fits(base: HQQLinear, bank: AdapterBank) -> None:
    check_hqq_layer(base)
    shape = quant_layout(base).shape
    bank_shape = (bank.lora_B.shape[1], bank.lora_A.shape[2])
    if shape != bank_shape:
        raise ValueError(
            f"Expected adapters of (out, in) = {shape} to fit `base`, got {bank_shape}."
        )


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
        ValueError: a norm for an unknown or LoRA entry, or of the wrong shape.
    """
    _check_bank(bank)
    _check_base_fits(base, bank)
    weight_norm = {} if weight_norm is None else weight_norm
    if not isinstance(weight_norm, Mapping):
        raise TypeError(
            f"Expected `weight_norm` to be a dict of tensors or None, got {type(weight_norm).__name__}."
        )
    out_features = bank.magnitude.shape[1]
    for name, n in weight_norm.items():
        if name not in bank.names:
            raise _unknown_name(name, bank.names)
        if not bank.dora[bank.names.index(name)]:
            raise ValueError(
                f"Expected `weight_norm` only for DoRA adapters, got one for LoRA adapter {name!r}."
            )
        if not isinstance(n, Tensor) or n.shape != (out_features,):
            got = tuple(n.shape) if isinstance(n, Tensor) else type(n).__name__
            raise ValueError(
                f"Expected `weight_norm[{name!r}]` of shape ({out_features},), got {got}."
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


def _check_index(index: object, rows: int, size: int) -> Tensor:
    if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"Expected `index` to be an integer tensor, got {got}.")
    if index.shape != (rows,):
        raise ValueError(
            f"Expected `index` of shape ({rows},), one entry per row of x, got {tuple(index.shape)}."
        )
    # Checking values needs the data on the host: only when that costs no device sync.
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and rows:
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= size:
            raise ValueError(
                f"Expected `index` values in [-1, {size}), got values in [{low}, {high}]."
            )
    return index


def mixed_batch_indexed(
    x: Tensor,
    bank: AdapterBank,
    index: Tensor,
    /,
    *,
    base: HQQLinear | None = None,
    weight_norm: Tensor | Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Row ``i`` of ``x`` through adapter ``index[i]`` of ``bank`` (``-1``: none).

    With ``k = index[i]``, ``term[i] = scaling[k] · x[i] @ A[k]ᵀ @ B[k]ᵀ``, for all
    rows at once by gathering and batched matmuls. With ``base``, the layer output::

        y[i] = base(x[i]) + term[i]                                  (LoRA, or k = -1)
        y[i] = c ⊙ (base(x[i]) - bias + term[i]) + bias,  c = magnitude[k] / n[k]   (DoRA)

    and without ``base`` only ``term`` (LoRA banks only). Nothing here syncs with the
    host when ``weight_norm`` is given (or the bank has no DoRA entry) and ``index``
    is on an accelerator, so the call compiles into a serving loop.

    Dtypes follow :func:`apply_lora`: the term is computed in the bank's dtype, the
    layer output comes back in the base output's dtype.

    Args:
        x: input of shape ``(batch, ..., in)``.
        bank: from :func:`stack_adapters`.
        index: integer tensor of shape ``(batch,)``, values in ``[-1, n)``.
        base: the quantized layer.
        weight_norm: DoRA's ``n`` as a ``(n, out)`` tensor (from
            :func:`bank_weight_norm`; LoRA rows are ignored) or a dict name → ``(out,)``;
            computed from ``base`` when missing.

    Returns:
        ``(batch, ..., out)``: the layer output in the base output dtype with
        ``base``, else the adapter term in the bank's dtype.

    Raises:
        ValueError: shapes that do not fit, index values out of range (checked for
            CPU indices), or DoRA entries without ``base``.
    """
    _check_bank(bank)
    n_adapters, _, in_features = bank.lora_A.shape
    out_features = bank.lora_B.shape[1]
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"Expected `x` to be a floating-point tensor, got {got}.")
    if x.ndim < 2 or x.shape[-1] != in_features:
        raise ValueError(
            f"Expected `x` of shape (batch, ..., {in_features}), got {tuple(x.shape)}."
        )
    rows = x.shape[0]
    _check_index(index, rows, n_adapters)
    if base is None and any(bank.dora):
        dora_names = [n for n, d in zip(bank.names, bank.dora, strict=True) if d]
        raise ValueError(
            f"Expected `base` for DoRA adapters {dora_names}: DoRA needs the base output."
        )
    if base is not None:
        _check_base_fits(base, bank)
    if base is not None and any(bank.dora):
        if weight_norm is None or isinstance(weight_norm, Mapping):
            weight_norm = bank_weight_norm(base, bank, weight_norm)
        elif not isinstance(weight_norm, Tensor) or weight_norm.shape != bank.magnitude.shape:
            got = (
                tuple(weight_norm.shape)
                if isinstance(weight_norm, Tensor)
                else type(weight_norm).__name__
            )
            raise ValueError(
                f"Expected `weight_norm` of shape {tuple(bank.magnitude.shape)} or a dict, got {got}."
            )
    elif weight_norm is not None:
        raise ValueError("Expected no `weight_norm` for a bank without DoRA adapters, got one.")

    autocast = torch.is_autocast_enabled(x.device.type)
    x_a = x if autocast else x.to(bank.lora_A.dtype)
    x3 = x_a.reshape(rows, -1, in_features)
    valid = index >= 0
    safe = torch.where(valid, index, torch.zeros_like(index))
    A = bank.lora_A[safe]  # (batch, r_max, in)
    B = bank.lora_B[safe]  # (batch, out, r_max)
    h = torch.bmm(x3, A.transpose(1, 2))
    # Row scalings zero out the "__base__" rows; multiply then cast back, as a 0-d scaling does.
    row_scaling = bank.scaling[safe] * valid
    h = (h * row_scaling[:, None, None]).to(h.dtype)
    term = torch.bmm(h, B.transpose(1, 2))  # (batch, L, out)
    out_shape = (*x.shape[:-1], out_features)
    if base is None:
        return term.reshape(out_shape)

    result = base_forward(base, x)
    out_dtype = result.dtype
    result3 = result.reshape(rows, -1, out_features)
    lora_out = (result3 + term).to(out_dtype)
    if not any(bank.dora):
        return lora_out.reshape(out_shape)
    c = (bank.magnitude / weight_norm.detach())[safe][:, None, :]  # (batch, 1, out)
    base_term = result3.to(term.dtype)
    bias = base.bias
    if bias is None:
        dora_out = c * (base_term + term)
    else:
        bias = bias.to(term.dtype)
        dora_out = torch.addcmul(bias, base_term - bias + term, c)
    use_dora = (bank.is_dora[safe] & valid)[:, None, None]
    return torch.where(use_dora, dora_out.to(out_dtype), lora_out).reshape(out_shape)


def mixed_batch(
    x: Tensor,
    params_by_name: Mapping[str, Mapping[str, Tensor]],
    names: Sequence[str],
    /,
    *,
    base: HQQLinear | None = None,
    weight_norm: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Row ``i`` of ``x`` (dim 0) through adapter ``names[i]``; ``"__base__"``: none.

    Equal to applying each row's adapter on its own (:func:`apply_lora`), computed
    in one pass: the adapters named in the batch are stacked (:func:`stack_adapters`)
    and :func:`mixed_batch_indexed` does the rest, so the kernel count does not grow
    with the number of adapters. For a hot serving loop, stack once and call
    :func:`mixed_batch_indexed` with an index tensor instead.

    With ``base`` the full layer output; without it only the adapter term, so
    ``base(x) + mixed_batch(x, p, names)`` is the output for LoRA adapters. DoRA
    adapters need ``base``.

    Args:
        x: input of shape ``(batch, ..., in)``.
        params_by_name: adapter name → adapter dict.
        names: ``batch`` names, each a key of ``params_by_name`` or ``"__base__"``.
        base: the quantized layer.
        weight_norm: DoRA adapter name → ``dora_weight_norm(base, params)``, to skip
            recomputing it; missing ones are computed.

    Returns:
        ``(batch, ..., out)``: the layer output (base output dtype) with ``base``,
        else the adapter term (adapters' dtype).

    Raises:
        ValueError: an unknown name (the message lists the known ones),
            ``len(names) != x.shape[0]``, a DoRA adapter without ``base``, or
            adapters whose shapes do not fit.

    Example:
        >>> y = mixed_batch(x, {"a": p_a, "b": p_b}, ["a", "__base__", "b"], base=layer)  # doctest: +SKIP
    """
    if not isinstance(params_by_name, Mapping):
        raise TypeError(
            f"Expected `params_by_name` to be a dict of adapter dicts, got {type(params_by_name).__name__}."
        )
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"Expected `names` to be a list of adapter names, got {type(names).__name__}."
        )
    if not isinstance(x, Tensor) or x.ndim < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected `x` of shape (batch, ..., in), got {got}.")
    if len(names) != x.shape[0]:
        raise ValueError(
            f"Expected one adapter name per row of x ({x.shape[0]}), got {len(names)} names."
        )
    known = list(params_by_name)
    if BASE in params_by_name:
        raise ValueError(f"Expected adapter names other than the reserved {BASE!r}, got {BASE!r}.")
    for name in names:
        if name != BASE and name not in params_by_name:
            raise _unknown_name(name, known)
    shape = quant_layout(check_hqq_layer(base)).shape if base is not None else (None, None)
    for name, p in params_by_name.items():
        check_params(
            p, in_features=shape[1], out_features=shape[0], name=f"params_by_name[{name!r}]"
        )
    if weight_norm is not None:
        if not isinstance(weight_norm, Mapping):
            raise TypeError(
                f"Expected `weight_norm` to be a dict of tensors, got {type(weight_norm).__name__}."
            )
        for name in weight_norm:
            if name not in params_by_name:
                raise _unknown_name(name, known)
            if "magnitude" not in params_by_name[name]:
                raise ValueError(
                    f"Expected `weight_norm` only for DoRA adapters, got one for LoRA adapter {name!r}."
                )
    used = list(dict.fromkeys(n for n in names if n != BASE))
    if not used:
        # Only "__base__" rows: no adapter term.
        if base is not None:
            check_hqq_layer(base)
            return base_forward(base, x)
        if not params_by_name:
            raise ValueError(
                "Expected at least one adapter in `params_by_name` to size the term, got none."
            )
        p = next(iter(params_by_name.values()))
        return x.new_zeros((*x.shape[:-1], p["lora_B"].shape[0]), dtype=p["lora_B"].dtype)
    bank = stack_adapters(params_by_name, used)
    position = {name: k for k, name in enumerate(used)}
    index = torch.tensor([position.get(n, -1) for n in names], device=bank.lora_A.device)
    if weight_norm is not None:
        weight_norm = {n: v for n, v in weight_norm.items() if n in position} or None
    return mixed_batch_indexed(x, bank, index, base=base, weight_norm=weight_norm)
