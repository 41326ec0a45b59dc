"""Composing LoRA adapters: scaling, negation, exact sums and PEFT's weighted merges.

Every function here takes adapter dicts (or whole-model dicts, module path → adapter
dict) and returns new ones; inputs are never modified. For an adapter ``p`` write
``ΔW(p) = p["scaling"] · p["lora_B"] @ p["lora_A"]``, of shape ``(out, in)``.

* :func:`scale` and :func:`negate` give ``w·ΔW(p)`` and ``-ΔW(p)`` exactly.
* :func:`add` gives ``ΔW(p1) + ΔW(p2)`` exactly by concatenating ranks.
* :func:`combine` follows PEFT's ``add_weighted_adapter``: ``"cat"`` is exact,
  ``"svd"`` is the best rank-``k`` approximation of ``Σ wᵢ·ΔWᵢ``, and ``"linear"``,
  ``"ties"``, ``"dare_*"``, ``"magnitude_prune"`` (and their ``_svd`` variants)
  are the usual task-arithmetic heuristics.

Arithmetic runs in float32 (float64 for float64 adapters) and the results are cast
back to the adapters' dtype, so bf16/fp16 adapters work, SVD methods included
(PEFT's SVD refuses half precision).

DoRA adapters are refused with ``ValueError``: DoRA's output is
``c ⊙ (W + ΔW)`` with ``c = magnitude / ‖W + ΔW‖``, which is not linear in ``ΔW``,
so sums and scalings of DoRA adapters have no meaning that keeps the magnitudes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast, get_args, overload

import optree
import torch
from torch import Tensor

from hqqlora._params import check_params

__all__ = ["METHODS", "CombineInfo", "add", "combine", "negate", "scale"]

Method = Literal[
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
METHODS: tuple[str, ...] = get_args(Method)
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SAME_RANK = ("linear", *_PRUNING)


class CombineInfo(NamedTuple):
    """How far a combination is from the dense weighted sum (0-d float32 tensors).

    Attributes:
        error: ``‖ΔW(combined) − Σᵢ wᵢ·ΔWᵢ‖_F``, the distance to plain task arithmetic
            (zero up to rounding for ``"cat"``, the cross terms for ``"linear"``).
        rel_error: ``error / ‖Σᵢ wᵢ·ΔWᵢ‖_F`` (``error`` itself when the sum is zero).
        truncation_error: for SVD methods, ``sqrt(Σ_{j>k} σⱼ²)``, the Frobenius norm of
            what the rank-``k`` truncation dropped from the dense merged delta;
            zero for the other methods, which truncate nothing.
    """

    error: Tensor
    rel_error: Tensor
    truncation_error: Tensor


# --- structure: one adapter or a model-level dict -------------------------------------------


def _is_adapter(tree: object) -> bool:
    return isinstance(tree, Mapping) and "lora_A" in tree


def _is_model_dict(tree: object) -> bool:
    return (
        isinstance(tree, Mapping)
        and not _is_adapter(tree)
        and all(isinstance(v, Mapping) for v in tree.values())
    )


def _kind(tree: object, name: str) -> str:
    if _is_adapter(tree):
        return "adapter"
    if _is_model_dict(tree):
        return "model"
    raise TypeError(
        f"Expected `{name}` to be an adapter dict or a dict of module path -> adapter dict, "
        f"got {type(tree).__name__}."
    )


def _check_lora(params: object, name: str) -> Mapping[str, Tensor]:
    check_params(params, name=name)
    if "magnitude" in cast(Mapping[str, Tensor], params):
        raise ValueError(
            f"Expected LoRA adapters (no 'magnitude'), got a DoRA adapter for `{name}`: DoRA is not "
            "linear in ΔW, so its adapters cannot be scaled, added or combined."
        )
    return cast(Mapping[str, Tensor], params)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --- scale, negate, add --------------------------------------------------------------------


def _check_weight(w: object, name: str = "w") -> None:
    if isinstance(w, Tensor):
        if w.ndim != 0:
            raise ValueError(
                f"Expected `{name}` to be a number or a 0-d tensor, got shape {tuple(w.shape)}."
            )
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"Expected `{name}` to be a real number, got a {w.dtype} tensor.")
    elif isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(
            f"Expected `{name}` to be a number or a 0-d tensor, got {type(w).__name__}."
        )


def _scale_one(params: Mapping[str, Tensor], w: float | Tensor, name: str) -> dict[str, Tensor]:
    _check_lora(params, name)
    B = params["lora_B"]
    scaled = (B.to(_compute_dtype(B.dtype)) * w).to(B.dtype)
    return {"lora_A": params["lora_A"], "lora_B": scaled, "scaling": params["scaling"]}


def scale(params: Mapping[str, Any], w: float | Tensor, /) -> dict[str, Any]:
    """The adapter(s) with delta ``w · ΔW``: ``lora_B ← w · lora_B``.

    ``w`` goes into ``lora_B`` rather than into ``scaling`` so that ``scaling`` keeps
    meaning ``lora_alpha / r`` and the adapter still saves with its PEFT config.

    Args:
        params: an adapter dict (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``) or a
            model-level dict (module path → adapter dict).
        w: a number or a 0-d tensor (a tensor keeps autograd through ``w``).

    Returns:
        A new dict of the same structure. ``lora_A`` and ``scaling`` are shared with the
        input (tensors are never modified in place).

    Raises:
        ValueError: a DoRA adapter, or ``w`` not 0-d.
        TypeError: ``w`` not a number or tensor; not an adapter or model-level dict.

    Example:
        >>> p = {"lora_A": torch.ones(1, 2), "lora_B": torch.ones(3, 1), "scaling": torch.tensor(2.0)}
        >>> scale(p, 0.5)["lora_B"][0, 0].item()
        0.5
    """
    _check_weight(w)
    kind = _kind(params, "params")
    if kind == "adapter":
        return _scale_one(params, w, "params")
    return cast(
        dict[str, Any],
        optree.tree_map_with_path(
            lambda path, p: _scale_one(p, w, f"params[{path[0]!r}]"),
            cast(Any, dict(params)),
            is_leaf=_is_adapter,
        ),
    )


def negate(params: Mapping[str, Any], /) -> dict[str, Any]:
    """The adapter(s) with delta ``-ΔW`` (``lora_B ← -lora_B``, exact in every dtype).

    Args:
        params: an adapter dict or a model-level dict.

    Returns:
        A new dict of the same structure.

    Raises:
        ValueError: a DoRA adapter.
    """
    return scale(params, -1.0)


def _cat(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float | Tensor]
) -> dict[str, Tensor]:
    """``[A₁; A₂; …]``, ``[w₁B₁, w₂B₂, …]``, with each scaling folded into B if they differ."""
    dtype = _common_dtype(adapters)
    compute = _compute_dtype(dtype)
    scalings = [p["scaling"] for p in adapters]
    same = all(torch.equal(s, scalings[0]) for s in scalings[1:])
    As, Bs = [], []
    for p, w in zip(adapters, weights, strict=True):
        factor = w if same else w * p["scaling"].to(compute)
        B = p["lora_B"]
        if isinstance(factor, (int, float)) and factor == 1 and B.dtype == dtype:
            Bs.append(B)
        else:
            Bs.append((B.to(compute) * factor).to(dtype))
        As.append(p["lora_A"].to(dtype))
    out_scaling = scalings[0] if same else torch.ones_like(scalings[0])
    return {"lora_A": torch.cat(As, dim=0), "lora_B": torch.cat(Bs, dim=1), "scaling": out_scaling}


def _common_dtype(adapters: Sequence[Mapping[str, Tensor]]) -> torch.dtype:
    dtype = adapters[0]["lora_A"].dtype
    for p in adapters[1:]:
        dtype = torch.promote_types(dtype, p["lora_A"].dtype)
    return dtype


def _check_same_shape(adapters: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> None:
    out_features, in_features = adapters[0]["lora_B"].shape[0], adapters[0]["lora_A"].shape[1]
    for p, name in zip(adapters[1:], names[1:], strict=True):
        shape = (p["lora_B"].shape[0], p["lora_A"].shape[1])
        if shape != (out_features, in_features):
            raise ValueError(
                f"Expected adapters of one layer shape (out, in) = {(out_features, in_features)}, "
                f"got {shape} for `{name}`."
            )


def _add_one(
    p1: Mapping[str, Tensor], p2: Mapping[str, Tensor], names: tuple[str, str]
) -> dict[str, Tensor]:
    _check_lora(p1, names[0])
    _check_lora(p2, names[1])
    _check_same_shape([p1, p2], names)
    return _cat([p1, p2], [1, 1])


def add(p1: Mapping[str, Any], p2: Mapping[str, Any], /) -> dict[str, Any]:
    """The adapter(s) whose delta is exactly ``ΔW(p1) + ΔW(p2)``, by concatenating ranks.

    With ``s₁ = s₂ = s``: ``A = [A₁; A₂]`` ``(r₁+r₂, in)``, ``B = [B₁, B₂]``
    ``(out, r₁+r₂)``, ``scaling = s``, so ``s·B@A = s·B₁@A₁ + s·B₂@A₂``. When the
    scalings differ, each is folded into its own ``B`` (``Bᵢ ← sᵢ·Bᵢ``, computed in
    float32 and cast back) and ``scaling = 1``.

    For model-level dicts the sum is taken per module path; a path in only one of them
    keeps that adapter (the other's delta there is zero).

    Args:
        p1: an adapter dict or a model-level dict.
        p2: the same kind as ``p1``.

    Returns:
        A new dict of the same structure, of rank ``r₁ + r₂`` per module, in the promoted
        dtype of the two.

    Raises:
        ValueError: DoRA adapters, or adapters of different layer shapes.
        TypeError: mixing an adapter dict with a model-level dict.
    """
    k1, k2 = _kind(p1, "p1"), _kind(p2, "p2")
    if k1 != k2:
        raise TypeError(f"Expected `p1` and `p2` of one kind, got a {k1} dict and a {k2} dict.")
    if k1 == "adapter":
        return _add_one(p1, p2, ("p1", "p2"))
    result = {}
    for path in list(p1) + [k for k in p2 if k not in p1]:
        if path in p1 and path in p2:
            result[path] = _add_one(p1[path], p2[path], (f"p1[{path!r}]", f"p2[{path!r}]"))
        else:
            source, name = (p1, "p1") if path in p1 else (p2, "p2")
            result[path] = dict(_check_lora(source[path], f"{name}[{path!r}]"))
    return result


# --- task-arithmetic primitives (PEFT's merge_utils semantics), on stacked tensors ----------


def _weighted_sum(tensors: Tensor, weights: Tensor) -> Tensor:
    """``Σᵢ wᵢ·tᵢ`` for ``tensors`` of shape ``(n, ...)`` and ``weights`` ``(n,)``."""
    return cast(Tensor, torch.tensordot(weights, tensors, dims=1))


def _magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keeps the ``int(density · numel)`` entries of largest ``|t|``, zeroes the rest."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def _random_prune(tensor: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keeps each entry with probability ``density`` and rescales by ``1 / density``."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _majority_sign_mask(tensors: Tensor, method: str) -> Tensor:
    """Where each ``tᵢ`` agrees with the elected sign ``sign(Σᵢ tᵢ)`` (or of ``Σᵢ sign(tᵢ)``)."""
    signs = tensors.sign()
    total = tensors.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(tensors.dtype)
    return signs == elected


def _disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """``Σᵢ mᵢ·tᵢ / max(1, Σᵢ mᵢ)``: the mean over the entries that agree with the sign."""
    kept = mask.sum(dim=0).clamp(min=1)
    return (weighted * mask).sum(dim=0) / kept


def _merge_tensors(
    tensors: list[Tensor],
    weights: Tensor,
    method: str,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> Tensor:
    """PEFT's ``task_arithmetic`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` on ``tensors``."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, cast(float, density)) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, cast(float, density), generator) for t in tensors]
    stacked = torch.stack(tensors)
    if method in ("ties", "dare_ties"):
        mask = _majority_sign_mask(stacked, sign_method)
        weighted = stacked * weights.reshape(-1, *([1] * (stacked.ndim - 1)))
        return _disjoint_mean(weighted, mask)
    return _weighted_sum(stacked, weights)


# --- combine ---------------------------------------------------------------------------------


def _check_options(
    method: str, n: int, weights: object, rank: object, density: object, sign_method: object
) -> list[float | Tensor]:
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {list(METHODS)}, got {method!r}.")
    if isinstance(weights, Tensor):
        weights = list(weights.reshape(-1)) if weights.ndim == 1 else weights
    if not isinstance(weights, Sequence) or isinstance(weights, str):
        raise TypeError(
            f"Expected `weights` to be a sequence of numbers, got {type(weights).__name__}."
        )
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"Expected one weight per adapter ({n}), got {len(weights)}.")
    for i, w in enumerate(weights):
        _check_weight(w, f"weights[{i}]")
    if rank is not None:
        if not method.endswith("svd"):
            raise ValueError(
                f"Expected `rank` only with an SVD method, got rank={rank!r} with {method!r}."
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"Expected `rank` to be a positive int, got {rank!r}.")
    base_method = method.removesuffix("_svd")
    if base_method in _PRUNING:
        if density is None:
            raise ValueError(f"Expected a `density` in (0, 1] for {method!r}, got None.")
        if (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not 0 < density <= 1
        ):
            raise ValueError(f"Expected `density` in (0, 1], got {density!r}.")
    elif density is not None:
        raise ValueError(
            f"Expected no `density` for {method!r} (it does not prune), got {density!r}."
        )
    if sign_method not in ("total", "frequency"):
        raise ValueError(
            f"Expected `majority_sign_method` in ('total', 'frequency'), got {sign_method!r}."
        )
    return weights


