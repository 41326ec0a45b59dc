"""Routing model-level calls to the HQQ layers deep inside a model, per thread.

:func:`~hqqlora.functional_call` and ``model(..., adapter_names=[...])`` must reach
layers anywhere inside an arbitrary model without changing the module tree on each
call: a tree shared by threads that each swapped their own stand-ins in would give
one thread another's adapters, and a crash mid-swap would leave it rewired. So the
per-call state lives in a thread-local value (one per thread, saved and restored
around each call, so calls nest), and the layers read it:

* ``HqqLoraLinear`` reads it in its own ``forward``;
* a plain ``HQQLinear`` (or another library's shim named in ``functional_call``)
  is *prepared* once: its class becomes a subclass of its own class whose
  ``forward`` reads the routing state and, when no hqqlora call is under way,
  runs the original ``forward`` unchanged. Its modules, parameters, buffers, state
  dict, hooks and ``isinstance`` checks stay as they were; this is the mechanism
  ``torch.distributed.fsdp.fully_shard`` uses too.

The state itself is in :mod:`hqqlora._state`.

Limits: a layer whose *instance* has its own ``forward`` (hqq's
``prepare_for_inference``, ``layer.forward = torch.compile(layer.forward)``, or
accelerate hooks added before preparing) cannot be routed and is refused with a
``ValueError``; and activation checkpointing *inside* the model recomputes the
forward during backward, after the call's routing has ended, so wrap the whole
``functional_call`` in the checkpoint instead (the recomputation then re-enters it).
"""

from __future__ import annotations

import copy
import copyreg
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from hqqlora._base import HQQLinear, base_forward, holds_quant_params, unrouted_class
from hqqlora._state import STATE

__all__ = [
    "Routed",
    "adapter_names_in_use",
    "apply_routed",
    "install_adapter_names",
    "is_foreign_shim",
    "prepare_model",
    "routed_params",
    "set_routing",
]


_PREPARE_LOCK = threading.Lock()
_ROUTED_CLASSES: dict[type, type] = {}


class Routed(NamedTuple):
    """A layer's entry in the routing table of a :func:`~hqqlora.functional_call`.

    Attributes:
        adapter: an adapter dict (every row), or an ``AdapterBank`` (one entry per row).
        row_index: with a bank, row → bank entry (``-1``: none), on the bank's device.
        weight_norm: DoRA's held norms for this layer, or ``None`` to compute them.
    """

    adapter: Any
    row_index: Tensor | None = None
    weight_norm: Any = None


def apply_routed(base: HQQLinear, routed: Any, x: Tensor, /, **options: Any) -> Tensor:
    """The output of ``base`` with the adapter the routing table gives it.

    An adapter dict goes through ``apply_lora``; a bank with its row index through
    ``mixed_batch_indexed`` (row ``i`` of ``x``, dim 0, gets entry ``index[i]``).
    """
    from hqqlora._lora import apply_lora

    if not isinstance(routed, Routed):
        return apply_lora(base, routed, x, **options)
    if routed.row_index is None:
        return apply_lora(base, routed.adapter, x, weight_norm=routed.weight_norm, **options)
    from hqqlora._mixed import mixed_batch_indexed

    return mixed_batch_indexed(
        x, routed.adapter, routed.row_index, base=base, weight_norm=routed.weight_norm, **options
    )


def set_routing(table: Mapping[nn.Module, Any] | None) -> Mapping[nn.Module, Any] | None:
    """Sets this thread's table and returns the previous one (to restore it)."""
    previous = STATE.adapters
    STATE.adapters = table
    return previous


def routed_params(module: nn.Module) -> Any:
    """The adapter the running ``functional_call`` gives ``module``, or ``None``."""
    table = STATE.adapters
    return None if table is None else table.get(module)


def adapter_names_in_use() -> Sequence[str] | None:
    """The ``adapter_names`` of the model call under way in this thread, or ``None``."""
    return STATE.adapter_names


# ---- prepared layers ---------------------------------------------------------------


