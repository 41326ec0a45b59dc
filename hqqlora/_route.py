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

``threading.local`` rather than ``contextvars``: dynamo traces attribute reads and
writes on it (so ``torch.compile(fullgraph=True)`` of a ``functional_call`` works),
while it cannot trace ``ContextVar.set``; every hqqlora call sets and restores the
state synchronously, so tasks sharing a thread never see each other's values.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hqqlora._base import HQQLinear, base_forward, unrouted_class

__all__ = [
    "adapter_names_in_use",
    "install_adapter_names",
    "prepare_model",
    "routed_params",
    "routing",
]


class _State(threading.local):
    def __init__(self) -> None:
        # functional_call: layer (or named shim) -> adapter dict, or None outside one.
        self.adapters: Mapping[nn.Module, Any] | None = None
        # model(..., adapter_names=...): the names, or None.
        self.adapter_names: Sequence[str] | None = None
        self.names_stack: list[Sequence[str] | None] = []


_STATE = _State()
_PREPARE_LOCK = threading.Lock()
_ROUTED_CLASSES: dict[type, type] = {}


def routing() -> Mapping[nn.Module, Any] | None:
    """The running ``functional_call``'s table (module → adapter), or ``None``."""
    return _STATE.adapters


def set_routing(table: Mapping[nn.Module, Any] | None) -> Mapping[nn.Module, Any] | None:
    """Sets this thread's table and returns the previous one (to restore it)."""
    previous = _STATE.adapters
    _STATE.adapters = table
    return previous


def routed_params(module: nn.Module) -> Any:
    """The adapter the running ``functional_call`` gives ``module``, or ``None``."""
    table = _STATE.adapters
    return None if table is None else table.get(module)


def adapter_names_in_use() -> Sequence[str] | None:
    """The ``adapter_names`` of the model call under way in this thread, or ``None``."""
    return _STATE.adapter_names


# ---- prepared layers ---------------------------------------------------------------


def _routed_hqq_forward(self: HQQLinear, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    table = _STATE.adapters
    if table is None:
        return unrouted_class(self).forward(self, x, *args, **kwargs)
    params = table.get(self)
    if params is None:
        # Inside functional_call every HQQ layer takes base_forward, so that
        # torch.func transforms and torch.compile see the pure path, adapted or not.
        return base_forward(self, x)
    from hqqlora._lora import apply_lora

    return apply_lora(self, params, x)


def _routed_shim_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    params = routed_params(self)
    if params is None:
        return unrouted_class(self).forward(self, x, *args, **kwargs)
    from hqqlora._lora import apply_lora

    return apply_lora(self.get_base_layer(), params, x)


def _routed_class(cls: type) -> type:
    routed = _ROUTED_CLASSES.get(cls)
    if routed is None:
        forward = _routed_hqq_forward if issubclass(cls, HQQLinear) else _routed_shim_forward
        routed = type(
            cls.__name__,
            (cls,),
            {
                "forward": forward,
                "_hqqlora_unrouted": cls,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__reduce_ex__": _reduce_as_unrouted,
            },
        )
        _ROUTED_CLASSES[cls] = routed
    return routed


def _reduce_as_unrouted(self: nn.Module, protocol: int) -> Any:
    # Pickles (and torch.save) as the original class: the routing is a property of
    # this process, and a dynamic class cannot be looked up by name on load.
    state = self.__dict__.copy()
    return (_rebuild_unrouted, (unrouted_class(self), state))


def _rebuild_unrouted(cls: type, state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    return module


def prepare_layer(module: nn.Module) -> None:
    """Makes ``module`` (an ``HQQLinear`` or a foreign shim) read the routing state. Idempotent."""
    if getattr(type(module), "_hqqlora_unrouted", None) is not None:
        return
    if torch.compiler.is_compiling():
        raise ValueError(
            "Expected the model's HQQ layers to be prepared before torch.compile traces "
            f"hqqlora.functional_call, got an unprepared {type(module).__name__}: call "
            "hqqlora.prepare_model(model) (quantize_model and inject_adapter do) outside "
            "the compiled region."
        )
    with _PREPARE_LOCK:
        if getattr(type(module), "_hqqlora_unrouted", None) is None:
            module.__class__ = _routed_class(type(module))


def prepare_model(model: nn.Module, /) -> nn.Module:
    """Prepares every ``HQQLinear`` of ``model`` for hqqlora's model-level calls, in place.

    :func:`~hqqlora.functional_call` runs a model with adapters applied to its HQQ
    layers without changing the module tree per call (so it is reentrant and
    thread-safe); for that, each plain ``HQQLinear`` must read hqqlora's per-thread
    routing state. This gives each one, once, a subclass of its own class whose
    ``forward`` runs the original one unchanged outside hqqlora's calls. Modules,
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
        if isinstance(module, HQQLinear):
            prepare_layer(module)
    return model


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
    from hqqlora._mixed import BASE

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


def _pop_adapter_names(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    # Always push (and let the always-called post hook pop), also when the names
    # turn out to be invalid: the stack stays balanced whatever raises.
    _STATE.names_stack.append(_STATE.adapter_names)
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    _STATE.adapter_names = None if names is None else _check_adapter_names(module, names)
    return args, kwargs


def _restore_adapter_names(module: nn.Module, args: tuple, output: Any) -> None:
    _STATE.adapter_names = _STATE.names_stack.pop()


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
    model.register_forward_pre_hook(_pop_adapter_names, with_kwargs=True)
    model.register_forward_hook(_restore_adapter_names, always_call=True)
