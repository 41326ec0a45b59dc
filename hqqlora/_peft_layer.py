"""hqqlora's layer as a PEFT ``LoraLayer``: the class :func:`hqqlora.use_in_peft` registers.

This module imports PEFT; ``import hqqlora`` never imports it.

PEFT finds its layers by ``isinstance(module, BaseTunerLayer)`` (or ``LoraLayer``)
and nothing else: which parameters stay trainable (``_mark_only_adapters_as_trainable``
keeps only those under a tuner layer), what ``save_pretrained`` writes (the state
dict keys under a tuner layer), whether ``add_adapter`` calls ``update_layer`` on a
layer or wraps it again, which layers ``set_adapter``, ``disable_adapter``
(``get_layer_status``), ``delete_adapter`` and ``merge_and_unload`` visit, and which
get the ``adapter_names`` forward pre-hook. A plain :class:`~hqqlora.HqqLoraLinear`
is none of these, so through ``LoraConfig._register_custom_module`` alone PEFT
freezes it, saves no tensor of it, and fails on the rest.

:class:`PeftHqqLoraLinear` is both: hqqlora's layer first in the method order (its
``forward``, ``update_layer``, ``set_adapter``, ``merge``, ``unmerge``,
``delete_adapter``, ``enable_adapters`` …, all over the functional core), and
PEFT's ``LoraLayer`` for the protocol's remaining helpers
(``_get_available_adapters``, ``_freeze_non_trainable_peft_weights``, ``set_scale``
…), which read only the containers both classes share.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora.layer import LoraLayer
from torch import nn

from hqqlora._base import HQQLinear
from hqqlora._nn import HqqLoraLinear

__all__ = ["PeftHqqLoraLinear"]


class PeftHqqLoraLinear(HqqLoraLinear, LoraLayer):  # type: ignore[misc]  # PEFT's LoraLayer annotates its attributes and hooks differently; HqqLoraLinear's win by MRO
    """:class:`~hqqlora.HqqLoraLinear` that PEFT recognises as one of its ``LoraLayer``\\ s.

    Built by PEFT's dispatch (``PeftHqqLoraLinear(target, adapter_name, config=...,
    r=..., lora_alpha=..., **dispatch_kwargs)``) for each ``HQQLinear`` a
    :func:`~hqqlora.use_in_peft` config targets; the arguments are
    :class:`~hqqlora.HqqLoraLinear`'s.
    """

    def __init__(self, base_layer: HQQLinear, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        # PEFT's model reads these on every LoraLayer (adapter_names checks,
        # add_weighted_adapter); a linear layer holds no embedding adapters.
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