def _routed_hqq_forward(self: HQQLinear, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    table = STATE.adapters
    if table is None or STATE.bypass is self:
        if holds_quant_params(self) and not args and not kwargs:
            # HQQ's forward reads scale/zero from meta; these are parameters now (FSDP2).
            return base_forward(self, x)
        return cast(Tensor, unrouted_class(self).forward(self, x, *args, **kwargs))
    params = table.get(self)
    previous, STATE.running = STATE.running, self
    try:
        if params is None:
            # Inside functional_call every HQQ layer takes base_forward, so that
            # torch.func transforms and torch.compile see the pure path, adapted or not.
            return base_forward(self, x)
        return apply_routed(self, params, x)
    finally:
        STATE.running = previous


def _routed_shim_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    params = routed_params(self)
    if params is None:
        return cast(Tensor, unrouted_class(self).forward(self, x, *args, **kwargs))
    if getattr(self, "merged", False):
        raise ValueError(
            f"Expected an unmerged {type(self).__name__} in functional_call, got one with merged "
            "adapters (its base layer holds them): unmerge it first."
        )
    return apply_routed(cast(Any, self).get_base_layer(), params, x)  # a PEFT-style shim


def _set_backend_on_original(cls: type[Any], backend: Any) -> None:
    # HQQLinear.__init__ and users call set_backend, which assigns cls.forward: on a
    # prepared class that would erase the routing for every prepared layer.
    unrouted = cls._hqqlora_unrouted
    unrouted.set_backend(backend)


def _routed_class(cls: type) -> type:
    routed = _ROUTED_CLASSES.get(cls)
    if routed is None:
        namespace = {
            "forward": _routed_shim_forward,
            "_hqqlora_unrouted": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__reduce_ex__": _reduce_as_unrouted,
            "__deepcopy__": _deepcopy_prepared,
        }
        if issubclass(cls, HQQLinear):
            namespace["forward"] = _routed_hqq_forward
            namespace["set_backend"] = classmethod(_set_backend_on_original)
        routed = type(cls.__name__, (cls,), namespace)
        _ROUTED_CLASSES[cls] = routed
    return routed


def _reduce_as_unrouted(self: nn.Module, protocol: int) -> Any:
    # Pickles (and torch.save-s) as the original class: the routing is a property of
    # this process, and the pickle must load where hqqlora is not installed. (Not
    # copyreg.__newobj__, which pickle refuses for another class than the object's:
    # torch.load(weights_only=True) needs copyreg._reconstructor allowed too.)
    getstate = getattr(self, "__getstate__", None)  # object.__getstate__ is 3.11+
    state = getstate() if getstate is not None else self.__dict__
    return copyreg._reconstructor, (unrouted_class(self), object, None), state  # type: ignore[attr-defined]  # private, not in typeshed


def _deepcopy_prepared(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # A copy made in this process stays prepared (the default would go through
    # __reduce_ex__ and give back the original class).
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new


def _check_routable(module: nn.Module) -> None:
    own = module.__dict__.get("forward")
    if own is None:
        return
    # accelerate's hooks wrap the forward they found: routable if that was ours.
    wrapped = getattr(module.__dict__.get("_old_forward"), "__func__", None)
    if wrapped in (_routed_hqq_forward, _routed_shim_forward):
        return
    raise ValueError(
        f"Expected {type(module).__name__} layers whose forward is their class's, got one with "
        "its own instance `forward` (set by hqq's prepare_for_inference, accelerate's hooks or "
        "`layer.forward = torch.compile(layer.forward)`), which hqqlora cannot route adapters "
        "through: call hqqlora.prepare_model(model) before such patching, or run the layer "
        "unpatched."
    )


def prepare_layer(module: nn.Module) -> None:
    """Makes ``module`` (an ``HQQLinear`` or a foreign shim) read the routing state. Idempotent."""
    if getattr(type(module), "_hqqlora_unrouted", None) is not None:
        _check_routable(module)
        return
    if torch.compiler.is_compiling():
        raise ValueError(
            "Expected the model's HQQ layers to be prepared before torch.compile traces "
            f"hqqlora.functional_call, got an unprepared {type(module).__name__}: call "
            "hqqlora.prepare_model(model) (quantize_model and inject_adapter do) outside "
            "the compiled region."
        )
    _check_routable(module)
    with _PREPARE_LOCK:
        if getattr(type(module), "_hqqlora_unrouted", None) is None:
            module.__class__ = _routed_class(type(module))


def prepare_model(model: nn.Module, /) -> nn.Module:
    """Prepares every ``HQQLinear`` of ``model`` for hqqlora's model-level calls, in place.

    :func:`~hqqlora.functional_call` runs a model with adapters applied to its HQQ
    layers without changing the module tree per call (so it is reentrant and
    thread-safe); for that, each plain ``HQQLinear`` must read hqqlora's per-thread
    routing state. This gives each one, once, a subclass of its own class whose
    ``forward`` runs the original one unchanged outside hqqlora's calls; and each
    other library's shim around one (PEFT's ``HqqLoraLinear``) likewise. Modules,
    parameters, buffers, state dict, hooks and ``isinstance`` are unchanged; a
    pickled or ``torch.save``-d layer comes back as its original class.

    ``functional_call``, :func:`~hqqlora.quantize_model` and
    :func:`~hqqlora.inject_adapter` call this themselves; call it yourself only
    before ``torch.compile``-ing a ``functional_call`` on a model quantized by other
    means (dynamo cannot trace the one-time class change).

    Args:
        model: a module; it is changed in place (idempotent, thread-safe).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
    for module in model.modules():
        if isinstance(module, HQQLinear) or is_foreign_shim(module):
            prepare_layer(module)
    return model


def is_foreign_shim(module: nn.Module) -> bool:
    """Whether ``module`` is another library's layer around an ``HQQLinear`` (PEFT's)."""
    from hqqlora._nn import HqqLoraLinear

    if isinstance(module, (HQQLinear, HqqLoraLinear)):
        return False
    return isinstance(getattr(module, "base_layer", None), HQQLinear) and hasattr(
        module, "get_base_layer"
    )


# ---- model(..., adapter_names=[...]) ------------------------------------------------


def _known_adapters(model: nn.Module) -> set[str]:
    from hqqlora._nn import HqqLoraLinear

    return {
        name
        for module in model.modules()
        if isinstance(module, HqqLoraLinear)
        for name in module.lora_A
    }


def _check_adapter_names(model: nn.Module, names: object) -> list[str]:
    from hqqlora._bank import BASE

    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"Expected `adapter_names` to be a list of adapter names, got {type(names).__name__}."
        )
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"Expected `adapter_names` to hold strings, got {bad[:4]}.")
    if model.training:
        raise ValueError(
            "Expected the model in eval mode with `adapter_names` (as PEFT requires), got "
            "training mode: call model.eval()."
        )
    known = _known_adapters(model)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"Expected `adapter_names` among {sorted(known)} or {BASE!r}, got unknown {unknown}."
        )
    return names


def _pop_adapter_names(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    # Push first (the always-called post hook pops), also when the names turn out to
    # be invalid, so that the stack stays balanced whatever raises afterwards.
    STATE.names_stack.append((module, STATE.adapter_names))
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    STATE.adapter_names = None if names is None else _check_adapter_names(module, names)
    return args, kwargs


def _restore_adapter_names(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    # Pop only this module's own frame: if a hook that runs before ours raised, our
    # pre-hook never pushed.
    stack = STATE.names_stack
    if stack and stack[-1][0] is module:
        STATE.adapter_names = stack.pop()[1]


def install_adapter_names(model: nn.Module) -> None:
    """Lets ``model(*args, adapter_names=[...], **kwargs)`` route the names to every shim.

    Registers, once, a forward pre-hook on ``model`` that takes ``adapter_names`` out
    of the call's keywords (so the model's own forward never sees it) and makes it
    this thread's value for the duration of the call, and an always-called forward
    hook that restores the previous value, also when the forward raises. Each
    ``HqqLoraLinear`` reads it as its own ``adapter_names``, as PEFT's model routes
    them to every LoRA layer.
    """
    if any(h is _pop_adapter_names for h in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(_pop_adapter_names, with_kwargs=True, prepend=True)
    model.register_forward_hook(_restore_adapter_names, always_call=True)
