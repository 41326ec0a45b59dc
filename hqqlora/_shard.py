"""Sharding a model's quantized base with FSDP2, and adapters to and from its shards.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the *registered parameters*
of a module along dim 0, one ``DTensor`` per parameter, all-gathers them before the
module's forward (and backward) and frees them after. HQQ keeps a layer's codes
``W_q`` as a parameter but its per-group ``scale`` and ``zero`` in the plain dict
``layer.meta``, which FSDP2 never sees: they would stay whole on every rank
(1/8 of a 4-bit, group-64 layer's bytes in bf16, more at smaller groups).
:func:`register_quant_params` moves them (and a plain-tensor bias) into frozen
parameters of the layer, where :func:`~hqqlora._base.quant_tensors` reads them, so
that a rank holds 1/N of the codes *and* of the scales and zeros.

The packed codes are registered viewed as the float dtype of their width (``uint8``
as ``float8_e4m3fn``, HQQ's ``int32`` 3-bit packing as ``float32``): the same bytes
and shape, no copy. FSDP2 of torch 2.11 and older wraps every shard in a parameter
that requires grad, which an integer tensor cannot; a float view shards on every
version. FSDP2 gathers a group of mixed dtypes as bytes, so the bits travel
untouched, and :func:`~hqqlora._base.quant_tensors` views them back as integers.
A float can be cast, though: :func:`shard_quantized` refuses a
``MixedPrecisionPolicy`` with a ``param_dtype`` (FSDP2 would cast the codes with
the adapters), and a cast after the fact (``model.to(dtype)``) is caught at the
next forward, never misread.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hqqlora._base import (
    CODE_VIEW_DTYPES,
    HQQLinear,
    check_hqq_layer,
    holds_quant_params,
    quant_layout,
)
from hqqlora._model import hqq_layers
from hqqlora._params import check_params
from hqqlora._route import prepare_model

__all__ = [
    "assign_adapter",
    "full_tensors",
    "gathered",
    "quantized_bytes",
    "register_quant_params",
    "shard_quantized",
    "write_on_rank0",
]


def _dtensor_type() -> type | None:
    # Looked up, not imported (importing torch.distributed.tensor costs ~0.7 s): no
    # DTensor can exist before it is imported.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _is_dtensor(value: object) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def _check_model(model: object) -> dict[str, HQQLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    layers = hqq_layers(model)
    if not layers:
        raise ValueError("Expected a model with HQQLinear layers, got none.")
    for path, base in layers.items():
        check_hqq_layer(base, f"the layer at {path!r}")
        if base.offload_meta:
            raise ValueError(
                f"Expected HQQ layers without offload_meta, got one at {path!r}: offload_meta "
                "keeps scale and zero on the host, outside FSDP2's shards. Quantize with "
                "offload_meta=False to shard them."
            )
    return layers


def register_quant_params(model: nn.Module, /) -> nn.Module:
    """Makes each HQQ layer's ``scale``, ``zero`` and bias frozen parameters, in place.

    For every ``HQQLinear`` in ``model`` (plain or inside a shim), ``meta["scale"]``
    and ``meta["zero"]`` become ``nn.Parameter(..., requires_grad=False)`` named
    ``scale`` and ``zero`` on the layer (the same tensors, not copies), and a bias
    held as a plain tensor becomes a frozen parameter too. The packed integer codes
    ``W_q`` become a frozen parameter viewed as the float dtype of their width
    (``uint8`` as ``float8_e4m3fn``, ``int32`` as ``float32``; the same bytes), which
    FSDP2 can shard on every torch version; cast nothing afterwards (``model.to(dtype)``
    would destroy them: the next forward raises). FSDP2's ``fully_shard`` then shards
    them all. hqqlora's paths
    (forward, :func:`~hqqlora.dequantize`, :func:`~hqqlora.merge`, DoRA,
    :func:`~hqqlora.merge_report`) read the parameters; HQQ's own ``forward``,
    ``dequantize`` and ``state_dict``, which read ``meta``, do not, so the layers
    run through hqqlora's forward from then on (the model is prepared with
    :func:`~hqqlora.prepare_model`). Layers already converted are left as they are.

    :func:`shard_quantized` calls this; call it yourself to apply ``fully_shard``
    with your own policy (per transformer block, say).

    Args:
        model: a module with ``HQQLinear`` layers (or one itself); changed in place.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: no HQQ layer, a layer not quantized, or one with
            ``offload_meta`` (its scale and zero live on the host). Nothing changes then.
    """
    layers = _check_model(model)
    prepare_model(model)
    for base in layers.values():
        if holds_quant_params(base):
            continue
        meta = base.meta
        W_q = base.W_q
        if meta["packing"] is not None and not W_q.is_floating_point():
            codes = W_q.detach().view(CODE_VIEW_DTYPES[W_q.element_size()])
            del base.W_q
            base.register_parameter("W_q", nn.Parameter(codes, requires_grad=False))
        base.register_parameter("scale", nn.Parameter(meta.pop("scale"), requires_grad=False))
        base.register_parameter("zero", nn.Parameter(meta.pop("zero"), requires_grad=False))
        bias = base.bias
        if bias is not None and not isinstance(bias, nn.Parameter):
            del base.bias
            base.register_parameter("bias", nn.Parameter(bias.detach(), requires_grad=False))
    return model


def _without_forward(module: nn.Module) -> bool:
    """A container ``fully_shard`` refuses (a ``ModuleList``/``ModuleDict`` has no forward)."""
    return (
        isinstance(module, (nn.ModuleList, nn.ModuleDict))
        and type(module).forward is nn.Module.forward
    )


def _shard_units(model: nn.Module, layers: dict[str, HQQLinear], units: object) -> list[nn.Module]:
    """The modules :func:`shard_quantized` gives to ``fully_shard`` (before the root)."""
    modules = dict(model.named_modules())
    # A layer inside a shim is sharded with its shim (the paths of hqq_layers).
    per_layer = [modules[path] for path in layers]
    if units == "layers":
        return per_layer
    if units == "blocks":
        layer_ids = {id(layer) for layer in per_layer}
        chosen: list[nn.Module] = []
        for container in modules.values():
            if not isinstance(container, (nn.ModuleList, nn.Sequential)):
                continue
            holding = [
                child
                for child in container.children()
                if any(id(m) in layer_ids for m in child.modules())
            ]
            if any(_without_forward(child) for child in holding):
                continue  # blocks held in lists of their own: those lists are looked at
            if len(holding) >= 2 and len(holding) > len(chosen):
                chosen = holding
        given = chosen
    elif isinstance(units, (list, tuple)) and all(isinstance(u, nn.Module) for u in units):
        paths = {id(m): path for path, m in modules.items() if m is not model}
        # A shim's forward reads its base layer's tensors without calling it, so
        # nothing inside a shim can be a unit of its own.
        in_shim = {id(m) for layer in per_layer for m in layer.modules() if m is not layer}
        seen: set[int] = set()
        for unit in units:
            if id(unit) not in paths:
                raise ValueError(
                    "Expected `units` to be submodules of `model` (not `model` itself), "
                    f"got a {type(unit).__name__} that is not."
                )
            where = f"the {type(unit).__name__} at {paths[id(unit)]!r}"
            if id(unit) in seen:
                raise ValueError(f"Expected `units` without repeats, got {where} twice.")
            if id(unit) in in_shim:
                raise ValueError(
                    f"Expected `units` outside the HQQ layers' shims, got {where}: a layer "
                    "is sharded whole with its shim (pass the shim or a module above it)."
                )
            if _without_forward(unit):
                raise ValueError(
                    f"Expected `units` with a forward of their own, got {where}: fully_shard "
                    "takes no ModuleList or ModuleDict (pass its children)."
                )
            seen.add(id(unit))
        given = list(units)
    else:
        got = f"a {type(units).__name__}" if isinstance(units, nn.Module) else repr(units)
        raise ValueError(
            "Expected `units` to be 'blocks', 'layers' or a list of submodules of `model`, "
            f"got {got}."
        )
    # Layers outside every unit get a unit each; a unit inside another is sharded first.
    covered = {id(m) for unit in given for m in unit.modules()}
    rest = [layer for layer in per_layer if id(layer) not in covered]
    depth = {id(m): path.count(".") + (path != "") for path, m in modules.items()}
    return sorted([*given, *rest], key=lambda m: -depth[id(m)])


def shard_quantized(
    model: nn.Module, /, *, units: object = "blocks", **fully_shard_kwargs: Any
) -> nn.Module:
    """Shards ``model`` with FSDP2: every HQQ layer's codes, scales, zeros and adapters.

    Calls :func:`register_quant_params`, then ``torch.distributed.fsdp.fully_shard``
    on each unit of ``units``, then on ``model`` for the remaining parameters. A unit
    is gathered whole before its forward (and backward) and freed after:

    - ``"blocks"`` (the default): the repeated blocks, the children that hold HQQ
      layers of the ``nn.ModuleList``/``nn.Sequential`` in ``model`` with the most
      such children (a transformer's layers), at least two; none: as ``"layers"``. Fewer,
      larger all-gathers: on 2 H100s this scaled 1.84–1.95× from 1 GPU where
      ``"layers"`` scaled 1.22× (``benchmarks/bench_distributed.py``).
    - ``"layers"``: each HQQ layer (its shim, for a layer inside an
      :class:`~hqqlora.HqqLoraLinear`, so that adapters and base are gathered
      together); at most one layer gathered at a time.
    - a list of submodules of ``model``, as torchtune's per-layer policies: each
      once, none inside a shim (a shim's forward reads its base layer's tensors) and
      no ``nn.ModuleList``/``nn.ModuleDict`` (``fully_shard`` needs a forward).

    HQQ layers outside every unit get a unit each.
    Each rank then holds about 1/N of the quantized base (:func:`quantized_bytes`)
    and of the adapters, as ``DTensor`` shards; FSDP2 gathers a layer for its
    forward and backward, frees it afterwards, and reduce-scatters the adapters'
    gradients (their mean over ranks). Train with an optimizer over the
    parameters that require grad, as with any FSDP2 model. Inject adapters
    *before* sharding (DoRA's magnitude is computed from the whole weight).

    In place, like ``fully_shard``: ``model`` is returned, now an ``FSDPModule``.
    Call it on every rank, after ``torch.distributed.init_process_group``. Outside
    the forward a layer holds shards only: gather it with :func:`gathered` to call
    :func:`~hqqlora.merge`, :func:`~hqqlora.merge_report` or
    :func:`~hqqlora.dequantize` on it. :func:`~hqqlora.save_adapter` and
    :func:`assign_adapter` take the sharded model's adapters as they are.

    Args:
        model: a module with HQQ layers, adapters injected; changed in place.
        units: ``"blocks"``, ``"layers"`` or a list of submodules, as above.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (``mesh``,
            ``reshard_after_forward``, ``mp_policy``, ``offload_policy``). A
            ``MixedPrecisionPolicy`` may set ``reduce_dtype`` and ``output_dtype``
            but not ``param_dtype``: FSDP2 would cast the codes (held as floats)
            with the adapters. Quantize with the ``compute_dtype`` you want and
            inject adapters in it instead.

    Returns:
        ``model`` itself.

    Raises:
        RuntimeError: no initialized process group.
        TypeError: ``model`` is not a module, or a keyword ``fully_shard`` does not
            take.
        ValueError: no HQQ layer, a layer with ``offload_meta``, a model or
            layer already sharded, a ``model`` that is an ``nn.ModuleList`` or
            ``nn.ModuleDict``, an ``mp_policy`` with a ``param_dtype``, or ``units``
            not as above. Nothing changes then.

    Example::

        dist.init_process_group()  # under torchrun
        model = hqqlora.quantize_model(model, config, compute_dtype=torch.bfloat16, device="cuda")
        hqqlora.inject_adapter(model, target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32)
        hqqlora.distributed.shard_quantized(model)
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard_quantized: expected an initialized process group "
            "(torch.distributed.init_process_group, e.g. under torchrun), got none."
        )
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = _check_model(model)
    if _without_forward(model):
        raise ValueError(
            f"Expected `model` to have a forward, got a {type(model).__name__}: fully_shard "
            "takes no ModuleList or ModuleDict as the root (shard the module that holds it)."
        )
    chosen = _shard_units(model, layers, units)
    try:  # a misspelt keyword would raise at the first fully_shard, after changes
        inspect.signature(fully_shard).bind(model, **fully_shard_kwargs)
    except TypeError as error:
        raise TypeError(
            f"Expected keyword arguments of fully_shard, got {sorted(fully_shard_kwargs)}: {error}."
        ) from None
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise ValueError(
            f"Expected a model not yet sharded by FSDP2, got a sharded {type(sharded[0]).__name__}."
        )
    param_dtype = getattr(fully_shard_kwargs.get("mp_policy"), "param_dtype", None)
    if param_dtype is not None:
        raise ValueError(
            "Expected an mp_policy without param_dtype, got MixedPrecisionPolicy(param_dtype="
            f"{param_dtype}): FSDP2 casts every float parameter of a unit to it, and the "
            "quantized codes are held as floats for FSDP2. Quantize with the compute_dtype "
            "you want and inject adapters in it (reduce_dtype and output_dtype are fine)."
        )
    register_quant_params(model)
    for unit in chosen:
        if unit is not model:
            fully_shard(unit, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


@contextlib.contextmanager
def gathered(module: nn.Module, /) -> Iterator[nn.Module]:
    """Within the block, every FSDP2-sharded module under ``module`` holds whole tensors.

    ``module`` is an FSDP2 unit or holds some (the model, say): a layer inside a unit
    is gathered through its unit. Calls ``unshard()`` on each ``FSDPModule`` in
    ``module`` (itself included),
    and ``reshard()`` on leaving, also on an error. A collective: every rank
    enters the block. Inside it an HQQ layer is a whole layer again, so
    :func:`~hqqlora.merge`, :func:`~hqqlora.merge_report`, :func:`~hqqlora.dequantize`
    and :func:`~hqqlora.get_adapter` give what they give unsharded. Use it to
    read, not to train: writes to the gathered tensors are dropped on leaving.

    Raises:
        ValueError: nothing in ``module`` is sharded by FSDP2.

    Example::

        with hqqlora.distributed.gathered(model.layers[0]) as block:  # a unit, or above
            shim = block.self_attn.q_proj
            merged = hqqlora.merge(shim.base_layer, hqqlora.get_adapter(shim)[""])
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = None if fsdp is None else fsdp.FSDPModule
    units = [] if kind is None else [m for m in module.modules() if isinstance(m, kind)]
    if not units:
        raise ValueError(
            f"Expected a module sharded by FSDP2 (fully_shard), got a {type(module).__name__} "
            "with no sharded module in it: pass the unit that holds it (with "
            "shard_quantized's default units, its block) or the whole model."
        )
    done = []
    try:
        for unit in units:
            unit.unshard()
            done.append(unit)
        with torch.no_grad():
            yield module
    finally:
        for unit in reversed(done):
            unit.reshard()


def _nbytes(tensor: Tensor | None) -> int:
    if tensor is None:
        return 0
    if _is_dtensor(tensor):
        tensor = cast(Any, tensor).to_local()
    return tensor.numel() * tensor.element_size()


def quantized_bytes(model: nn.Module, /) -> int:
    """The bytes of the quantized base this rank holds: codes, scales, zeros and biases.

    Summed over the HQQ layers of ``model`` (a merged shim counts its base in use);
    for FSDP2 shards, the local shard only. With N ranks, a model sharded by
    :func:`shard_quantized` holds about 1/N of its whole count on each rank.

    Raises:
        TypeError: ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    total = 0
    for base in hqq_layers(model).values():
        if holds_quant_params(base):
            tensors = [base.W_q, base.scale, base.zero]
        else:
            meta = base.meta or {}
            tensors = [base.W_q, *(meta.get(k) for k in ("scale", "zero", "zero_scale"))]
        total += sum(_nbytes(t) for t in (*tensors, base.bias))
    return total


def full_tensors(adapters: object) -> tuple[Any, bool]:
    """``adapters`` with each ``DTensor`` leaf replaced by its whole tensor, and whether any was.

    A collective when there are DTensors (one all-gather per sharded leaf, in
    sorted order): every rank calls it. Other leaves and values pass unchanged.
    """
    if not isinstance(adapters, Mapping) or _dtensor_type() is None:
        return adapters, False
    sharded = False
    result: dict[Any, Any] = {}
    for path in sorted(adapters, key=str):
        params = adapters[path]
        if not isinstance(params, Mapping):
            result[path] = params
            continue
        leaves = {}
        for key in sorted(params, key=str):
            leaf = params[key]
            if _is_dtensor(leaf):
                sharded = True
                with torch.no_grad():
                    leaf = leaf.detach().full_tensor()
            leaves[key] = leaf
        result[path] = leaves
    return (result if sharded else adapters), sharded


def write_on_rank0(write: Any, what: str) -> None:
    """Runs ``write()`` on rank 0 of the default group only; every rank returns once it is done.

    Rank 0's outcome is broadcast to all ranks (a barrier that carries the error):
    if ``write`` raised on rank 0, it raises there and the others raise
    ``RuntimeError`` naming it, rather than waiting forever or going on without
    the file.
    """
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as caught:  # re-raised below, after telling the other ranks
            error = caught
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"{what}: rank 0 failed to write, with {outcome[0]}")


def assign_adapter(
    model: nn.Module,
    adapters: Mapping[str, Mapping[str, Tensor]],
    /,
    *,
    adapter_name: str = "default",
) -> nn.Module:
    """Copies ``adapters`` into the shims' parameters of adapter ``adapter_name``, in place.

    The counterpart of :func:`~hqqlora.get_adapter`: after it, ``get_adapter(model,
    adapter_name)`` holds the values of ``adapters`` (cast to the parameters'
    dtype and device). ``adapters`` (for example from :func:`~hqqlora.load_adapter`)
    must name exactly the shims that hold ``adapter_name``, with their rank,
    ``scaling`` and DoRA-ness. On a model sharded by FSDP2 each rank keeps its own
    shard of each tensor (``distribute_tensor`` from rank 0's values): a collective,
    call it on every rank, outside the forward.

    Args:
        model: a module with :class:`~hqqlora.HqqLoraLinear` shims (sharded or not).
        adapters: module path → adapter dict (whole tensors).
        adapter_name: the shims' adapter to overwrite.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: paths that are not the shims holding ``adapter_name``, or an
            adapter whose shapes, rank, ``scaling`` or ``magnitude`` do not match
            its shim's. Nothing changes then.
        TypeError: ``adapters`` is not a dict of adapter dicts.
    """
    from hqqlora._nn import HqqLoraLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"Expected `adapters` to be a dict of module path -> adapter dict, got {type(adapters).__name__}."
        )
    shims = {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, HqqLoraLinear) and adapter_name in m.lora_A
    }
    unknown, missing = sorted(set(adapters) - set(shims)), sorted(set(shims) - set(adapters))
    if unknown or missing:
        raise ValueError(
            f"Expected adapters for exactly the shims holding {adapter_name!r} ({sorted(shims)[:4]}"
            f"{'...' if len(shims) > 4 else ''}), got unknown paths {unknown} and none for {missing}."
        )
    copies = []
    for path in sorted(adapters):
        shim, params = shims[path], adapters[path]
        layout = quant_layout(shim.get_base_layer())
        check_params(
            params,
            in_features=layout.in_features,
            out_features=layout.out_features,
            name=f"adapters[{path!r}]",
        )
        rank, scaling = int(params["lora_A"].shape[0]), float(params["scaling"])
        if rank != shim.r[adapter_name] or not math.isclose(
            scaling, shim.scaling[adapter_name], rel_tol=1e-6
        ):
            raise ValueError(
                f"Expected rank {shim.r[adapter_name]} and scaling {shim.scaling[adapter_name]:g} "
                f"for {path!r} (the shim's), got rank {rank} and scaling {scaling:g}."
            )
        dora = adapter_name in shim.lora_magnitude_vector
        if dora != ("magnitude" in params):
            raise ValueError(
                f"Expected {'a' if dora else 'no'} `magnitude` for {path!r} (the shim's adapter "
                f"{'is' if dora else 'is not'} DoRA), got {'none' if dora else 'one'}."
            )
        targets = {
            "lora_A": cast(Tensor, shim.lora_A[adapter_name].weight),
            "lora_B": cast(Tensor, shim.lora_B[adapter_name].weight),
        }
        if dora:
            targets["magnitude"] = cast(Tensor, shim.lora_magnitude_vector[adapter_name].weight)
        copies += [(targets[key], params[key]) for key in sorted(targets)]
    with torch.no_grad():
        for target, value in copies:
            _copy_into(target, value)
    return model


def _copy_into(target: Tensor, value: Tensor) -> None:
    if not _is_dtensor(target):
        target.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    sharded = cast(Any, target)  # a DTensor
    local = sharded.to_local()
    value = value.detach().to(device=local.device, dtype=local.dtype)
    shard = distribute_tensor(value, sharded.device_mesh, sharded.placements)
    local.copy_(shard.to_local())
