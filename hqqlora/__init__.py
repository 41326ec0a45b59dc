"""LoRA and DoRA adapters on HQQ-quantized linear layers, as pure functions over pytrees."""

from hqqlora._base import QuantLayout, base_forward, dequantize, quant_layout, quantize_like
from hqqlora._dora import dora_weight_norm
from hqqlora._io import load_adapter, save_adapter
from hqqlora._lora import apply_lora
from hqqlora._merge import merge, merged_weight, unmerge, unmerged_weight
from hqqlora._model import functional_call, get_adapter, inject_adapter, quantize_model
from hqqlora._params import check_params, delta_weight, init_lora, trainable_params

__version__ = "0.1.0"

__all__ = [
    "QuantLayout",
    "apply_lora",
    "base_forward",
    "check_params",
    "delta_weight",
    "dequantize",
    "dora_weight_norm",
    "functional_call",
    "get_adapter",
    "init_lora",
    "inject_adapter",
    "load_adapter",
    "merge",
    "merged_weight",
    "quant_layout",
    "quantize_like",
    "quantize_model",
    "save_adapter",
    "trainable_params",
    "unmerge",
    "unmerged_weight",
]
