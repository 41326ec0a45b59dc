"""Shared test helpers: small HQQ layers, the float64 dense reference, tolerances."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from hqqlora import dequantize

BITS = (1, 2, 3, 4, 8)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Relative tolerance (to the output's scale) of a result computed in `dtype` against the
# float64 reference. Both see the same input bits (x, dequantize(W) in the compute dtype, the
# adapter leaves), so only the computation's roundings differ. A rounding to `dtype` is off by
# at most u·|value|, u = 2^-p the unit roundoff (half of torch.finfo(dtype).eps: bf16 2^-8,
# fp16 2^-11, fp32 2^-24, fp64 2^-53). An output element goes through at most 4 roundings at
# its own scale (the matmul, + bias, + the adapter term; DoRA's c ⊙ (...)): 4u. bf16/fp16
# matmuls accumulate in float32 (CPU and CUDA) and round once; float32/float64 ones round at
# every step of the sum over `in` features, a random walk of ~√in·u: √512 covers every layer
# the tests build (≤ 512 wide).
_ROUNDINGS = 4
_WIDEST = 512
RTOL = {
    torch.bfloat16: _ROUNDINGS * 2**-8,  # 1.6e-2
    torch.float16: _ROUNDINGS * 2**-11,  # 2.0e-3
    torch.float32: _ROUNDINGS * 2**-24 * _WIDEST**0.5,  # 5.4e-6
    torch.float64: _ROUNDINGS * 2**-53 * _WIDEST**0.5,  # 1.0e-14
}


def make_layer(
    in_features: int = 64,
    out_features: int = 48,
    *,
    nbits: int = 4,
    group_size: int = 16,
    axis: int = 1,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    seed: int = 0,
) -> HQQLinear:
    """A freshly quantized HQQLinear on the CPU, deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(
            torch.randn(out_features, in_features, generator=gen) / in_features**0.5
        )
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen) * 0.1)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)
    return HQQLinear(linear, config, compute_dtype=dtype, device="cpu")


def random_adapter(
    layer: HQQLinear,
    r: int = 4,
    *,
    scaling: float = 2.0,
    dora: bool = False,
    seed: int = 1,
    dtype=torch.float32,
):
    """An adapter with random A and B (so it is not a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = layer.meta["shape"]
    p = {
        "lora_A": (torch.randn(r, in_features, generator=gen) / in_features**0.5).to(dtype),
        "lora_B": (torch.randn(out_features, r, generator=gen) * 0.1).to(dtype),
        "scaling": torch.tensor(scaling),
    }
    if dora:
        p["magnitude"] = (1.0 + 0.2 * torch.rand(out_features, generator=gen)).to(dtype)
    return p


def dense_reference(layer: HQQLinear, params, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in float64: x @ (W + ΔW)ᵀ + b, DoRA as c ⊙ (...) ."""
    W = dequantize(layer).double()
    adapters = [params] if isinstance(params, dict) else list(params)
    x = x.double()
    y = x @ W.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    bias = 0.0 if layer.bias is None else layer.bias.double()
    # PEFT's forward for several active adapters (peft/tuners/lora/dora.py,
    # DoraLinearLayer.forward with base_result = the running output):
    #   y_k = y_{k-1} + (c_k - 1)(y_{k-1} - bias) + c_k s_k x Aᵀ Bᵀ,  c_k = m_k / ‖W + s_k B_k A_k‖.
    for p in adapters:
        A, B, s = p["lora_A"].double(), p["lora_B"].double(), p["scaling"].double()
        lora = s * (x @ A.T @ B.T)
        if "magnitude" in p:
            n = torch.linalg.norm(W + s * B @ A, dim=1)
            c = p["magnitude"].double() / n
            y = y + (c - 1) * (y - bias) + c * lora
        else:
            y = y + lora
    return y


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0
):
    """|actual - expected| ≤ rtol(dtype)·factor·max|expected| elementwise."""
    scale = expected.abs().max().item() + 1e-12
    err = (actual.double() - expected.double()).abs().max().item()
    tol = RTOL[dtype] * factor * scale
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e} ({dtype})"


TF32_DOTS = textwrap.dedent(
    r"""
    import numpy as np
    import torch
    from triton._C.libtriton import ir as _ir
    from triton.runtime import interpreter as _interp

    _real_dot = _interp.InterpreterBuilder.create_dot

    def _tf32(a):
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or input_precision == _ir.INPUT_PRECISION.IEEE:
            return _real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        ha, hb = _tf32(a.data), _tf32(b.data)
        prod = np.matmul(ha, hb)
        if input_precision == _ir.INPUT_PRECISION.TF32x3:
            la, lb = _tf32(a.data - ha), _tf32(b.data - hb)
            prod = np.matmul(la, hb) + np.matmul(ha, lb) + prod
        return _interp.TensorHandle((prod + d.data).astype(np.float32), d.dtype.scalar)

    _interp.InterpreterBuilder.create_dot = _create_dot
    """
)
"""A prelude for :func:`interpret` scripts: the interpreter computes every ``tl.dot`` in
float32 whatever its ``input_precision``; after this it rounds as a GPU does (TF32:
10-bit mantissas; TF32x3: a TF32 head and tail of each operand, three products), so a
kernel that asked for plain TF32 loses precision here as it would on a GPU."""


def interpret(script: str) -> None:
    """Runs ``script`` in a subprocess with Triton's interpreter on (``TRITON_INTERPRET=1``
    must be set before the kernels are defined), from the repository root; asserts it
    succeeds."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def cuda_layer(nbits, dtype, *, bias=True, size=(256, 512), group=64, axis=1, device="cuda"):
    """An HQQ layer of ``size`` (out, in) with weights seeded by ``nbits``, on ``device``."""
    gen = torch.Generator().manual_seed(nbits)
    out_features, in_features = size
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(
            torch.randn(out_features, in_features, generator=gen) / in_features**0.5
        )
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=axis)
    return HQQLinear(linear, config, compute_dtype=dtype, device=device)
