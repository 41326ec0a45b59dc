"""A/B of a module-level switch of hqqlora._decode at the tuned configurations (CUDA).

python benchmarks/ab_decode.py --flag PREFETCH 0 1 2 --tokens 1 16 64 --bank 1
python benchmarks/ab_decode.py --flag TERM_FLOATS 8192 16384 --tokens 64 --bank 64
python benchmarks/ab_decode.py --flag FOLD_ONE 0 1 --tokens 16 64 --bank 1 --rounds 3

For each layer shape and row count: CUDA-graph time per call (µs, LoRA r=16 float32, one
adapter, or a bank read through an index) and the relative error against float64, at each
value of the switch, side by side in one run (``--rounds``: the values in turn, the median
of each). A switch that is also a TUNED field
(PREFETCH, the 8th) is set by dropping that field, so the module value applies.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import triton.testing
from common import environment, make_hqq_layer
from tune_decode import _adapters, _reference

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flag", required=True, help="a module-level name in hqqlora._decode")
    parser.add_argument("values", nargs="+", type=int, help="values to try")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--bank", type=int, default=0, help="a bank of N adapters, one per row")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=1, help="values in turn, the median")
    args = parser.parse_args()
    if args.rounds < 1 or len(set(args.values)) < len(args.values):
        parser.error("--rounds at least 1, and each value once")
    print(environment("cuda"))
    dtype = getattr(torch, args.dtype)
    saved = getattr(_decode, args.flag)
    head = " | ".join(f"{args.flag}={v} µs (err)" for v in args.values)
    print(f"| layer | rows | config | {head} |")
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        layer = make_hqq_layer(in_f, out_f, device="cuda", dtype=dtype)
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        per = layout.packing_bits[1]
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
            A, B, s, index = _adapters(in_f, out_f, 16, args.bank, tokens)
            ref = _reference(x, W, A, B, index)
            key = (out_f, in_f, per, tokens)
            tuned = _decode.TUNED.get(key)
            config = _decode.decode_config(out_f, in_f, per, 64, tokens)
            if args.flag == "PREFETCH" and len(config) > 7:
                _decode.TUNED[key] = config[:7]
            times = {value: [] for value in args.values}
            errs = {}
            for _, value in itertools.product(range(args.rounds), args.values):
                setattr(_decode, args.flag, type(saved)(value))

                def run(x=x, A=A, B=B, s=s, index=index):
                    return _decode.lora_decode(
                        x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
                    )

                errs[value] = ((run().double() - ref).norm() / ref.norm()).item()
                us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
                times[value].append(us)
            setattr(_decode, args.flag, saved)
            cells = [f"{statistics.median(times[v]):.1f} ({errs[v]:.1e})" for v in args.values]
            if tuned is not None:
                _decode.TUNED[key] = tuned
            print(f"| {out_f}x{in_f} | {tokens} | {config} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
