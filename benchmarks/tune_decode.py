"""Tries launch configurations of the fused decode kernel (CUDA) and prints the best.

python benchmarks/tune_decode.py
"""

from __future__ import annotations

import itertools

import torch
import triton.testing
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _triton
from hqqlora._base import quant_tensors


def main() -> None:
    print(environment("cuda"))
    layer = make_hqq_layer(4096, 4096, device="cuda")
    W_q, scale, zero = quant_tensors(layer)
    results = []
    for tokens in (1, 16):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ hqqlora.dequantize(layer).double().T).float()
        for config in itertools.product((16, 32, 64), (1, 2, 4), (4, 8, 16), (4,), (3,)):
            _triton.DECODE_CONFIG = config
            try:
                out = _triton._dequant_matmul_impl(x, W_q, scale, zero, [4, 2, 64, 4096, 4096])
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = triton.testing.do_bench(
                    lambda x=x: _triton._dequant_matmul_impl(x, W_q, scale, zero, [4, 2, 64, 4096, 4096]),
                    warmup=10, rep=40, return_mode="median",
                ) * 1e3  # fmt: skip
            except Exception as exc:  # a config that does not compile
                print(config, type(exc).__name__)
                continue
            results.append((tokens, us, config, err))
    for tokens in (1, 16):
        best = sorted(r for r in results if r[0] == tokens)[:5]
        for r in best:
            print(f"tokens {r[0]}: {r[1]:.1f} us  config {r[2]}  rel err {r[3]:.1e}")


if __name__ == "__main__":
    main()