def _as_float_weights(
    weights: list[float | Tensor], compute: torch.dtype, device: torch.device
) -> Tensor:
    return torch.stack([torch.as_tensor(w, dtype=compute, device=device) for w in weights])


def _combine_one(
    adapters: Sequence[Mapping[str, Tensor]],
    weights: list[float | Tensor],
    names: Sequence[str],
    method: str,
    rank: int | None,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
    with_info: bool,
) -> tuple[dict[str, Tensor], CombineInfo | None]:
    for p, name in zip(adapters, names, strict=True):
        _check_lora(p, name)
    _check_same_shape(adapters, names)
    dtype = _common_dtype(adapters)
    compute = _compute_dtype(dtype)
    device = adapters[0]["lora_A"].device
    ranks = [p["lora_A"].shape[0] for p in adapters]
    out_features, in_features = adapters[0]["lora_B"].shape[0], adapters[0]["lora_A"].shape[1]
    full_rank = min(out_features, in_features)
    ones = torch.ones((), dtype=adapters[0]["scaling"].dtype, device=device)
    truncation = torch.zeros((), dtype=torch.float32, device=device)

    if method == "cat":
        result = _cat(adapters, weights)
    elif method in _SAME_RANK:
        if len(set(ranks)) != 1:
            raise ValueError(f"Expected adapters of one rank for {method!r}, got ranks {ranks}.")
        # PEFT's split of wᵢ·sᵢ over A and B: A gets sign·sqrt|wᵢsᵢ|, B gets sqrt|wᵢsᵢ|.
        ws = _as_float_weights(weights, compute, device) * torch.stack(
            [p["scaling"].to(compute) for p in adapters]
        )
        root = ws.abs().sqrt()
        weights_A = torch.where(ws >= 0, root, -root)
        As = [p["lora_A"].to(compute) for p in adapters]
        Bs = [p["lora_B"].to(compute) for p in adapters]
        A = _merge_tensors(As, weights_A, method, density, sign_method, generator)
        B = _merge_tensors(Bs, root, method, density, sign_method, generator)
        result = {"lora_A": A.to(dtype), "lora_B": B.to(dtype), "scaling": ones}
    else:
        k = min(max(ranks), full_rank) if rank is None else rank
        if k > full_rank:
            raise ValueError(
                f"Expected `rank` <= min(out, in) = {full_rank} (the full rank), got {rank}."
            )
        deltas = [_dense_delta(p, compute) for p in adapters]
        w = _as_float_weights(weights, compute, device)
        dense_method = "linear" if method == "svd" else method.removesuffix("_svd")
        target = _merge_tensors(deltas, w, dense_method, density, sign_method, generator)
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        truncation = S[k:].square().sum().sqrt().float()
        result = {
            "lora_A": Vh[:k].to(dtype),
            "lora_B": (U[:, :k] * S[:k]).to(dtype),
            "scaling": ones,
        }
    if not with_info:
        return result, None
    reference = _weighted_sum(
        torch.stack([_dense_delta(p, compute) for p in adapters]),
        _as_float_weights(weights, compute, device),
    )
    error = torch.linalg.norm(_dense_delta(result, compute) - reference).float()
    norm = torch.linalg.norm(reference).float()
    rel = error / norm if norm > 0 else error
    return result, CombineInfo(error.detach(), rel.detach(), truncation.detach())


