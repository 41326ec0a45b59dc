"""Pure views of an ``HQQLinear`` layer: dequantization, the base forward, requantization.

HQQ stores a weight ``W`` of shape ``(out, in)`` as bit-packed integer codes ``W_q``
with one float ``scale`` and ``zero`` per quantization group, and reconstructs it as

    W = reshape((unpack(W_q) - zero) * scale, (out, in))

in the layer's compute dtype. Everything here reads a layer and never writes it.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, cast

import torch
from hqq.core.quantize import HQQLinear as HQQLinear  # re-exported for hqqlora's modules
from torch import Tensor

from hqqlora import _decode, _triton
from hqqlora._state import STATE

__all__ = [
    "CODE_VIEW_DTYPES",
    "QuantLayout",
    "base_forward",
    "call_unrouted",
    "check_hqq_layer",
    "dequantize",
    "holds_quant_params",
    "pure_forward",
    "quant_layout",
    "quant_tensors",
    "quantize_like",
    "unpack",
    "unpacked_codes",
    "unrouted_class",
]

# packing name -> (bits per code, codes per packed element)
_PACKINGS = {
    "8bit_u8": (8, 1),
    "4bit_u8": (4, 2),
    "3bit_32": (3, 10),
    "2bit_u8": (2, 4),
    "1bit_u8": (1, 8),
}


@dataclass(frozen=True)
class QuantLayout:
    """The static metadata of a quantized weight (no tensors).

    Attributes:
        shape: ``(out_features, in_features)`` of the dequantized weight.
        nbits: bits per code.
        group_size: number of weights that share one scale and zero.
        axis: HQQ's grouping axis: 1 groups runs of ``group_size`` consecutive
            weights of a row, 0 groups along the flattened ``(group_size, -1)`` view.
        packing: HQQ's packing name (``"4bit_u8"``...), or ``None`` for unpacked codes.
        view_as_float: whether ``W_q`` is stored viewed as a float dtype.
        unpack_view_dtype: the integer dtype ``W_q`` is viewed as before unpacking.
        compute_dtype: the dtype the weight is reconstructed in.
    """

    shape: tuple[int, int]
    nbits: int
    group_size: int
    axis: int
    packing: str | None
    view_as_float: bool
    unpack_view_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def num_groups(self) -> int:
        return self.shape[0] * self.shape[1] // self.group_size

    @property
    def packing_bits(self) -> tuple[int, int]:
        """``(bits per code, codes per packed element)`` of the packing."""
        return _PACKINGS[cast(str, self.packing)]  # only packed layouts ask


def check_hqq_layer(base: object, name: str = "base") -> HQQLinear:
    """Returns ``base`` if it is a quantized ``HQQLinear`` this library can read.

    Raises:
        TypeError: ``base`` is not an ``HQQLinear``.
        ValueError: the layer is not quantized yet, or uses HQQ's deprecated
            quantized scales/zeros, which this library does not read.
    """
    if not isinstance(base, HQQLinear):
        raise TypeError(
            f"Expected `{name}` to be an hqq.core.quantize.HQQLinear, got {type(base).__name__}."
        )
    if base.W_q is None or base.meta is None:
        raise ValueError(f"Expected `{name}` to be a quantized HQQLinear, got one with no weights.")
    if base.meta.get("quant_zero") or base.meta.get("quant_scale"):
        raise ValueError(
            f"Expected `{name}` with float scales and zeros, got one with HQQ's deprecated "
            "quantized scale/zero (quant_scale/quant_zero), which hqqlora does not support."
        )
    return base


def quant_layout(base: HQQLinear) -> QuantLayout:
    """The static :class:`QuantLayout` of an ``HQQLinear``."""
    meta = base.meta
    out_features, in_features = meta["shape"]
    # Positional: this runs on every forward, and keywords cost a frozen dataclass more.
    return QuantLayout(
        (int(out_features), int(in_features)),
        meta["nbits"],
        int(meta["group_size"]),
        int(meta["axis"]),
        meta["packing"],
        bool(meta.get("view_as_float", False)),
        meta.get("unpack_view_dtype", torch.uint8),
        meta.get("compute_dtype", base.compute_dtype),
    )


def holds_quant_params(base: HQQLinear) -> bool:
    """Whether ``scale`` and ``zero`` are registered parameters of ``base``, not ``meta`` entries.

    :func:`hqqlora.distributed.register_quant_params` moves them there so that FSDP2
    shards them with the codes; HQQ's own ``forward`` and ``dequantize`` read
    ``meta`` and cannot run on such a layer, hqqlora's paths read the parameters.
    """
    return "scale" in base._parameters and "zero" in base._parameters


def _refuse_shards(tensors: tuple[Tensor, ...]) -> None:
    # Looked up, not imported (importing torch.distributed.tensor costs ~0.7 s): no
    # DTensor exists before it is imported.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors):
        raise ValueError(
            "Expected the quantized tensors of a whole layer, got DTensor shards (a layer "
            "sharded by FSDP2, outside its forward): run it inside the model's forward, or "
            "gather it first with `with hqqlora.distributed.gathered(module): ...`."
        )


# The floating dtype of each integer width: a layer prepared for FSDP2 holds its packed
# codes viewed as one (FSDP2 of torch 2.11 and older makes every sharded parameter
# require grad, which integer tensors cannot).
CODE_VIEW_DTYPES = {1: torch.float8_e4m3fn, 2: torch.float16, 4: torch.float32, 8: torch.float64}


def _integer_codes(base: HQQLinear, W_q: Tensor) -> Tensor:
    # Undoes register_quant_params' float view of packed codes; HQQ's own
    # view_as_float layers (and bitpack=False ones) are read as they always were.
    meta = base.meta
    if not W_q.is_floating_point() or meta["packing"] is None or meta.get("view_as_float"):
        return W_q
    dtype = meta.get("unpack_view_dtype", torch.uint8)
    if W_q.element_size() != dtype.itemsize:
        raise ValueError(
            f"Expected the layer's packed codes W_q viewed as a {dtype.itemsize}-byte float "
            f"(as hqqlora.distributed.register_quant_params left them), got {W_q.dtype}: "
            "they were cast (model.to(dtype), .half(), or an FSDP2 MixedPrecisionPolicy with "
            "param_dtype), which destroys them. Re-quantize, and cast nothing after "
            "register_quant_params or shard_quantized."
        )
    return W_q.detach().view(dtype)


def quant_tensors(base: HQQLinear) -> tuple[Tensor, Tensor, Tensor]:
    """``(W_q, scale, zero)`` of an ``HQQLinear``, on ``W_q``'s device.

    With ``offload_meta`` HQQ keeps scale and zero stacked in ``meta["zero_scale"]``
    (pinned on the host); they are moved to ``W_q``'s device here. A layer prepared
    for FSDP2 (:func:`holds_quant_params`) holds them as parameters, and its packed
    integer codes viewed as a float of the same width: ``W_q`` is given back in the
    integer dtype HQQ packed it in.

    Raises:
        ValueError: the tensors are FSDP2 shards (DTensors), not the whole layer's,
            or a prepared layer's codes were cast to another float dtype.
    """
    meta = base.meta
    W_q = base.W_q
    if holds_quant_params(base):
        _refuse_shards((W_q, base.scale, base.zero))
        return _integer_codes(base, W_q), base.scale, base.zero
    _refuse_shards((W_q,))
    if "zero_scale" in meta:
        zero_scale = meta["zero_scale"].to(device=W_q.device)
        return W_q, zero_scale[1], zero_scale[0]
    return W_q, meta["scale"], meta["zero"]


def unpack(W_q: Tensor, packing: str | None, dtype: torch.dtype) -> Tensor:
    """Unpacks HQQ's bit-packed codes, as a pure function.

    HQQ packs ``k`` codes of ``b`` bits along dim 0: packed row ``i`` holds rows
    ``i, i + n, ..., i + (k-1)·n`` of the codes, the first in the highest bits.

    Args:
        W_q: packed codes of shape ``(n, cols)``.
        packing: HQQ's packing name, or ``None`` for codes stored unpacked.
        dtype: dtype of the result.

    Returns:
        Codes of shape ``(k·n, cols)`` in ``dtype`` (before HQQ's 3-bit trim).
    """
    if packing is None:
        return W_q.to(dtype)
    bits, per = _PACKINGS[packing]
    if per == 1:
        return W_q.to(dtype)
    mask = (1 << bits) - 1
    parts = [(W_q >> (bits * (per - 1 - i))) & mask for i in range(per)]
    return torch.cat(parts, dim=0).to(dtype)


def dequantize(base: HQQLinear) -> Tensor:
    """Reconstructs the weight of an ``HQQLinear`` as a pure function of its tensors.

    Computes ``reshape((unpack(W_q) - zero) * scale, (out, in))`` in the layer's
    compute dtype, bit for bit what ``HQQLinear.dequantize`` returns, but with no
    writes to the layer, so ``torch.func`` transforms and ``torch.compile`` pass.
    In eager mode on CUDA (with Triton) it runs as one kernel, same bits.

    Args:
        base: a quantized ``HQQLinear``.

    Returns:
        Tensor of shape ``(out_features, in_features)`` in the compute dtype.
    """
    check_hqq_layer(base)
    layout = quant_layout(base)
    W_q, scale, zero = quant_tensors(base)
    if _triton.available(W_q) and layout.packing is not None and _eager():
        return _dequantize_triton(W_q, scale, zero, layout)
    return _dequantize(W_q, scale, zero, layout)


def _dequantize_triton(W_q: Tensor, scale: Tensor, zero: Tensor, layout: QuantLayout) -> Tensor:
    if layout.view_as_float:
        W_q = W_q.view(layout.unpack_view_dtype)
    return _triton.dequantize_cuda(W_q, scale, zero, layout)


def unpacked_codes(W_q: Tensor, layout: QuantLayout, dtype: torch.dtype) -> Tensor:
    """The codes of ``W_q`` in HQQ's grouped 2-D layout, in ``dtype``.

    Shape ``(num_groups, group_size)`` for ``axis=1``, ``(group_size, num_groups)``
    for ``axis=0`` (3-bit padding trimmed); scale and zero broadcast against it.
    """
    if layout.packing is not None and layout.view_as_float:
        W_q = W_q.view(layout.unpack_view_dtype)
    codes = unpack(W_q, layout.packing, dtype)
    if layout.packing is not None and layout.nbits == 3:
        rows = layout.group_size if layout.axis == 0 else layout.num_groups
        codes = codes[:rows]
    return codes


def _dequantize(W_q: Tensor, scale: Tensor, zero: Tensor, layout: QuantLayout) -> Tensor:
    W_r = unpacked_codes(W_q, layout, layout.compute_dtype)
    return ((W_r - zero) * scale).reshape(layout.shape)


def _eager() -> bool:
    """Plain eager mode: neither tracing by dynamo nor inside a ``torch.func`` transform."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is None


def base_forward(
    base: HQQLinear, x: Tensor, layout: QuantLayout | None = None, *, exact: bool = False
) -> Tensor:
    """The base layer's output ``x @ dequantize(base)ᵀ + bias``.

    ``x`` is cast to the layer's compute dtype, unless autocast is on for its
    device type. The path depends on the mode:

    - a decode step on CUDA (at most 16 tokens, bf16/fp16, no gradient wanted
      through ``x``), eager or compiled, unless ``exact``: one fused Triton kernel
      reads the packed codes once (no dense weight), accumulates exact products in
      float32 and applies each group's scale and zero to the partial sums, so it
      skips HQQ's two roundings of each weight: as close to the float64 product
      with HQQ's dequantized weight as the compute dtype allows, not HQQ's bits;
    - otherwise HQQ's bits: under ``torch.func`` transforms or ``torch.compile``,
      the pure :func:`dequantize` (HQQ's forward is an autograd.Function with no
      vmap/jvp rule that dynamo cannot trace either); in eager mode on CUDA with
      Triton, a one-kernel dequantization (HQQ's takes about ten launches) and the
      same matmul; otherwise the layer's own forward, or, for a layer prepared for
      FSDP2 (scale and zero held as parameters, which HQQ's forward does not read),
      the same operations purely.

    Args:
        base: a quantized ``HQQLinear``.
        x: array of shape ``(..., in_features)``.
        exact: HQQ's bits on every path (a dense weight is materialized).

    Returns:
        Tensor of shape ``(..., out_features)``.
    """
    layout = quant_layout(base) if layout is None else layout
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != layout.compute_dtype:
        x = x.to(layout.compute_dtype)
    W_q = base.W_q
    if not exact and _decode.eligible(x, W_q, layout, 16, base.bias):
        W_q, scale, zero = quant_tensors(base)
        return _decode.lora_decode(x, W_q, scale, zero, layout, bias=base.bias)
    if not _eager():
        return pure_forward(base, x, layout)
    if _triton.available(W_q) and layout.packing is not None:
        W_q, scale, zero = quant_tensors(base)
        out = torch.matmul(x, _dequantize_triton(W_q, scale, zero, layout).t())
        return out if base.bias is None else (out + base.bias).to(out.dtype)
    if holds_quant_params(base):  # HQQ's forward reads meta, which no longer holds them
        return pure_forward(base, x, layout)
    return call_unrouted(base, x)


def call_unrouted(base: HQQLinear, x: Tensor) -> Tensor:
    """``base(x)`` through HQQ's own forward, hooks included, never routed by hqqlora.

    A layer prepared for ``functional_call`` routes its calls; this runs the original
    forward instead: directly when the layer's own call is already under way (its
    hooks ran), else as ``base(x)`` so that its hooks run, as PEFT's shim calls it.
    """
    if getattr(type(base), "_hqqlora_unrouted", None) is None:
        return cast(Tensor, base(x))
    if STATE.running is base:
        return cast(Tensor, unrouted_class(base).forward(base, x))
    previous, STATE.bypass = STATE.bypass, base
    try:
        return cast(Tensor, base(x))
    finally:
        STATE.bypass = previous


def unrouted_class(module: object) -> type[Any]:
    """The class ``module`` had before :func:`~hqqlora.prepare_model` (its own class if never)."""
    return getattr(type(module), "_hqqlora_unrouted", None) or type(module)


def pure_forward(base: HQQLinear, x: Tensor, layout: QuantLayout | None = None) -> Tensor:
    """``x @ dequantize(base)ᵀ + bias`` from the layer's tensors alone (``x`` not cast).

    The same operations as HQQ's forward (matmul, then the bias added), hence the
    same bits, but traceable by ``torch.func`` and ``torch.compile``.
    """
    layout = quant_layout(base) if layout is None else layout
    W_q, scale, zero = quant_tensors(base)
    out = torch.matmul(x, _dequantize(W_q, scale, zero, layout).t())
    if base.bias is not None:
        out = (out + base.bias).to(out.dtype)  # as HQQ's in-place add, autocast included
    return out


def quant_config_of(base: HQQLinear) -> dict[str, Any]:
    """A deep copy of the layer's full quant config, ``offload_meta`` included."""
    return {**copy.deepcopy(base.quant_config), "offload_meta": bool(base.offload_meta)}


def quantize_like(weight: Tensor, base: HQQLinear, bias: Tensor | None) -> HQQLinear:
    """Quantizes ``weight`` into a new ``HQQLinear`` with ``base``'s settings.

    The new layer has ``base``'s quant config (nbits, group size, axis,
    ``offload_meta``...), compute dtype and device, and carries ``bias``
    (HQQ's ``quantize`` drops it). It is plain data: ``weight`` and ``bias`` are
    detached, so no autograd graph reaches the layer's tensors.
    """
    config = quant_config_of(base)
    layer = HQQLinear(None, config, compute_dtype=base.compute_dtype, device=base.device)
    config.pop("offload_meta")
    layer.quantize(weight.detach(), **config)
    if bias is not None:
        layer.bias = bias.detach().clone().to(device=layer.W_q.device, dtype=base.compute_dtype)
    return layer
