"""Model-level calls: run a whole model with adapters, inject shims, quantize a model.

Adapters for a model are a dict keyed by module path, each value an adapter dict::

    {"encoder.layer.0.attention.self.query": {"lora_A": ..., "lora_B": ..., "scaling": ...}, ...}

:func:`functional_call` runs a model with such a dict applied to its ``HQQLinear``
layers and leaves the model as it was, so that ``torch.func.grad`` of a loss with
respect to the adapters is the whole training step's gradient. For serving many
adapters in one batch, a path may hold an ``AdapterBank`` instead, and one
``adapter_index`` per call gives each row of the batch its adapter in every layer.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hqqlora._bank import BASE, AdapterBank, bank_weight_norm, check_bank_fields
from hqqlora._base import HQQLinear, quant_layout
from hqqlora._dora import dora_weight_norm
from hqqlora._params import check_params
from hqqlora._route import (
    Routed,
    apply_routed,
    install_adapter_names,
    prepare_layer,
    prepare_model,
    set_routing,
)

__all__ = [
    "functional_call",
    "get_adapter",
    "hqq_layers",
    "inject_adapter",
    "model_weight_norm",
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


def _check_bank(bank: AdapterBank, layout: Any, device: torch.device, name: str) -> None:
    """A bank's structure, and its fit to the layer of ``layout`` on ``device``."""
    check_bank_fields(bank, name)
    A, out_features = bank.lora_A, bank.lora_B.shape[1]
    if (out_features, A.shape[2]) != layout.shape:
        raise ValueError(
            f"Expected {name} of (out, in) = {layout.shape} to fit its layer, got "
            f"{(out_features, A.shape[2])}."
        )
    if A.device != device:
        raise ValueError(f"Expected {name} on its layer's device {device}, got {A.device}.")


def _check_adapters(
    model: nn.Module, adapters: object, *, banks: bool = False
) -> dict[nn.Module, Any]:
    """The adapters of a model-level call, checked: target module → dict (or bank).

    The target is the ``HQQLinear`` itself for a plain layer and the shim for a shim.
    ``AdapterBank`` values are accepted only with ``banks``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(adapters, Mapping):
        raise TypeError(
            "Expected `adapters` to be a dict of module path -> adapter dict"
            f"{' or AdapterBank' if banks else ''}, got {type(adapters).__name__}."
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
    table: dict[nn.Module, Any] = {}
    for path, params in adapters.items():
        base = cast(HQQLinear, _base_of(modules[path]))
        layout = quant_layout(base)
        if banks and isinstance(params, AdapterBank):
            _check_bank(params, layout, base.W_q.device, f"adapters[{path!r}]")
        else:
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


def _index_of_banks(banks: Mapping[str, AdapterBank], adapter_index: object) -> dict[str, Tensor]:
    """Each bank's row index (row → entry, ``-1``: none) from ``adapter_index``."""
    if not banks:
        raise ValueError(
            "Expected an AdapterBank among `adapters` with `adapter_index`, got only adapter dicts."
        )
    if isinstance(adapter_index, Tensor):
        return _index_from_tensor(banks, adapter_index)
    if isinstance(adapter_index, str) or not isinstance(adapter_index, Sequence):
        raise TypeError(
            "Expected `adapter_index` to be an integer tensor of shape (batch,) or a list of "
            f"adapter names, got {type(adapter_index).__name__}."
        )
    names = list(adapter_index)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"Expected `adapter_index` names to be strings, got {bad[:4]}.")
    known = dict.fromkeys(n for bank in banks.values() for n in bank.names)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"Expected `adapter_index` names among {[*known, BASE]}, got unknown {unknown}."
        )
    # A bank that lacks a name gives its rows no adapter: PEFT's rule for a layer
    # without that adapter.
    return {
        path: torch.tensor(
            [bank.names.index(n) if n in bank.names else -1 for n in names],
            dtype=torch.int64,
            device=bank.lora_A.device,
        )
        for path, bank in banks.items()
    }