def _dense_delta(params: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    return (params["lora_B"].to(dtype) @ params["lora_A"].to(dtype)) * params["scaling"].to(dtype)


@overload
def combine(
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float | Tensor] | Tensor,
    /,
    method: Method = ...,
    rank: int | None = ...,
    density: float | None = ...,
    *,
    majority_sign_method: Literal["total", "frequency"] = ...,
    generator: torch.Generator | None = ...,
    return_info: Literal[False] = ...,
) -> dict[str, Any]: ...
@overload
def combine(
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float | Tensor] | Tensor,
    /,
    method: Method = ...,
    rank: int | None = ...,
    density: float | None = ...,
    *,
    majority_sign_method: Literal["total", "frequency"] = ...,
    generator: torch.Generator | None = ...,
    return_info: Literal[True],
) -> tuple[dict[str, Any], CombineInfo | dict[str, CombineInfo]]: ...
@overload
def combine(
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float | Tensor] | Tensor,
    /,
    method: Method = ...,
    rank: int | None = ...,
    density: float | None = ...,
    *,
    majority_sign_method: Literal["total", "frequency"] = ...,
    generator: torch.Generator | None = ...,
    return_info: bool = ...,
) -> dict[str, Any] | tuple[dict[str, Any], CombineInfo | dict[str, CombineInfo]]: ...
def combine(
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float | Tensor] | Tensor,
    /,
    method: Method = "cat",
    rank: int | None = None,
    density: float | None = None,
    *,
    majority_sign_method: Literal["total", "frequency"] = "total",
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], CombineInfo | dict[str, CombineInfo]]:
    """One adapter approximating ``Σᵢ wᵢ·ΔWᵢ``, as PEFT's ``add_weighted_adapter``.

    With ``ΔWᵢ = sᵢ·Bᵢ@Aᵢ`` (``Aᵢ`` ``(rᵢ, in)``, ``Bᵢ`` ``(out, rᵢ)``):

    * ``"cat"``: ``A = [A₁; …; Aₙ]``, ``B = [w₁B₁, …, wₙBₙ]``; exact, rank ``Σ rᵢ``.
      The scalings are kept when equal, else folded into the ``Bᵢ`` (``scaling = 1``),
      so one adapter with weight 1 comes back unchanged.
    * ``"linear"``: with ``aᵢ = sign(wᵢsᵢ)·sqrt|wᵢsᵢ|`` and ``bᵢ = sqrt|wᵢsᵢ|``,
      ``A = Σ aᵢAᵢ``, ``B = Σ bᵢBᵢ``, so ``B@A = Σᵢ wᵢsᵢ·BᵢAᵢ + Σ_{i≠j} bᵢaⱼ·BᵢAⱼ``:
      the cross terms make it approximate. Needs equal ranks.
    * ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: the same split
      of ``wᵢsᵢ``, with the merge applied to the ``Aᵢ`` and to the ``Bᵢ`` separately
      (PEFT's semantics; needs equal ranks). ``magnitude_prune`` keeps the
      ``int(density·numel)`` largest ``|t|`` of each tensor and sums; ``dare_linear``
      keeps each entry with probability ``density``, divides by ``density`` and sums;
      ``ties`` prunes by magnitude, elects per entry the sign of ``Σᵢ tᵢ`` (``"total"``)
      or of ``Σᵢ sign(tᵢ)`` (``"frequency"``), and averages the weighted entries that
      agree with it; ``dare_ties`` is ``ties`` with DARE's random pruning.
    * ``"svd"``: the best rank-``k`` approximation (Eckart–Young) of
      ``D = Σᵢ wᵢ·ΔWᵢ``: ``D = U S Vᵀ``, ``B = U[:, :k]·S[:k]``, ``A = Vᵀ[:k]``,
      ``scaling = 1``. Exact when ``k ≥ rank(D)``.
    * ``"<m>_svd"``: ``D`` is method ``m`` applied to the dense ``ΔWᵢ`` (weights ``wᵢ``),
      then truncated as ``"svd"``.

    ``k = rank`` or, by default, ``min(max rᵢ, min(out, in))`` (PEFT's default).
    All arithmetic is in float32 (float64 for float64 adapters); the result is cast to
    the adapters' (promoted) dtype. Unlike PEFT, one adapter is not switched to
    ``"linear"``: every method keeps its own definition.

    Args:
        adapters: a sequence of adapter dicts, all for one layer shape ``(out, in)``; or a
            sequence of model-level dicts (module path → adapter dict). For those, each
            module combines the adapters that have it, with their weights (as PEFT).
        weights: one number (or 0-d tensor) per adapter; negative weights subtract.
        method: one of :data:`METHODS`.
        rank: the output rank ``k`` for SVD methods, ``1 ≤ k ≤ min(out, in)``.
        density: for the pruning methods, the fraction of entries kept, in ``(0, 1]``.
        majority_sign_method: ``"total"`` or ``"frequency"``, for the TIES methods.
        generator: drives DARE's random masks (``None``: torch's global generator).
        return_info: also return a :class:`CombineInfo` (per module path for
            model-level dicts) with the distance to ``Σᵢ wᵢ·ΔWᵢ`` and the SVD truncation
            error. It costs one dense ``(out, in)`` product per adapter.

    Returns:
        The combined adapter dict (or model-level dict), or ``(combined, info)`` with
        ``return_info=True``.

    Raises:
        ValueError: an unknown method, DoRA adapters, adapters of different layer shapes
            (or ranks, where the method needs one rank), the wrong number of weights,
            ``rank`` above ``min(out, in)``, ``density`` missing or outside ``(0, 1]``.
        TypeError: adapters that are not adapter dicts or all model-level dicts.

    Example:
        >>> p = {"lora_A": torch.eye(2), "lora_B": torch.eye(2), "scaling": torch.tensor(1.0)}
        >>> q = combine([p, p], [0.5, 0.5], "svd", rank=2)
        >>> torch.allclose(q["lora_B"] @ q["lora_A"], torch.eye(2))
        True
    """
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence):
        raise TypeError(
            f"Expected `adapters` to be a sequence of adapter dicts, got {type(adapters).__name__}."
        )
    adapters = list(adapters)
    if not adapters:
        raise ValueError("Expected at least one adapter, got an empty sequence.")
    weights = _check_options(method, len(adapters), weights, rank, density, majority_sign_method)
    kinds = {_kind(a, f"adapters[{i}]") for i, a in enumerate(adapters)}
    if len(kinds) != 1:
        raise TypeError(
            "Expected all `adapters` of one kind, got adapter dicts and model-level dicts."
        )
    options = (method, rank, density, majority_sign_method, generator, return_info)
    if kinds == {"adapter"}:
        names = [f"adapters[{i}]" for i in range(len(adapters))]
        result, info = _combine_one(adapters, weights, names, *options)
        return (result, cast(CombineInfo, info)) if return_info else result
    paths = list(dict.fromkeys(path for a in adapters for path in a))
    results: dict[str, dict[str, Tensor]] = {}
    infos: dict[str, CombineInfo | None] = {}  # all set when return_info
    for path in paths:
        present = [i for i, a in enumerate(adapters) if path in a]
        results[path], infos[path] = _combine_one(
            [adapters[i][path] for i in present],
            [weights[i] for i in present],
            [f"adapters[{i}][{path!r}]" for i in present],
            *options,
        )
    return (results, cast(dict[str, CombineInfo], infos)) if return_info else results
