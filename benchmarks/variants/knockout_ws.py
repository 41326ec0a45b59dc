"""Knockout timings of gluon_ws.py's kernel alone (CUDA; results wrong but for KO 0).

python benchmarks/variants/knockout_ws.py

Per layer and launch (PICK), CUDA-graph µs of the library's Gluon kernel ("lib") and of
gluon_ws's kernel with parts of its work taken out (KNOCKOUT: 1 no x copies, 2 no code
copies, 4 no dequantization, 16 the first step's zero and scale throughout; sums of these
take out several): what each part of the K loop costs.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import sweep_ws as S
import torch
import triton.testing
from common import make_hqq_layer

V = S.V
PICK = [
    ((4096, 4096), 16, (64, 8, 4, 3)),
    ((4096, 4096), 64, (64, 4, 4, 3)),
    ((4096, 4096), 64, (32, 4, 4, 3)),
    ((14336, 4096), 64, (64, 2, 4, 3)),
    ((4096, 14336), 64, (64, 8, 4, 3)),
    ((1024, 4096), 64, (32, 8, 4, 3)),
]
KOS = [0, 1, 2, 3, 4, 16, 20, 7]


def _one(task):
    i, ko = task
    (o, k), rows, cfg = PICK[i]
    V.KNOCKOUT = ko
    if i not in S._STATE:
        S._STATE[i] = S.capture(make_hqq_layer(k, o, device="cuda"), rows, k)
    args, kw = S._STATE[i]
    fn, _ = S.run(V.base_partials, args, kw, cfg)
    fn()
    torch.cuda.synchronize()


def main():
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(14) as pool:
        list(pool.imap_unordered(_one, [(i, ko) for i in range(len(PICK)) for ko in KOS]))
    print("| layer | rows | config | lib | " + " | ".join(f"KO {k}" for k in KOS) + " |")
    for (o, k), rows, cfg in PICK:
        args, kw = S.capture(make_hqq_layer(k, o, device="cuda"), rows, k)
        fns = {"lib": S.run(S.LIB, args, kw, cfg)[0]}
        for ko in KOS:
            V.KNOCKOUT = ko
            f0 = S.run(V.base_partials, args, kw, cfg)[0]

            def fn(ko=ko, f0=f0):
                V.KNOCKOUT = ko
                f0()

            fn()
            torch.cuda.synchronize()
            fns[ko] = fn
        V.KNOCKOUT = 0
        t = {n: [] for n in fns}
        for _ in range(3):
            for n, f in fns.items():
                t[n].append(
                    1e3 * triton.testing.do_bench_cudagraph(f, rep=30, return_mode="median")
                )
        print(
            f"| {o}x{k} | {rows} | {cfg} | "
            + " | ".join(f"{statistics.median(t[n]):.1f}" for n in fns)
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