def _index_from_tensor(banks: Mapping[str, AdapterBank], index: Tensor) -> dict[str, Tensor]:
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"Expected `adapter_index` of dtype torch.int32 or torch.int64, got {index.dtype}."
        )
    if index.ndim != 1:
        raise ValueError(
            f"Expected `adapter_index` of shape (batch,), one entry per row, got {tuple(index.shape)}."
        )
    orders = {tuple(bank.names) for bank in banks.values()}
    if len(orders) > 1:
        raise ValueError(
            "Expected every bank to hold the same names in the same order, so that an index "
            f"means one adapter in every layer, got {sorted(orders)}: stack them with one "
            "`names_order` (a zero-B adapter fills a layer an adapter does not adapt), or pass "
            "names."
        )
    size = len(next(iter(orders)))
    # Checking values needs the data on the host: only when that costs no device sync.
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= size:
            raise ValueError(
                f"Expected `adapter_index` values in [-1, {size}), got values in [{low}, {high}]."
            )
    # One copy per other device the banks live on (a model spread over devices).
    on_device = {index.device: index}
    for bank in banks.values():
        device = bank.lora_A.device
        if device not in on_device:
            on_device[device] = index.to(device)
    return {path: on_device[bank.lora_A.device] for path, bank in banks.items()}


