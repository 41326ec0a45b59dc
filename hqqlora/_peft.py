"""hqqlora inside PEFT: one call on a ``LoraConfig``.

PEFT stays optional: this module imports it only when :func:`use_in_peft` runs.
"""

from __future__ import annotations

import copy
from typing import Any

from hqqlora._base import HQQLinear
from hqqlora._nn import resolve_options

__all__ = ["use_in_peft"]

_INITS = (True, False, "gaussian")


def use_in_peft(config: Any) -> Any:
    """A copy of PEFT's ``config`` with which PEFT puts hqqlora's layer on every ``HQQLinear``.

    Registers :class:`~hqqlora._peft_layer.PeftHqqLoraLinear` (hqqlora's
    :class:`~hqqlora.HqqLoraLinear`, also a PEFT ``LoraLayer``) as the config's
    custom module for ``HQQLinear`` (``LoraConfig._register_custom_module``), so that
    ``get_peft_model(model, config)`` and ``PeftModel.from_pretrained(model, path,
    config=config)`` build it instead of PEFT's own ``HqqLoraLinear``. PEFT's
    model-level API then works unchanged on it: trainable parameters,
    ``save_pretrained`` (the same files as PEFT's own layer writes),
    ``add_adapter``, ``set_adapter``, ``disable_adapter``, ``adapter_names=``,
    ``delete_adapter``, ``merge_adapter``/``unmerge_adapter``, ``merge_and_unload``,
    DoRA — with hqqlora's behaviour: the bias survives merges, ``unmerge`` restores
    the original layer exactly, several adapters merge with one requantization, and
    mixed batches accept DoRA adapters.

    The registration lives on the config object, not in the saved
    ``adapter_config.json``: pass the config to ``from_pretrained`` (and, for
    ``load_adapter``, first ``add_adapter(name, use_in_peft(...))``, then
    ``load_adapter(path, name)``), or PEFT builds its own layer for HQQ layers that
    have no hqqlora layer yet.

    Args:
        config: a ``peft.LoraConfig``; it is not modified.

    Returns:
        A new ``LoraConfig``, equal to ``config`` plus the registration.

    Raises:
        ImportError: PEFT is not installed.
        TypeError: ``config`` is not a ``peft.LoraConfig``.
        ValueError: ``config`` asks for what hqqlora's layer does not implement
            (``lora_bias=True``, an ``init_lora_weights`` other than ``True``,
            ``False`` or ``"gaussian"``, a LoRA variant other than DoRA), or already
            maps ``HQQLinear`` to another custom module.

    Example:
        >>> config = hqqlora.use_in_peft(LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
        >>> model = peft.get_peft_model(model, config)  # doctest: +SKIP
    """
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover - PEFT is installed where this is tested
        raise ImportError("hqqlora.use_in_peft needs PEFT: pip install peft.") from error

    if not isinstance(config, LoraConfig):
        raise TypeError(f"Expected a peft.LoraConfig, got {type(config).__name__}.")
    options = resolve_options(config)  # refuses LoRA variants other than DoRA
    if options["lora_bias"]:
        raise ValueError("Expected lora_bias=False (hqqlora's layer has no LoRA bias), got True.")
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        raise ValueError(
            f"Expected `init_lora_weights` in {_INITS} for hqqlora's layer, got {init!r}."
        )
    from hqqlora._peft_layer import PeftHqqLoraLinear

    registered = (config._custom_modules or {}).get(HQQLinear)
    if registered is not None and registered is not PeftHqqLoraLinear:
        raise ValueError(
            f"Expected a config without another custom module for HQQLinear, got {registered!r}."
        )
    new = copy.deepcopy(config)
    new._register_custom_module({HQQLinear: PeftHqqLoraLinear})
    return new
