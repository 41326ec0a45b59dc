"""LoRA and DoRA adapters on HQQ-quantized linear layers, as pure functions over pytrees."""

from hqqlora._bank import AdapterBank, bank_weight_norm, stack_adapters
from hqqlora._base import QuantLayout, base_forward, dequantize, quant_layout, quantize_like
from hqqlora._compose import CombineInfo, add, combine, negate, scale
from hqqlora._dora import dora_weight_norm
from hqqlora._io import load_adapter, save_adapter
from hqqlora._loftq import loftq
from hqqlora._lora import apply_lora
from hqqlora._merge import merge, merged_weight, unmerge, unmerged_weight
from hqqlora._mixed import mixed_batch, mixed_batch_indexed
from hqqlora._model import (
    functional_call,
    get_adapter,
    inject_adapter,
    model_weight_norm,
    quantize_model,
)
from hqqlora._nn import HqqLoraLinear, dispatch_hqq
from hqqlora._params import (
    check_params,
    delta_weight,
    expand_group_constant,
    init_lora,
    trainable_params,
)
from hqqlora._peft import use_in_peft
from hqqlora._report import merge_report
from hqqlora._route import prepare_model
from hqqlora._verbs import delete_adapter, disable_adapter, merge_and_unload, set_adapter
from hqqlora.distributed import all_reduce_mean, assign_adapter, rank_generator

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "CombineInfo",
    "HqqLoraLinear",
    "QuantLayout",
    "add",
    "all_reduce_mean",
    "apply_lora",
    "assign_adapter",
    "bank_weight_norm",
    "base_forward",
    "check_params",
    "combine",
    "delete_adapter",
    "delta_weight",
    "dequantize",
    "disable_adapter",
    "dispatch_hqq",
    "dora_weight_norm",
    "expand_group_constant",
    "functional_call",
    "get_adapter",
    "init_lora",
    "inject_adapter",
    "load_adapter",
    "loftq",
    "merge",
    "merge_and_unload",
    "merge_report",
    "merged_weight",
    "mixed_batch",
    "mixed_batch_indexed",
    "model_weight_norm",
    "negate",
    "prepare_model",
    "quant_layout",
    "quantize_like",
    "quantize_model",
    "rank_generator",
    "save_adapter",
    "scale",
    "set_adapter",
    "stack_adapters",
    "trainable_params",
    "unmerge",
    "unmerged_weight",
    "use_in_peft",
]