def _routed_base(module: nn.Module) -> HQQLinear:
    """The layer an adapter routed to ``module`` applies to (a shim's unmerged base)."""
    from hqqlora._nn import HqqLoraLinear

    if isinstance(module, HqqLoraLinear):
        return module._unmerged_base()
    return cast(HQQLinear, _base_of(module))


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
    adapters: Mapping[str, Mapping[str, Tensor] | AdapterBank],
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
    *,
    adapter_index: Tensor | Sequence[str] | None = None,
    weight_norm: Mapping[str, Any] | None = None,
) -> Any:
    """Runs ``model(*args, **kwargs)`` with ``adapters`` applied to its HQQ layers.

    Each layer named in ``adapters`` computes ``apply_lora(base, adapters[path], x)``
    (``base(x) + scaling · x @ Aᵀ @ Bᵀ``, or DoRA's formula) for this call only.
    A path may name a plain ``HQQLinear`` or a shim (its ``base_layer`` is used and
    its own adapters are ignored). Layers not named run as they are, except that
    every HQQ layer computes its base output with :func:`~hqqlora.base_forward`,
    the pure path under ``torch.func`` transforms and ``torch.compile``.

    **Mixed batches** (one adapter per row, for serving many adapters at once): a
    path may hold an :class:`~hqqlora.AdapterBank` (:func:`~hqqlora.stack_adapters`
    of that layer's adapters) instead of a dict, and ``adapter_index`` says which
    entry each row of the batch gets. Every layer with a bank then computes
    :func:`~hqqlora.mixed_batch_indexed`: with ``k = index[i]``, row ``i`` of its
    input (dim 0, so every adapted layer must see the batch on dim 0, as in PEFT's
    ``adapter_names``) gets ``base(x[i]) + scaling[k] · x[i] @ A[k]ᵀ @ B[k]ᵀ`` (or
    DoRA's formula), ``k = -1`` none, which equals running each row alone with its
    own adapter dicts. A dict next to banks applies to every row. ``adapter_index``
    is either

    * an ``int32``/``int64`` tensor of shape ``(batch,)`` (``-1``: no adapter),
      which then means the same entry in every bank, so all banks must hold the
      same names in the same order. This is the serving form: no host sync, and
      ``torch.compile(fullgraph=True)`` (CUDA graphs included) traces it once for
      all index values. Put it on the banks' device; values are checked for a CPU
      index in eager mode only (an out-of-range value on an accelerator is a device
      error); or
    * a list of adapter names, one per row (``"__base__"``: none), resolved against
      each bank's ``names``; a bank that lacks a name gives that row no adapter in
      its layer (PEFT's rule). Each distinct list is a new constant for
      ``torch.compile``: prefer the tensor form in a compiled loop.

    ``torch.func.grad`` reaches a bank's tensors when the bank is rebuilt from them
    inside the function (``bank._replace(lora_A=A, lora_B=B)``): its ``names`` and
    ``is_dora`` are not differentiable leaves.

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
            ``(out, r)``, ``scaling`` ``()``, optional ``magnitude`` ``(out,)``),
            or → ``AdapterBank`` (with ``adapter_index``).
        args: positional arguments of the forward (a tuple, or a single tensor).
        kwargs: keyword arguments of the forward.
        adapter_index: with banks, row → bank entry: an integer tensor of shape
            ``(batch,)`` or a list of ``batch`` names.
        weight_norm: module path → DoRA's held norms for that layer, so that no
            layer dequantizes its weight per call: ``(out,)`` for a DoRA dict
            (:func:`~hqqlora.dora_weight_norm`), ``(n, out)`` for a bank
            (:func:`~hqqlora.bank_weight_norm`); :func:`model_weight_norm` gives
            them all. Missing ones are computed.

    Returns:
        Whatever ``model`` returns.

    Raises:
        ValueError: a path that is not a module of ``model`` or not an HQQ layer
            (the ``base_layer`` inside a shim is not: name the shim), a layer
            shared between paths not all named, an adapter or bank whose shapes or
            device do not fit its layer, banks without ``adapter_index`` or the
            reverse, an index not of shape ``(batch,)`` or out of range, banks of
            different names with a tensor index, unknown names, or a
            ``weight_norm`` for a path not in ``adapters``. An index whose length is
            not the batch size of a layer's input is refused by that layer, during
            the forward (the model is left as it was).
        TypeError: ``adapters`` is not a dict of adapter dicts or banks, or
            ``adapter_index`` is neither an int32/int64 tensor nor a list of str.

    Example:
        >>> loss = lambda a: functional_call(model, a, (x,)).pow(2).mean()
        >>> grads = torch.func.grad(loss)(trainable)   # doctest: +SKIP
        >>> banks = {path: stack_adapters(by_name[path]) for path in by_name}  # doctest: +SKIP
        >>> y = functional_call(model, banks, (x,), adapter_index=["a", "__base__", "b"])  # doctest: +SKIP
    """
    table = _check_adapters(model, adapters, banks=True)
    banks = {path: a for path, a in adapters.items() if isinstance(a, AdapterBank)}
    if adapter_index is None:
        if banks:
            raise ValueError(
                f"Expected `adapter_index` (row -> bank entry) with AdapterBank entries "
                f"{sorted(banks)[:4]}, got None."
            )
        index = {}
    else:
        index = _index_of_banks(banks, adapter_index)
    norms = {} if weight_norm is None else weight_norm
    if not isinstance(norms, Mapping):
        raise TypeError(
            f"Expected `weight_norm` to be a dict of module path -> norms, got {type(norms).__name__}."
        )
    unknown = sorted(p for p in norms if p not in adapters)
    if unknown:
        raise ValueError(
            f"Expected `weight_norm` keyed by paths of `adapters`, got unknown paths {unknown}."
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    routed = {
        modules[path]: Routed(adapter, index.get(path), norms.get(path))
        for path, adapter in adapters.items()
    }
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = {} if kwargs is None else dict(kwargs)
    if model in routed:  # the model itself is the quantized layer (or a shim)
        return apply_routed(_routed_base(model), routed[model], *args, **kwargs)
    from hqqlora._nn import HqqLoraLinear

    for module in model.modules():
        if isinstance(module, HQQLinear) or (
            module in table and not isinstance(module, HqqLoraLinear)
        ):
            prepare_layer(module)
    previous = set_routing(routed)
    try:
        return model(*args, **kwargs)
    finally:
        set_routing(previous)


def model_weight_norm(
    model: nn.Module, adapters: Mapping[str, Mapping[str, Tensor] | AdapterBank]
) -> dict[str, Tensor]:
    """DoRA's detached row norms for every DoRA entry of ``adapters``: path → norms.

    ``(out,)`` from :func:`~hqqlora.dora_weight_norm` for a DoRA adapter dict,
    ``(n, out)`` from :func:`~hqqlora.bank_weight_norm` for a bank holding a DoRA
    entry; LoRA entries are left out. Compute them once and pass them to
    :func:`functional_call` as ``weight_norm`` so that serving never dequantizes.
    They hold for these adapters and these layers only: recompute them after
    changing either.

    Raises:
        ValueError, TypeError: as :func:`functional_call` for ``adapters``.
    """
    _check_adapters(model, adapters, banks=True)
    modules = dict(model.named_modules(remove_duplicate=False))
    norms = {}
    for path, adapter in adapters.items():
        base = _routed_base(modules[path])
        if isinstance(adapter, AdapterBank):
            if any(adapter.dora):
                norms[path] = bank_weight_norm(base, adapter)
        elif "magnitude" in adapter:
            norms[path] = dora_weight_norm(base, adapter)
    return norms


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
