"""Per-call host overhead of ``apply_lora`` over the base forward, on the CPU (issue 11, item 6).

A 64x64 4-bit group-64 float32 HQQ layer, x of 4x64 float32, one LoRA r=16 float32
adapter, one thread: the layer is so small that the time is the Python and dispatch
work of each call. Measured: ``hqqlora.base_forward(layer, x)``, ``apply_lora(layer,
p, x)`` (and with a held DoRA ``weight_norm``), and PEFT's ``HqqLoraLinear(x)`` on the
same layer and tensors, in rounds of ``--calls`` calls each, interleaved so that every
round sees the same load; the overhead is ``apply_lora - base_forward`` per round,
reported as the median over ``--rounds`` rounds (and as the difference of the fastest
rounds), under ``torch.no_grad`` and with autograd on. The machine this project runs on
is shared: repeat, and read the medians.

    python benchmarks/bench_overhead.py            # one thread, 2000 calls x 15 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import environment, make_hqq_layer, peft_module, print_table, random_params

import hqqlora


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, r = args.size, args.rank
    layer = make_hqq_layer(size, size, nbits=4, group_size=64, dtype=torch.float32)
    lora = random_params(layer, r, dtype=torch.float32, seed=1)
    dora = random_params(layer, r, dtype=torch.float32, seed=2, dora=True)
    norm = hqqlora.dora_weight_norm(layer, dora)
    peft = peft_module(layer, lora, r=r, lora_alpha=2 * r)
    x = torch.randn(args.tokens, size)
    fns = {
        "base_forward": lambda: hqqlora.base_forward(layer, x),
        "apply_lora LoRA": lambda: hqqlora.apply_lora(layer, lora, x),
        "apply_lora DoRA (held norm)": lambda: hqqlora.apply_lora(layer, dora, x, weight_norm=norm),
        "PEFT HqqLoraLinear": lambda: peft(x),
    }
    env = environment("cpu")
    print(env)
    rows = []
    for label, ctx in (("no_grad", torch.no_grad), ("autograd on", contextlib.nullcontext)):
        with ctx():
            for fn in fns.values():
                per_call_us(fn, 200)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(per_call_us(fn, args.calls))
        base = times["base_forward"]
        for name, t in times.items():
            over = [a - b for a, b in zip(t, base, strict=True)]
            rows.append(
                [
                    label,
                    name,
                    statistics.median(t),
                    "" if name == "base_forward" else statistics.median(over),
                    "" if name == "base_forward" else min(t) - min(base),
                ]
            )
    text = f"{env}\n\nlayer {size}x{size}, 4-bit, group 64, float32; x {args.tokens}x{size} float32; r={r} float32 adapters; {args.threads} thread(s); median over {args.rounds} rounds of {args.calls} calls\n\n"
    text += print_table(
        "Per-call time and overhead over hqqlora.base_forward (µs)",
        ["mode", "call", "time per call", "overhead (median)", "overhead (fastest rounds)"],
        rows,
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
