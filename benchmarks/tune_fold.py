"""In-layer sweep of the folded kernel's launches (``_decode.GATHER_FOLD``, TUNED_FOLD) (CUDA).

python benchmarks/tune_fold.py
python benchmarks/tune_fold.py --shape 4096 4096 --top 8
python benchmarks/tune_fold.py --rows 16 --bank 0

Per layer shape, 64 rows (``--rows``) over a bank of 64 float32 adapters of rank 16 (row i
reads adapter i), LoRA through ``_decode.lora_decode``: the CUDA-graph time per call (µs,
median of 3 rounds of ``do_bench_cudagraph``) and the relative error against float64, for
the library without the fold (its own rule, and with the adapter kernels on the main
stream, ``GATHER_SIDE`` 0) and for every launch of the folded kernel (packed rows a
program, K splits, stages) that divides the layer: each timed once, the best three again.
With ``--bank 0`` one adapter, no index, and ``--bank 1`` a bank of one read through an
index (``FOLD_ONE``, ``TUNED_FOLD_ONE``; without the fold: the shrink kernel beside the
Gluon kernel). Prints the ``--top`` fastest. Compiles every
launch first in worker processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics

import torch
import triton
import triton.testing
from common import environment, make_hqq_layer
from tune_decode import _adapters, _reference

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

SHAPES = [(4096, 4096), (4096, 14336), (1024, 4096), (14336, 4096)]
ROWS = 64
BANK = 64


def entries(out_f, in_f):
    """Folded launches that divide the layer (the shrink's two steps of 256 inputs divide a
    split's inputs; 32 to 1024 programs)."""
    steps = in_f // 64
    out = []
    for block_p in (32, 64):
        for split in (1, 2, 4, 8):
            for stages in (2, 3, 4):
                if steps % split or (in_f // split) % 512 or (out_f // 2) % block_p:
                    continue
                if 32 <= out_f // 2 // block_p * split <= 1024:
                    out.append((block_p, split, stages))
    return out


def setup(out_f, in_f):
    """The call to time and its float64 reference."""
    torch.manual_seed(0)
    layer = make_hqq_layer(in_f, out_f, device="cuda", dtype=torch.bfloat16)
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    x = torch.randn(ROWS, in_f, device="cuda", dtype=torch.bfloat16)
    A, B, s, index = _adapters(in_f, out_f, 16, BANK, ROWS)

    def run():
        return _decode.lora_decode(
            x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
        )

    return run, _reference(x, hqqlora.dequantize(layer).double(), A, B, index)


_RUNS = {}


def _table():
    # (A bank gathers above 16 rows only, and a bank of one never: FOLD_ONE's table.)
    gathered = BANK > 1 and ROWS > _decode.DOT_ROWS
    return _decode.TUNED_FOLD if gathered else _decode.TUNED_FOLD_ONE


def _compile(task):
    global ROWS, BANK
    shape, entry, ROWS, BANK = task
    if shape not in _RUNS:
        _RUNS[shape] = setup(*shape)[0]
    _decode.GATHER_SIDE = 0
    _table()[(*shape, ROWS)] = entry
    _RUNS[shape]()
    torch.cuda.synchronize()


def main() -> None:
    global ROWS, BANK
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=2, help="this (out, in) only")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--bank", type=int, default=BANK, help="0: one adapter, no index")
    args = parser.parse_args()
    if args.rows <= _decode.FINISH_ROWS or args.rows > _decode.MAX_ROWS:
        parser.error(f"--rows: the fold takes {_decode.FINISH_ROWS + 1}-{_decode.MAX_ROWS} rows")
    ROWS, BANK = args.rows, args.bank
    shapes = [tuple(args.shape)] if args.shape else SHAPES
    tasks = [(shape, e, ROWS, BANK) for shape in shapes for e in entries(*shape)]
    with multiprocessing.get_context("spawn").Pool(14) as pool:
        list(pool.imap_unordered(_compile, tasks))
    print(environment("cuda"))
    side, fold, one = _decode.GATHER_SIDE, _decode.GATHER_FOLD, _decode.FOLD_ONE
    table = _table()
    try:
        for shape in shapes:
            run, ref = setup(*shape)
            key = (*shape, ROWS)
            res = {}

            def timed(label, rounds=3, run=run, ref=ref, res=res):
                out = run()
                err = ((out.double() - ref).norm() / ref.norm()).item()
                us = [
                    1e3 * triton.testing.do_bench_cudagraph(run, rep=40, return_mode="median")
                    for _ in range(rounds)
                ]
                res[label] = (statistics.median(us), err)

            _decode.GATHER_SIDE, _decode.GATHER_FOLD, _decode.FOLD_ONE = side, False, False
            timed("no fold (the library's rule)")
            if table is _decode.TUNED_FOLD:
                _decode.GATHER_SIDE = 0
                timed("no fold, GATHER_SIDE 0")
            _decode.GATHER_FOLD = _decode.FOLD_ONE = True
            for entry in entries(*shape):
                table[key] = entry
                timed(entry, rounds=1)
            best = sorted((v[0], k) for k, v in res.items() if isinstance(k, tuple))[:3]
            for _, entry in best:
                table[key] = entry
                timed(entry)
            over = f"over a bank of {BANK}" if BANK else "of one adapter"
            print(f"{shape[0]}x{shape[1]}, {ROWS} rows {over}:", flush=True)
            for label, (us, err) in sorted(res.items(), key=lambda kv: kv[1][0])[: args.top]:
                name = f"fold {label}" if isinstance(label, tuple) else label
                print(f"    {name:30s} {us:6.1f} µs  err {err:.1e}", flush=True)
    finally:
        _decode.GATHER_SIDE, _decode.GATHER_FOLD, _decode.FOLD_ONE = side, fold, one


if __name__ == "__main__":
    main()
