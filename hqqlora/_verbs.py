"""PEFT's model-level verbs for models with HQQ layers, under PEFT's names.

:func:`merge_and_unload` is pure by default: it returns a new model whose HQQ
layers hold the adapters (one requantization per layer) and leaves its input as it
was; ``inplace=True`` acts on the model, as PEFT's does. :func:`set_adapter`,
:func:`disable_adapter` and :func:`delete_adapter` change the shims
(:class:`~hqqlora.HqqLoraLinear`) of a model in place, as PEFT's ``PeftModel``
methods do. In the functional API these need no verb: the adapters passed to
:func:`~hqqlora.functional_call` (or :func:`merge_and_unload`) are the active ones,
several adapters are a list of dicts, and ``model(..., adapter_names=["__base__"] * n)``
gives the base output of a model with shims without changing it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from hqqlora._base import HQQLinear
from hqqlora._merge import METHODS, merge
from hqqlora._model import _check_adapters
from hqqlora._nn import HqqLoraLinear
from hqqlora._report import merge_report
from hqqlora._route import is_foreign_shim, prepare_layer

__all__ = ["delete_adapter", "disable_adapter", "merge_and_unload", "set_adapter"]

Adapters = Mapping[str, Mapping[str, Tensor]]


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    if hasattr(model, "peft_config"):
        # PEFT keeps its own record of the active adapters and configs; changing its
        # layers behind its back would leave that record wrong.
        raise ValueError(
            "Expected a model without PEFT's wrapper, got one with a `peft_config`: use the "
            "PeftModel's own set_adapter/disable_adapter/delete_adapter/merge_and_unload (with "
            "hqqlora.use_in_peft they run hqqlora's layers)."
        )


def _shims(model: nn.Module) -> dict[str, HqqLoraLinear]:
    """Module path → shim, each shim once (under its first path)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, HqqLoraLinear)}


def _require_shims(model: nn.Module) -> dict[str, HqqLoraLinear]:
    shims = _shims(model)
    if not shims:
        raise ValueError(
            "Expected a model with HqqLoraLinear layers (hqqlora.inject_adapter), got none."
        )
    return shims


def _check_names(names: object, what: str) -> list[str]:
    if isinstance(names, str):
        return [names]
    if isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
        return list(names)
    raise TypeError(f"Expected `{what}` to be a str or a list of str, got {names!r}.")


def _check_known(shims: Mapping[str, HqqLoraLinear], names: Sequence[str]) -> None:
    known = {n for shim in shims.values() for n in shim.lora_A}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"Expected adapter names among {sorted(known)}, got unknown {unknown}.")


# ---- set / disable / delete (in place, as PEFT's) -----------------------------------


def set_adapter(
    model: nn.Module, /, adapter_name: str | Sequence[str], *, inference_mode: bool = False
) -> None:
    """Makes ``adapter_name`` (one name or a list) the active adapters of every shim, in place.

    PEFT's ``PeftModel.set_adapter``: the named adapters become active (and
    trainable unless ``inference_mode``) in every :class:`~hqqlora.HqqLoraLinear`
    of ``model``; a shim that lacks a name skips it in its forward. Several names
    apply in order, PEFT's forward for several active adapters. A merged shim is
    unmerged first (exactly: it kept its original), with PEFT's warning.

    Args:
        model: a module with ``HqqLoraLinear`` layers; changed in place.
        adapter_name: an adapter name or a list of them.
        inference_mode: keep the adapters frozen.

    Raises:
        TypeError: ``model`` is not a module, or names that are not strings.
        ValueError: a name no shim holds, a model without shims, or a PEFT model
            (use its own ``set_adapter``); nothing changes.
    """
    _check_model(model)
    names = _check_names(adapter_name, "adapter_name")
    shims = _require_shims(model)
    _check_known(shims, names)
    if any(shim.merged for shim in shims.values()):
        warnings.warn(
            "Adapter cannot be set when the model is merged. Unmerging the model first.",
            stacklevel=2,
        )
    for shim in shims.values():
        if shim.merged:
            shim.unmerge()
        shim.set_adapter(names, inference_mode=inference_mode)


@contextlib.contextmanager
def disable_adapter(model: nn.Module, /) -> Iterator[nn.Module]:
    """Turns off every shim's adapters inside a ``with`` block; restores them on exit.

    PEFT's ``PeftModel.disable_adapter``: inside the block ``model`` computes its
    base output (a merged shim gives the output of the layer it kept before the
    merge, exactly, and stays merged). On exit, also when the block raises, each
    shim is enabled or disabled as it was before, and each adapter Parameter's
    ``requires_grad`` is what it was.

    This changes the shims for the duration of the block, so other threads using
    the model see it too; for a per-call base output that changes nothing, use
    ``model(..., adapter_names=["__base__"] * batch)``.

    Args:
        model: a module with ``HqqLoraLinear`` layers.

    Yields:
        ``model``.

    Raises:
        ValueError: a model without shims, or a PEFT model (use its own
            ``disable_adapter``).

    Example:
        >>> with hqqlora.disable_adapter(model):  # doctest: +SKIP
        ...     base_out = model(x)
    """
    _check_model(model)
    shims = _require_shims(model)
    saved = [
        (
            shim,
            shim.disable_adapters,
            [
                (p, p.requires_grad)
                for name in shim.adapter_layer_names
                for p in getattr(shim, name).parameters()
            ],
        )
        for shim in shims.values()
    ]
    try:
        for shim in shims.values():
            shim.enable_adapters(False)
        yield model
    finally:
        for shim, was_disabled, grads in saved:
            shim.enable_adapters(not was_disabled)
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)


