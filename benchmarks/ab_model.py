"""A/B of a module-level switch of hqqlora._decode over the whole-model decode step (CUDA).

python benchmarks/ab_model.py --flag GATHER_FOLD 0 1

The 2-block Llama-3-8B-shaped step of ``bench_decode`` (64 sequences × 1 token, every
layer served from a bank of 64 float32 adapters of rank 16 through ``mixed_batch_indexed``)
with 1 and with 64 distinct adapters: one CUDA graph per value of the switch (the switch is
read when the kernels are launched, so at capture), replays alternated, wall µs of one
replay (median and range of the rounds).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_decode import adapter, decode_step, graphed, llama_layers, wall_us
from common import environment

import hqqlora
from hqqlora import _decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flag", required=True, help="a module-level name in hqqlora._decode")
    parser.add_argument("values", nargs="+", type=int, help="values to try")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(environment("cuda"))
    blocks = llama_layers(2)
    banks = [
        {
            n: hqqlora.stack_adapters({f"a{i}": adapter(layer, seed=i) for i in range(64)})
            for n, layer in blk.items()
        }
        for blk in blocks
    ]
    x = torch.randn(64, 1, 4096, device="cuda", dtype=torch.bfloat16)
    saved = getattr(_decode, args.flag)
    try:
        for distinct in (1, 64):
            index = (torch.arange(64, device="cuda") % distinct).to(torch.int64)

            def step(index=index):
                return decode_step(
                    x,
                    2,
                    lambda b, n, h: hqqlora.mixed_batch_indexed(
                        h, banks[b][n], index, base=blocks[b][n]
                    ),
                )

            replays = {}
            for value in args.values:
                setattr(_decode, args.flag, type(saved)(value))
                replays[value] = graphed(step)[0]
            times = {value: [] for value in replays}
            for _ in range(args.rounds):
                for value, replay in replays.items():
                    times[value].append(wall_us(replay))
            cells = ", ".join(
                f"{args.flag}={v} {statistics.median(t):.0f} ({min(t):.0f}–{max(t):.0f})"
                for v, t in times.items()
            )
            print(f"2-block step, {distinct} distinct adapter(s), µs: {cells}", flush=True)
    finally:
        setattr(_decode, args.flag, saved)


if __name__ == "__main__":
    main()
