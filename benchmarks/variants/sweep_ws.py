"""Kernel-alone sweep of a Gluon kernel variant against the library's Gluon kernel (CUDA).

python benchmarks/variants/sweep_ws.py                      # gluon_ws.py
python benchmarks/variants/sweep_ws.py ROTATE=1             # its switches, NAME=VALUE
STAGES=3,4,6 python benchmarks/variants/sweep_ws.py PAIRS=True
VARIANT=gluon_pp python benchmarks/variants/sweep_ws.py     # gluon_pp.py

Per layer at 16 or 64 rows (the call's arguments captured from one mixed_batch_indexed
call), every launch of the variant (packed rows, K splits, warps, stages) timed once, then
the library's kernel at its tuned launch and at the variant's two best, and the variant's
four best, in alternating rounds (CUDA-graph µs, median of 3), with the error of the summed
partials against float64 and whether the variant's partials equal the library's bit for
bit at the same launch. Launches compile first in worker processes.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import importlib

import torch
import triton
import triton.testing
from bench_decode import adapter
from common import make_hqq_layer

import hqqlora
from hqqlora import _gluon

V = importlib.import_module(os.environ.get("VARIANT", "gluon_ws"))
PP = os.environ.get("VARIANT") == "gluon_pp"

LIB = _gluon.base_partials
CASES = [
    ((4096, 4096), 16),
    ((4096, 4096), 64),
    ((14336, 4096), 64),
    ((4096, 14336), 64),
    ((1024, 4096), 64),
]


def capture(layer, rows, in_f):
    x = torch.randn(rows, 1, in_f, device="cuda", dtype=torch.bfloat16)
    p = adapter(layer, seed=0)
    stacked = hqqlora.stack_adapters({"a": p})
    index = torch.zeros(rows, dtype=torch.int64, device="cuda")
    got = []

    def rec(*a, **k):
        got.append((a, dict(k)))
        return LIB(*a, **k)

    _gluon.base_partials = rec
    try:
        hqqlora.mixed_batch_indexed(x, stacked, index, base=layer)
    finally:
        _gluon.base_partials = LIB
    torch.cuda.synchronize()
    return got[0]


def configs(n_out, k_in, rows):
    steps = k_in // 64
    out = []
    for P, w in ((32, 4), (64, 4)) if PP else ((32, 4), (64, 4), (64, 8), (128, 8)):
        for split in (4, 8) if rows <= 16 else (2, 4, 8):
            for st in (
                (2, 4, 6)
                if PP
                else tuple(int(v) for v in os.environ.get("STAGES", "3,5").split(","))
            ):
                progs = n_out // 2 // P * split
                if (
                    steps % split
                    or steps // split < 2
                    or not 32 <= progs <= 1024
                    or (n_out // 2) % P
                ):
                    continue
                out.append((P, split, w, st))
    return out


def run(kernel, args, kw, cfg):
    P, split, w, st = cfg
    a = list(args)
    rows, n_out = a[0].shape[0], a[4][3]
    a[5] = torch.empty(split, rows, n_out, dtype=torch.float32, device="cuda")
    k = dict(
        kw,
        block_p=P,
        split=split,
        warps=w,
        stages=st,
        after_shrink=False,
        before_shrink=False,
        finish=None,
    )

    def fn():
        return kernel(*a, **k)

    return fn, a[5]


_STATE = {}


def _compile_one(task):
    case, cfg, sets = task
    for k, v in sets:
        setattr(V, k, v)
    (out_f, in_f), rows = CASES[case]
    if case not in _STATE:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        _STATE[case] = capture(layer, rows, in_f)
    args, kw = _STATE[case]
    fn, _ = run(V.base_partials, args, kw, cfg)
    try:
        fn()
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{cfg}: {type(e).__name__}: {str(e)[:300]}"


def precompile(sets):
    import multiprocessing as mp

    tasks = [(i, c, sets) for i, ((o, k), r) in enumerate(CASES) for c in configs(o, k, r)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(14) as pool:
        for msg in pool.imap_unordered(_compile_one, tasks):
            if msg:
                print("  compile:", msg, flush=True)
    print(f"precompiled {len(tasks)} in {time.time() - t0:.0f}s", flush=True)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for (out_f, in_f), rows in CASES:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        args, kw = capture(layer, rows, in_f)
        W = hqqlora.dequantize(layer).double()
        ref = args[0].double() @ W.T
        tuned = (kw["block_p"], kw["split"], kw["warps"], kw["stages"])
        res = {}
        t0 = time.time()
        for cfg in configs(out_f, in_f, rows):
            fn, ws = run(V.base_partials, args, kw, cfg)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as e:
                print(f"  ws {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            err = ((ws.double().sum(0) - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
            res[cfg] = (1e3 * ms, err)
        best = sorted(res, key=lambda c: res[c][0])[:4]
        print(
            f"{out_f}x{in_f} rows {rows}: tuned {tuned}; {len(res)} ws configs in {time.time() - t0:.0f}s",
            flush=True,
        )
        # Library at tuned and at ws's best; ws at both; alternate rounds.
        cands = (
            [("lib", tuned)]
            + ([] if PP else [("ws", tuned)])
            + [("lib", c) for c in best[:2]]
            + [("ws", c) for c in best]
        )
        cands = list(dict.fromkeys(cands))
        fns = {}
        for name, cfg in cands:
            fn, ws = run(LIB if name == "lib" else V.base_partials, args, kw, cfg)
            fn()
            torch.cuda.synchronize()
            fns[(name, cfg)] = (fn, ws)
        # bitwise: ws vs lib at the same config
        for cfg in {c for _, c in cands}:
            if ("lib", cfg) in fns and ("ws", cfg) in fns:
                same = torch.equal(fns[("lib", cfg)][1], fns[("ws", cfg)][1])
                print(f"  {cfg}: ws partials bitwise equal to lib's: {same}", flush=True)
        times = {c: [] for c in fns}
        for _ in range(3):
            for c, (fn, _) in fns.items():
                times[c].append(
                    1e3 * triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
                )
        for c in fns:
            err = ((fns[c][1].double().sum(0) - ref).norm() / ref.norm()).item()
            print(
                f"  {c[0]:3s} {c[1]}: {statistics.median(times[c]):6.2f} µs  err {err:.1e}",
                flush=True,
            )
        print(
            "  ws sweep:",
            ", ".join(f"{c}:{res[c][0]:.1f}" for c in sorted(res, key=lambda c: res[c][0])),
            flush=True,
        )


if __name__ == "__main__":
    sets = []
    for a in sys.argv[1:]:
        k, v = a.split("=")
        setattr(V, k, eval(v))
        sets.append((k, eval(v)))
    precompile(sets)
    main()
