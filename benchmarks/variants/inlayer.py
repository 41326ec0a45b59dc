"""In-layer graph time and kernel timeline of MODE 8 launches (CUDA): the tuned entry
against other launches of the Gluon kernel.

python benchmarks/variants/inlayer.py

64 rows, LoRA r=16 float32, one adapter without an index (bank 0), a bank of one read
through an index (bank 1) or a bank of 64 (one adapter a row); per launch the CUDA-graph
µs and, from the profiler, each kernel's start and end in one replay.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
import triton.testing
from bench_decode import graphed
from common import make_hqq_layer
from timeline_decode import last_replay
from tune_decode import _adapters

from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

CASES = [
    ((4096, 14336), 1, [None, (64, 8, 4, 3), (64, 4, 4, 3)]),
    ((4096, 4096), 1, [None, (64, 4, 4, 3), (64, 8, 4, 3), (64, 8, 8, 3)]),
    ((14336, 4096), 1, [None, (64, 2, 4, 3), (64, 4, 4, 3)]),
    ((1024, 4096), 1, [None, (32, 8, 4, 3)]),
    ((4096, 4096), 0, [None, (64, 8, 4, 3)]),
    ((4096, 14336), 0, [None, (64, 8, 4, 3), (64, 4, 4, 3)]),
]


def main():
    rows = 64
    for (out_f, in_f), bank, entries in CASES:
        torch.manual_seed(0)
        layer = make_hqq_layer(in_f, out_f, device="cuda", dtype=torch.bfloat16)
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
        A, B, s, index = _adapters(in_f, out_f, 16, bank, rows)
        table = _decode.TUNED_GATHER if bank > 1 else _decode.TUNED_GLUON
        key = (out_f, in_f, rows)
        saved = table[key]

        def run():
            return _decode.lora_decode(
                x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
            )

        for entry in entries:
            table[key] = saved if entry is None else entry
            us = [
                1e3 * triton.testing.do_bench_cudagraph(run, rep=60, return_mode="median")
                for _ in range(3)
            ]
            print(
                f"{out_f}x{in_f} bank {bank}: {table[key]}{' (tuned)' if entry is None else ''}: graph {sorted(us)[1]:.1f} µs",
                flush=True,
            )
            for name, start, end in last_replay(graphed(run)[0]):
                print(f"    {name[:40]:40s} {start:6.1f} – {end:6.1f}")
        table[key] = saved


if __name__ == "__main__":
    main()