def delete_adapter(model: nn.Module, /, adapter_name: str) -> None:
    """Removes adapter ``adapter_name`` from every shim of ``model``, in place.

    PEFT's ``PeftModel.delete_adapter``. In a shim where it was active, the other
    active adapters stay active; where none is left, the first remaining adapter
    by name becomes active, with a warning (PEFT's rule, per layer).

    Raises:
        TypeError: ``adapter_name`` is not a string.
        ValueError: no shim holds ``adapter_name``, some shim has it merged
            (unmerge first), a model without shims, or a PEFT model (use its own
            ``delete_adapter``); nothing changes.
    """
    _check_model(model)
    if not isinstance(adapter_name, str):
        raise TypeError(f"Expected `adapter_name` to be a str, got {adapter_name!r}.")
    shims = _require_shims(model)
    _check_known(shims, [adapter_name])
    merged = sorted(p for p, shim in shims.items() if adapter_name in shim.merged_adapters)
    if merged:
        raise ValueError(
            f"Expected adapter {adapter_name!r} unmerged to delete it, got it merged in {merged}: "
            "unmerge first."
        )
    for shim in shims.values():
        shim.delete_adapter(adapter_name)


# ---- merge_and_unload (pure by default) ---------------------------------------------


@dataclass
class _Job:
    """One quantized layer to replace: the module now there, and what replaces it."""

    module: nn.Module
    path: str
    original: HQQLinear  # the layer without adapters
    params: list[Mapping[str, Tensor]] = field(default_factory=list)


def _adapter_list(adapters: object) -> list[Adapters]:
    if isinstance(adapters, Mapping):
        return [adapters]
    if (
        isinstance(adapters, Sequence)
        and not isinstance(adapters, str)
        and all(isinstance(a, Mapping) for a in adapters)
    ):
        return list(adapters)
    raise TypeError(
        "Expected `adapters` to be a dict of module path -> adapter dict, or a list of such "
        f"dicts, got {type(adapters).__name__}."
    )


