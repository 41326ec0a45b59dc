"""When each decode kernel runs, within one call replayed in a CUDA graph (CUDA).

python benchmarks/timeline_decode.py --bank 64 --tokens 64 --flag GATHER_SIDE 0 1

For each layer shape and value of a module-level switch of ``hqqlora._decode``: the graph
time per call (µs, ``do_bench_cudagraph``) and, from the profiler, each kernel's start and
end in the last of five replays, µs from its first kernel's start (LoRA r=16 float32, one
adapter or a bank read through an index, row i reading adapter i mod bank). Kernels that
overlap (programmatic dependent launch, a second stream) show as overlapping spans.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from bench_decode import graphed, profiled
from common import environment, make_hqq_layer
from tune_decode import _adapters

from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
REPLAYS = 5


def last_replay(replay):
    """The kernels of the last of REPLAYS calls of ``replay`` (a graph's): (name, start,
    end), µs from the first."""
    prof = profiled(replay, REPLAYS, warmup=20)
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA"),
        key=lambda e: e.time_range.start,
    )
    last = kernels[-(len(kernels) // REPLAYS) :]
    t0 = last[0].time_range.start
    return [(e.name, e.time_range.start - t0, e.time_range.end - t0) for e in last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flag", required=True, help="a module-level name in hqqlora._decode")
    parser.add_argument("values", nargs="+", type=int, help="values to try")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bank", type=int, default=0, help="a bank of N adapters, one per row")
    parser.add_argument("--shape", type=int, nargs=2, help="this (out, in) only")
    args = parser.parse_args()
    print(environment("cuda"))
    saved = getattr(_decode, args.flag)
    for out_f, in_f in [tuple(args.shape)] if args.shape else SHAPES:
        torch.manual_seed(0)
        layer = make_hqq_layer(in_f, out_f, device="cuda", dtype=torch.bfloat16)
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
        A, B, s, index = _adapters(in_f, out_f, 16, args.bank, args.tokens)

        def run(x=x, A=A, B=B, s=s, index=index, W_q=W_q, scale=scale, zero=zero, layout=layout):
            return _decode.lora_decode(
                x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
            )

        for value in args.values:
            setattr(_decode, args.flag, type(saved)(value))
            us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
            print(f"{out_f}x{in_f}, {args.tokens} rows, {args.flag}={value}: graph {us:.1f} µs")
            for name, start, end in last_replay(graphed(run)[0]):
                print(f"    {name[:40]:40s} {start:6.1f} – {end:6.1f}")
        setattr(_decode, args.flag, saved)


if __name__ == "__main__":
    main()
