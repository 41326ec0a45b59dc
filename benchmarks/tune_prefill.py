"""Tries launch configurations of the prefill kernels (CUDA) and prints each one's GPU time.

    python benchmarks/tune_prefill.py [--shapes 4096x4096,14336x4096] [--rows 64] [--tokens 128]

A mixed-adapter prefill (``--rows`` sequences of ``--tokens`` tokens, one float32 r=16
adapter each, 4-bit group 64, bf16) through ``mixed_batch_indexed``: each configuration of
``hqqlora._prefill.prefill_config`` is checked against the float64 product, then timed
by the profiler (sum of kernel times per call), next to HQQ's base forward alone.
Paste the best into ``hqqlora/_prefill.py`` ``TUNED``.
"""

from __future__ import annotations

import argparse

import torch
from bench_decode import gpu_us, kernel_us, rel
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _prefill

# (shrink: tokens, rank tile, inputs a step, warps, stages; expand: tokens, outputs, warps, stages)
GRID = [
    (st, 16, bk, sw, ss, et, bn, ew, es)
    for st in (32, 64)
    for bk in (64, 128)
    for sw, ss in ((4, 3), (4, 4))
    for et, bn, ew, es in ((64, 128, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (32, 128, 4, 2))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(environment("cuda"))
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        adapters = {}
        for i in range(args.rows):
            g = torch.Generator(device="cuda").manual_seed(i)
            adapters[f"a{i}"] = {
                "lora_A": torch.randn(16, in_f, device="cuda", generator=g) / in_f**0.5,
                "lora_B": torch.randn(out_f, 16, device="cuda", generator=g) * 0.01,
                "scaling": torch.tensor(2.0, device="cuda"),
            }
        bank = hqqlora.stack_adapters(adapters)
        index = torch.arange(args.rows, device="cuda") % len(adapters)
        x = torch.randn(args.rows, args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
        W = hqqlora.dequantize(layer).double()
        x64 = x.double()
        A64, B64 = bank.lora_A.double(), bank.lora_B.double()
        ref = x64 @ W.T + 2.0 * torch.einsum("btk,brk,bor->bto", x64, A64[index], B64[index])
        with torch.no_grad():
            base = gpu_us(lambda: layer(x), calls=5)
            key = (args.tokens, 16, in_f, out_f)
            default = _prefill.prefill_config(*key)
            results = []
            for config in [default, *GRID]:
                _prefill.TUNED[key] = config

                def run():
                    return hqqlora.mixed_batch_indexed(x, bank, index, base=layer)

                try:
                    err = rel(run(), ref)
                    if not err < 1e-2:
                        print(f"{shape} {config}: wrong result (rel err {err:.1e})")
                        continue
                    us = gpu_us(run, calls=5)
                except Exception as exc:  # a configuration that does not compile or fit
                    print(f"{shape} {config}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                results.append((us, config, err))
            _prefill.TUNED.pop(key, None)
        results.sort()
        print(f"{shape}, {args.rows}×{args.tokens} tokens: HQQ base {base:.1f} µs GPU")
        for us, config, err in results[:8]:
            print(f"    {us:.1f} µs ({us / base:.3f}× base) rel err {err:.1e} {config}")
        if results:
            _prefill.TUNED[key] = results[0][1]
            per_kernel = kernel_us(
                lambda: hqqlora.mixed_batch_indexed(x, bank, index, base=layer), 5
            )
            print("    best, per kernel:", {k[:28]: round(v, 1) for k, v in per_kernel.items()})
            print(f"    default {default}: {[r[0] for r in results if r[1] == default]}")


if __name__ == "__main__":
    main()
