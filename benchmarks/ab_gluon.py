"""A/B of variants of MODE 8's Gluon kernel against the library's own, in one process (CUDA).

python benchmarks/ab_gluon.py variant.py
python benchmarks/ab_gluon.py variant.py:AHEAD_NOW=[3] variant.py:AHEAD_NOW=[4] --no-model

A variant is a copy of ``hqqlora/_gluon.py`` with its kernel changed; ``path:NAME=VALUE``
sets module attributes of the copy (Python literals, ``;`` between several) so that one
file serves several variants. Each variant's ``base_partials`` stands in for the library's
while it runs, so every launch decision (tables, orders, the other kernels) stays the
library's. Printed: per layer and row count (LoRA r=16 float32, through
``mixed_batch_indexed``, one adapter or 64 rows of a bank of 64) the graph time
(``do_bench_cudagraph``, median of rounds that alternate the kernels) and the relative
error against float64; then a 2-block Llama-3-8B-shaped decode step of 64 sequences (one
graph replay, wall time) with one adapter and with 64. RESULTS.md, twelfth pass: its method,
and a control run with it (a copy at main's settings against main). Rows of a bank of
several adapters that ``_decode.GATHER_FOLD`` folds run ``hqqlora._gluon_fold``'s kernel,
not the variant's: set ``GATHER_FOLD`` off to time the variant there.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import statistics

import torch
import triton.testing
from bench_decode import adapter, decode_step, graphed, llama_layers, rel, wall_us
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _gluon

LAYERS = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
CASES = [(1, 1), (16, 1), (64, 1), (64, 64)]  # (rows, adapters in the bank)


def load_variant(spec: str, number: int):
    """``path[:NAME=VALUE;...]`` → the variant's ``base_partials``."""
    path, _, sets = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"gluon_variant_{number}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    for assignment in filter(None, sets.split(";")):
        name, _, value = assignment.partition("=")
        if not hasattr(module, name):
            raise ValueError(f"{path} has no attribute {name!r} to set")
        setattr(module, name, ast.literal_eval(value))
    return module.base_partials


def layer_rows(kernels, rounds):
    names = list(kernels)
    print("| layer | rows | adapters | " + " | ".join(f"{n} µs (err)" for n in names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for out_f, in_f in LAYERS:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        W = hqqlora.dequantize(layer).double()
        for rows, bank in CASES:
            x = torch.randn(rows, 1, in_f, device="cuda", dtype=torch.bfloat16)
            ads = [adapter(layer, seed=i) for i in range(bank)]
            stacked = hqqlora.stack_adapters({f"a{i}": p for i, p in enumerate(ads)})
            index = (torch.arange(rows, device="cuda") % bank).to(torch.int64)
            ref = torch.empty(rows, 1, out_f, dtype=torch.float64, device="cuda")
            for i in range(rows):
                p, xi = ads[int(index[i])], x[i, 0].double()
                t = xi @ p["lora_A"].double().T
                ref[i, 0] = xi @ W.T + float(p["scaling"]) * t @ p["lora_B"].double().T

            def fn(x=x, stacked=stacked, index=index, layer=layer):
                return hqqlora.mixed_batch_indexed(x, stacked, index, base=layer)

            errs, times = {}, {n: [] for n in names}
            for name in names:
                _gluon.base_partials = kernels[name]
                errs[name] = rel(fn(), ref)
            for _ in range(rounds):
                for name in names:
                    _gluon.base_partials = kernels[name]
                    ms = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
                    times[name].append(1e3 * ms)
            cells = " | ".join(f"{statistics.median(times[n]):.1f} ({errs[n]:.1e})" for n in names)
            print(f"| {out_f}×{in_f} | {rows} | {bank} | {cells} |", flush=True)


def model_step(kernels, rounds):
    blocks = llama_layers(2)
    banks = [
        {
            n: hqqlora.stack_adapters({f"a{i}": adapter(layer, seed=i) for i in range(64)})
            for n, layer in blk.items()
        }
        for blk in blocks
    ]
    x = torch.randn(64, 1, 4096, device="cuda", dtype=torch.bfloat16)

    def step(index):
        return decode_step(
            x,
            2,
            lambda b, n, h: hqqlora.mixed_batch_indexed(h, banks[b][n], index, base=blocks[b][n]),
        )

    for distinct in (1, 64):
        index = (torch.arange(64, device="cuda") % distinct).to(torch.int64)
        replays, times = {}, {n: [] for n in kernels}
        for name, kernel in kernels.items():
            _gluon.base_partials = kernel
            replays[name] = graphed(lambda index=index: step(index))[0]
        for _ in range(rounds):
            for name in kernels:
                times[name].append(wall_us(replays[name]))
        cells = ", ".join(f"{n} {statistics.median(t):.0f}" for n, t in times.items())
        spread = ", ".join(f"{n} {min(t):.0f}–{max(t):.0f}" for n, t in times.items())
        print(f"2-block step, {distinct} distinct adapter(s), µs: {cells} (rounds: {spread})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variants", nargs="+", help="path[:NAME=VALUE;...] of a _gluon.py copy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-model", action="store_true", help="layers only")
    args = parser.parse_args()
    if not (_gluon.AVAILABLE and torch.cuda.is_available()):
        raise SystemExit("ab_gluon.py needs a CUDA GPU and Triton with Gluon")
    print(environment("cuda"))
    kernels = {"main": _gluon.base_partials}
    for number, spec in enumerate(args.variants, 1):
        kernels[f"v{number}"] = load_variant(spec, number)
        print(f"v{number}: {spec}")
    try:
        layer_rows(kernels, args.rounds)
        if not args.no_model:
            model_step(kernels, args.rounds + 1)
    finally:
        _gluon.base_partials = kernels["main"]


if __name__ == "__main__":
    main()
