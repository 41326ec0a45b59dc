"""Model-level calls: run a whole model with adapters, inject shims, quantize a model.

Adapters for a model are a dict keyed by module path, each value an adapter dict::

    {"encoder.layer.0.attention.self.query": {"lora_A": ..., "lora_B": ..., "scaling": ...}, ...}

:func:`functional_call` runs a model with such a dict applied to its ``HQQLinear``
layers and leaves the model as it was, so that ``torch.func.grad`` of a loss with
respect to the adapters is the whole training step's gradient.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hqqlora._base import HQQLinear, quant_layout
from hqqlora._lora import apply_lora
from hqqlora._params import check_params
from hqqlora._route import install_adapter_names, prepare_layer, prepare_model, set_routing

__all__ = [
    "functional_call",
    "get_adapter",
    "hqq_layers",
    "inject_adapter",
    "prepare_model",
    "quantize_model",
]


def _base_of(module: nn.Module) -> HQQLinear | None:
    """The ``HQQLinear`` behind a module: itself, or a shim's ``base_layer``."""
    if isinstance(module, HQQLinear):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, HQQLinear) else None


def _inside_shim(path: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether the module at ``path`` is the ``base_layer`` of the shim above it."""
    parent = modules.get(path.rpartition(".")[0]) if path else None
    return parent is not None and parent is not modules[path] and _base_of(parent) is modules[path]


def hqq_layers(model: nn.Module) -> dict[str, HQQLinear]:
    """The quantized layers of ``model``: module path → ``HQQLinear``.

    A shim (any module whose ``base_layer`` is an ``HQQLinear``, PEFT's included)
    counts under its own path, with its base layer as the value.
    """
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, HQQLinear) and path.rpartition(".")[0] in layers:
            continue  # the base_layer inside a shim already listed
        base = _base_of(module)
        if base is not None:
            layers[path] = base
    return layers


def _check_adapters(model: nn.Module, adapters: object) -> dict[nn.Module, Mapping[str, Tensor]]:
    """The routing table of a ``functional_call``: target module → checked adapter.

    The target is the ``HQQLinear`` itself for a plain layer and the shim for a shim.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"Expected `adapters` to be a dict of module path -> adapter dict, got {type(adapters).__name__}."
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = sorted(p for p in adapters if p not in modules)
    not_hqq = sorted(
        p
        for p in adapters
        if p in modules and (_base_of(modules[p]) is None or _inside_shim(p, modules))
    )
    if unknown or not_hqq:
        raise ValueError(
            f"Expected `adapters` keyed by paths of HQQ layers of `model` (such as "
            f"{sorted(hqq_layers(model))[:4]}), got unknown paths {unknown} and non-HQQ modules "
            f"{not_hqq} (name a shim, not the base_layer inside it)."
        )
    table: dict[nn.Module, Mapping[str, Tensor]] = {}
    for path, params in adapters.items():
        layout = quant_layout(_base_of(modules[path]))
        pooled = layout.axis == 1 and layout.in_features % layout.group_size == 0
        check_params(
            params,
            in_features=layout.in_features,
            out_features=layout.out_features,
            group_size=layout.group_size if pooled else None,  # group-constant adapters
            name=f"adapters[{path!r}]",
        )
        table[modules[path]] = params
    _check_unshared(model, table, adapters)
    return table


def _check_unshared(
    model: nn.Module, table: Mapping[nn.Module, Any], adapters: Mapping[str, Any]
) -> None:
    # Routing is by module object: a layer reachable under two paths would get the
    # adapter under both, although only one was named.
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if module in table:
            paths.setdefault(id(module), []).append(path)
    shared = {p[0]: p for p in paths.values() if len(p) > 1 and set(p) - set(adapters)}
    if shared:
        raise ValueError(
            "Expected each adapted layer to appear once in `model`, got layers shared between "
            f"paths {sorted(shared.values())}; name every path of a shared layer, with one adapter."
        )
    for module_paths in paths.values():
        given = [adapters[p] for p in module_paths if p in adapters]
        if any(a is not given[0] for a in given[1:]):
            raise ValueError(
                f"Expected one adapter for the shared layer at {module_paths}, got different ones."
            )


def functional_call(
    model: nn.Module,
    adapters: Mapping[str, Mapping[str, Tensor]],
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Runs ``model(*args, **kwargs)`` with ``adapters`` applied to its HQQ layers.

    Each layer named in ``adapters`` computes ``apply_lora(base, adapters[path], x)``
    (``base(x) + scaling · x @ Aᵀ @ Bᵀ``, or DoRA's formula) for this call only.
    A path may name a plain ``HQQLinear`` or a shim (its ``base_layer`` is used and
    its own adapters are ignored). Layers not named run as they are, except that
    every HQQ layer computes its base output with :func:`~hqqlora.base_forward`,
    the pure path under ``torch.func`` transforms and ``torch.compile``.

    The call is pure, reentrant and thread-safe: the module tree is not changed per
    call (the adapters reach the layers through per-thread state, see
    :func:`~hqqlora.prepare_model`, which the first call applies once), so threads
    may run different adapters through one model at the same time, and the model is
    left as it was also when the forward raises. The result is differentiable with
    respect to ``adapters`` under ``torch.func.grad``, ``vmap`` and ``jvp``, and
    traceable by ``torch.compile(fullgraph=True)`` once the model is prepared.

    Args:
        model: a module with ``HQQLinear`` layers.
        adapters: module path → adapter dict (``lora_A`` ``(r, in)``, ``lora_B``
            ``(out, r)``, ``scaling`` ``()``, optional ``magnitude`` ``(out,)``).
        args: positional arguments of the forward (a tuple, or a single tensor).
        kwargs: keyword arguments of the forward.

    Returns:
        Whatever ``model`` returns.

    Raises:
        ValueError: a path that is not a module of ``model`` or not an HQQ layer
            (the ``base_layer`` inside a shim is not: name the shim), a layer
            shared between paths not all named, or an adapter whose shapes do not
            fit its layer.
        TypeError: ``adapters`` is not a dict of adapter dicts.

    Example:
        >>> loss = lambda a: functional_call(model, a, (x,)).pow(2).mean()
        >>> grads = torch.func.grad(loss)(trainable)   # doctest: +SKIP
    """
    table = _check_adapters(model, adapters)
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = {} if kwargs is None else dict(kwargs)
    if model in table:  # the model itself is the quantized layer (or a shim)
        base = model if isinstance(model, HQQLinear) else cast(Any, model).get_base_layer()
        return apply_lora(base, table[model], *args, **kwargs)
    from hqqlora._nn import HqqLoraLinear

    for module in model.modules():
        if isinstance(module, HQQLinear) or (
            module in table and not isinstance(module, HqqLoraLinear)
        ):
            prepare_layer(module)
    previous = set_routing(table)
    try:
        return model(*args, **kwargs)
    finally:
        set_routing(previous)


def _matches(path: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a full regex match, a list matches names or ``.``-suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _check_targets(target_modules: object, name: str = "target_modules") -> str | list[str]:
    if isinstance(target_modules, str):
        return target_modules
    if isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules):
        return list(target_modules)
    raise TypeError(f"Expected `{name}` to be a str or a list of str, got {target_modules!r}.")


def inject_adapter(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    target_modules: str | Sequence[str],
    r: int,
    lora_alpha: float,
    **options: Any,
) -> nn.Module:
    """Puts an ``HqqLoraLinear`` shim on each targeted ``HQQLinear``, in place.

    A layer is targeted when its path equals a name in ``target_modules`` or ends
    with ``"." + name`` (a single string is a regex that must match the whole path),
    PEFT's rule. A targeted plain ``HQQLinear`` is replaced by a new shim; a
    targeted shim gets one more adapter through its ``update_layer``.

    Afterwards ``model(*args, adapter_names=[...], **kwargs)`` gives row ``i`` of the
    batch adapter ``adapter_names[i]`` (``"__base__"``: none) in every shim, as PEFT's
    model does: a forward pre-hook registered once on ``model`` takes the names out
    of the call (its own forward never sees them) and hands them to the shims
    through per-thread state, so concurrent calls do not mix. The model must be in
    eval mode; every name must be held by some shim (a shim that lacks one treats it
    as ``"__base__"``, PEFT's rule).

    Args:
        model: the module to modify; it is changed in place.
        adapter_name: the adapter's name inside the shims.
        target_modules: names (or one regex) of the layers to adapt.
        r: rank.
        lora_alpha: LoRA alpha.
        **options: more ``HqqLoraLinear`` options (``lora_dropout``,
            ``init_lora_weights``, ``use_rslora``, ``use_dora``).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: no HQQ layer matched ``target_modules``.
    """
    from hqqlora._nn import HqqLoraLinear

    targets = _check_targets(target_modules)
    matched = {p: m for p, m in hqq_layers(model).items() if p and _matches(p, targets)}
    if not matched:
        raise ValueError(
            f"Expected `target_modules` to match HQQ layers of `model` (such as "
            f"{sorted(hqq_layers(model))[:4]}), got {target_modules!r}, which matched none."
        )
    modules = dict(model.named_modules())
    for path in matched:
        module = modules[path]
        if isinstance(module, HqqLoraLinear):
            module.update_layer(adapter_name, r, lora_alpha, **options)
            continue
        parent_path, _, name = path.rpartition(".")
        shim = HqqLoraLinear(module, adapter_name, r=r, lora_alpha=lora_alpha, **options)
        setattr(modules[parent_path], name, shim)
    prepare_model(model)
    install_adapter_names(model)
    return model


def get_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, dict[str, Tensor]]:
    """The adapters dict held by the shims of ``model``: module path → adapter dict.

    The leaves are the shims' own ``Parameter`` objects (not copies), so the result
    is what :func:`functional_call` and :func:`save_adapter` expect.

    Raises:
        ValueError: no shim in ``model`` holds an adapter named ``adapter_name``.
    """
    from hqqlora._nn import HqqLoraLinear

    adapters = {
        path: module.adapter_params(adapter_name)
        for path, module in model.named_modules()
        if isinstance(module, HqqLoraLinear) and adapter_name in module.lora_A
    }
    if not adapters:
        raise ValueError(
            f"Expected `model` to hold adapter {adapter_name!r} in HqqLoraLinear layers, got none."
        )
    return adapters


def _skipped(path: str, skip: Sequence[str]) -> bool:
    return any(path == s or path.endswith("." + s) or fnmatch.fnmatchcase(path, s) for s in skip)


def quantize_model(
    model: nn.Module,
    quant_config: Mapping[str, Any],
    *,
    compute_dtype: torch.dtype,
    device: str | torch.device,
    skip: str | Sequence[str] = (),
    progress: bool = True,
) -> nn.Module:
    """Replaces the ``nn.Linear`` layers of ``model`` by ``HQQLinear`` ones, in place.

    The layers are prepared for :func:`functional_call` (:func:`prepare_model`).
    Like HQQ's own ``quantize_model``, this works in place and returns the model:
    each quantized ``nn.Linear`` is emptied (HQQ's ``del_orig``) and replaced by an
    ``HQQLinear`` with ``quant_config`` (from ``hqq.core.quantize.BaseQuantizeConfig``)
    on ``device``, its bias a detached tensor. Nothing else in the model is moved or cast. Only layers of type
    exactly ``nn.Linear`` are quantized (subclasses such as
    ``nn.MultiheadAttention``'s ``out_proj`` read their weight directly).

    HQQ's ``AutoHQQHFModel.quantize_model`` (hqq 0.2.8.post1) assumes a decoder with
    ``model.layers`` and fails on other models (``nn.Sequential``, BERT) unless given
    a device map per block, and it writes ``name``/``device`` attributes onto every
    module; hence this function.

    Args:
        model: the module to quantize; it is changed in place.
        quant_config: HQQ's quant config dict.
        compute_dtype: the dtype the layers compute in.
        device: where the quantized weights live (``"cpu"`` on a CPU-only machine).
        skip: layer names not to quantize: a path, a ``.``-suffix of a path, or an
            ``fnmatch`` glob (``"encoder.layer.0.*"``).
        progress: show a tqdm progress bar over layers.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module or ``quant_config`` is not HQQ's dict.
        ValueError: ``model`` is a bare ``nn.Linear`` (nothing to replace it in).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(quant_config, Mapping) or "weight_quant_params" not in quant_config:
        raise TypeError(
            "Expected `quant_config` from hqq.core.quantize.BaseQuantizeConfig(...), "
            f"got {quant_config!r}."
        )
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"Expected a floating-point `compute_dtype`, got {compute_dtype!r}.")
    skip = [skip] if isinstance(skip, str) else list(skip)
    if type(model) is nn.Linear:
        raise ValueError("Expected a model containing nn.Linear layers, got a bare nn.Linear.")
    targets = [
        (path, module)
        for path, module in model.named_modules()
        if type(module) is nn.Linear and path and not _skipped(path, skip)
    ]
    modules = dict(model.named_modules())
    for path, linear in tqdm(targets, desc="quantizing", unit="layer", disable=not progress):
        parent_path, _, name = path.rpartition(".")
        layer = HQQLinear(linear, quant_config, compute_dtype=compute_dtype, device=str(device))
        if layer.bias is not None:
            # HQQ keeps a clone that still requires grad (a non-leaf tied to the old
            # Parameter); a frozen layer's bias is a leaf, which torch.compile needs.
            layer.bias = layer.bias.detach()
        setattr(modules[parent_path], name, layer)
    return prepare_model(model)