def _jobs(
    model: nn.Module, adapters: object, adapter_names: object
) -> tuple[dict[int, _Job], dict[int, list[str]]]:
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    foreign = sorted(p for p, m in model.named_modules() if is_foreign_shim(m))
    if foreign:
        raise ValueError(
            f"Expected hqqlora's layers, got another library's shims at {foreign}: merge them "
            "with that library (for PEFT: PeftModel.merge_and_unload, or hqqlora.use_in_peft)."
        )
    shims = _shims(model)
    names = None if adapter_names is None else _check_names(adapter_names, "adapter_names")
    if names is not None:
        _check_known(shims, names)
    if adapters is None and not shims:
        raise ValueError(
            "Expected `adapters` or a model with HqqLoraLinear layers to merge, got neither."
        )
    jobs: dict[int, _Job] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for given in [] if adapters is None else _adapter_list(adapters):
        _check_adapters(model, given)  # paths, shapes, shared layers
        seen = set()
        for path, params in given.items():
            module = modules[path]
            if id(module) in seen:  # a shared layer named under each of its paths
                continue
            seen.add(id(module))
            if id(module) not in jobs:
                base = module._unmerged_base() if isinstance(module, HqqLoraLinear) else module
                jobs[id(module)] = _Job(module, path, base)
            jobs[id(module)].params.append(params)
    for path, shim in shims.items():
        if id(shim) in jobs:  # named in `adapters`: its own adapters are ignored
            continue
        wanted = shim.active_adapters if names is None else names
        merged = [*shim.merged_adapters]
        merged += [n for n in wanted if n in shim.lora_A and n not in merged]
        detached: list[Mapping[str, Tensor]] = [
            {k: v.detach() for k, v in shim.adapter_params(n).items()} for n in merged
        ]
        jobs[id(shim)] = _Job(shim, path, shim._unmerged_base(), detached)
    return jobs, paths


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def merge_and_unload(
    model: nn.Module,
    /,
    adapters: Adapters | Sequence[Adapters] | None = None,
    *,
    adapter_names: str | Sequence[str] | None = None,
    method: str = "requantize",
    safe_merge: bool = False,
    inplace: bool = False,
    return_reports: bool = False,
    warn: bool = True,
) -> nn.Module | tuple[nn.Module, dict[str, dict[str, float | int]]]:
    """A model whose HQQ layers hold the adapters, with the shims gone (PEFT's ``merge_and_unload``).

    Each layer to merge is replaced by ``merge(original, [p_1, ..., p_k],
    method=method, safe_merge=safe_merge)`` (:func:`~hqqlora.merge`): its weight
    ``W ← W + ΔW_j`` (LoRA) or ``W ← c_j ⊙ (W + ΔW_j)`` (DoRA) for each adapter in
    order, quantized **once** with the layer's own settings, **bias kept**. Which
    adapters a layer gets:

    * a path in ``adapters`` (a plain ``HQQLinear`` or a shim): the adapter dicts
      given for it, in the order of the list of dicts; a shim's own adapters are
      ignored, and its pre-merge layer is the original (as :func:`functional_call`);
    * every other shim: its merged adapters, then its active ones (or those of
      ``adapter_names`` it holds), from its kept pre-merge layer; a shim with none
      is replaced by that layer (PEFT's ``unload``).

    With ``inplace=False`` (the default) the input is left exactly as it was and
    a new model is returned. It shares no tensor or module with the input: the
    merged layers are new, and everything else (other HQQ layers included) is a
    deep copy, since a shared module or tensor would let a later in-place change on
    one model (``load_state_dict``, ``.cuda()``, an optimizer step) reach the other.
    Only the layers being replaced are not copied, so the extra memory is one copy
    of what the merge does not replace. ``inplace=True`` replaces the layers in
    ``model`` itself and returns it (PEFT's behaviour; a ``model`` that is itself
    the merged layer cannot be replaced in place, so the new layer is returned).
    Either way nothing changes when an error is raised: every merge is computed
    before any layer is replaced.

    Args:
        model: a module with ``HQQLinear`` layers and/or ``HqqLoraLinear`` shims
            (not a PEFT model: use its own ``merge_and_unload``).
        adapters: module path → adapter dict, or a list of such dicts (several
            adapters per layer, merged in list order with one requantization).
        adapter_names: which of the shims' own adapters to merge (PEFT's
            argument); default: each shim's active adapters.
        method: ``"requantize"``, ``"same_grid"`` or ``"zero_point"``, as
            :func:`~hqqlora.merge` takes it.
        safe_merge: raise on non-finite merged weights (always raised for a
            non-finite update).
        inplace: change ``model`` instead of returning a new one.
        return_reports: also return ``{path: merge_report(original, params, merged)}``
            (:func:`~hqqlora.merge_report`) for every merged layer.
        warn: let :func:`~hqqlora.merge` warn about a layer that keeps less than
            half of its update.

    Returns:
        The merged model, or ``(model, reports)`` with ``return_reports=True``.

    Raises:
        TypeError: ``model`` is not a module, or ``adapters``/``adapter_names`` of
            the wrong type.
        ValueError: nothing to merge (no ``adapters`` and no shims), paths that are
            not HQQ layers of ``model``, adapters that do not fit their layer,
            unknown ``adapter_names``, an unknown ``method``, another library's
            shims, a PEFT model, or a merge that fails (non-finite update, a
            ``"zero_point"`` delta that is not group-constant).

    Example:
        >>> merged, reports = hqqlora.merge_and_unload(model, adapters, return_reports=True)  # doctest: +SKIP
        >>> min(r["captured"] for r in reports.values())  # doctest: +SKIP
    """
    _check_model(model)
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {METHODS}, got {method!r}.")
    for flag, value in (("inplace", inplace), ("return_reports", return_reports)):
        if not isinstance(value, bool):
            raise TypeError(f"Expected `{flag}` to be a bool, got {value!r}.")
    jobs, paths = _jobs(model, adapters, adapter_names)
    merged: dict[int, HQQLinear | None] = {}
    with torch.no_grad():
        for key, job in jobs.items():
            merged[key] = (
                merge(job.original, job.params, method=method, safe_merge=safe_merge, warn=warn)
                if job.params
                else None
            )
        reports = {
            job.path: merge_report(job.original, job.params, merged[key])
            for key, job in jobs.items()
            if return_reports and job.params
        }
    for key, layer in merged.items():
        if layer is not None:
            layer.train(jobs[key].module.training)
            prepare_layer(layer)
    if inplace:
        result = model
        for key, job in jobs.items():
            replacement = cast(HQQLinear, merged[key]) if merged[key] is not None else job.original
            if job.module is model:
                result = replacement
                continue
            for path in paths[key]:
                _set_submodule(model, path, replacement)
    else:
        memo: dict[int, Any] = {}
        for m in model.modules():
            if isinstance(m, HQQLinear) and isinstance(m.bias, Tensor) and not m.bias.is_leaf:
                # HQQLinear(linear, ...) keeps a clone of the bias tied to the emptied
                # nn.Linear, which deepcopy refuses; the copy gets its value, detached.
                memo[id(m.bias)] = m.bias.detach().clone()
        for key, job in jobs.items():
            replacement = merged[key]
            if replacement is None:  # unloaded, not merged: a copy of the kept original
                replacement = copy.deepcopy(job.original, memo)
            memo[key] = replacement
        result = copy.deepcopy(model, memo)
    return (result, reports) if return_reports else result
