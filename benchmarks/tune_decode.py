"""Tries launch configurations of the decode kernels (CUDA) and prints the best per shape.

python benchmarks/tune_decode.py            # prints a dict to paste into hqqlora/_decode.py TUNED

Each configuration is checked against the float64 product before it is timed.
"""

from __future__ import annotations

import itertools

import torch
import triton.testing
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TOKENS = [1, 16, 64]


def tune(shapes=SHAPES, tokens_list=TOKENS, rank=16, verbose=True):
    """Best ``(block_p, gps, split, warps, stages)`` per ``(out, in, per, tokens)``, with LoRA."""
    best = {}
    for out_f, in_f in shapes:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        A = torch.randn(rank, in_f, device="cuda") / in_f**0.5
        B = torch.randn(out_f, rank, device="cuda") * 0.01
        s = torch.ones(1, device="cuda")
        _, per = layout.packing_bits
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ W.T + (x.double() @ A.double().T) @ B.double().T
            key = (out_f, in_f, per, tokens)
            results = []
            for config in itertools.product(
                (8, 16, 32) if tokens > 16 else (16, 32, 64, 128),
                (1,),
                (1, 2, 4, 8, 16),
                (4,),
                (2, 4),
            ):
                _decode.TUNED[key] = config

                def run(x=x):
                    return _decode.lora_decode(
                        x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s
                    )

                try:
                    err = ((run().double() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"{key} {config}: wrong result (rel err {err:.1e})")
                        continue
                    # A CUDA graph of the call: kernel time without the host's launch time.
                    us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
                except Exception as exc:  # a configuration that does not compile or fit
                    print(f"{key} {config}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                results.append((us, config))
            del _decode.TUNED[key]
            if results:
                results.sort()
                best[key] = results[0][1]
                if verbose:
                    print(
                        f"{key}: best {results[0][0]:.1f} us {results[0][1]}; next {results[1:3]}"
                    )
    return best


def main() -> None:
    print(environment("cuda"))
    best = tune()
    print("TUNED = {")
    for key, config in sorted(best.items()):
        print(f"    {key}: {config},")
    print("}")


if __name__ == "__main__":
    main()
