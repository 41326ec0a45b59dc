"""Kernels alone (no adapter terms, no sums): the folded kernel (hqqlora._gluon_fold) against
the warp-specialized base kernel of gluon_ws.py and the library's _bank_shrink_kernel (CUDA).

python benchmarks/variants/fold_alone.py
python benchmarks/variants/fold_alone.py SWARPS=8 SREGS=96

64 rows over a bank of 64 float32 adapters of rank 16 (row i reads adapter i), bf16 x. Per
layer and launch (packed rows a program, K splits, stages), CUDA-graph µs (median of 3
rounds): gluon_ws's base kernel ("ws base"), the folded kernel with its shrink partition
idle (no rows: "fold, no shrink") and working ("fold"), the bank's shrink kernel at the
library's launch ("bank shrink"), and the sum of the first and the last; whether the folded
kernel's partials equal gluon_ws's bit for bit, and t's error against float64.
``NAME=VALUE`` sets hqqlora._gluon_fold's module attributes (SWARPS, SREGS, SHRINK_FLOATS,
MAXNREG).
"""

import ast
import os
import statistics
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]
import gluon_ws
import torch
import triton
import triton.testing
from common import make_hqq_layer

from hqqlora import _decode, _gluon_fold
from hqqlora._base import quant_tensors

CASES = [
    ((4096, 4096), (64, 4, 3)),
    ((4096, 4096), (64, 4, 4)),
    ((14336, 4096), (64, 2, 3)),
    ((4096, 14336), (64, 4, 3)),
    ((1024, 4096), (64, 8, 3)),
    ((1024, 4096), (32, 8, 3)),
]
ROWS = 64


def bench(fns, rounds=3):
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            times[n].append(
                1e3 * triton.testing.do_bench_cudagraph(f, rep=40, return_mode="median")
            )
    return {n: statistics.median(v) for n, v in times.items()}


def main():
    for assignment in sys.argv[1:]:
        name, _, value = assignment.partition("=")
        setattr(_gluon_fold, name, ast.literal_eval(value))
    print(torch.cuda.get_device_name(), {n: getattr(_gluon_fold, n) for n in
          ("SWARPS", "SREGS", "SHRINK_FLOATS", "MAXNREG")}, flush=True)  # fmt: skip
    for (out_f, in_f), (block_p, split, stages) in CASES:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        W_q, scale, zero = quant_tensors(layer)
        W_q = W_q.reshape(out_f // 2, in_f)
        scale, zero = scale.reshape(out_f, in_f // 64), zero.reshape(out_f, in_f // 64)
        meta = [4, 2, 64, out_f, in_f]
        x = torch.randn(ROWS, in_f, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(64, 16, in_f, device="cuda") / in_f**0.5
        index = torch.arange(ROWS, device="cuda") % 64
        none = torch.full_like(index, -1)  # no row reads an adapter: the shrink stores zeros
        ws_ws, ws_fold = (torch.empty(split, ROWS, out_f, device="cuda") for _ in range(2))
        t = torch.zeros(split, ROWS, 16, device="cuda")
        grid, args, kwargs = gluon_ws.launch_args(
            x, W_q, scale, zero, meta, ws_ws, block_p=block_p, split=split, warps=4,
            stages=stages, after_shrink=False, before_shrink=False,
        )  # fmt: skip

        def ws_base(grid=grid, args=args, kwargs=kwargs):
            gluon_ws._ws_kernel[grid](*args, **kwargs)

        def fold(ws=ws_fold, t=t, index=index, cfg=(block_p, split, stages)):
            _gluon_fold.fold_partials(
                x, W_q, scale, zero, meta, ws, A, index, t, block_p=cfg[0], split=cfg[1],
                stages=cfg[2], block_r=16, launch_dependents=False,
            )  # fmt: skip

        t_idle = torch.empty_like(t)
        ws_idle = torch.empty_like(ws_fold)
        r_per = 1
        while r_per < 16 and ROWS * triton.cdiv(16, r_per) > _decode.BANK_SHRINK_PROGRAMS:
            r_per *= 2
        t_bank = torch.empty(ROWS * 16, device="cuda")
        counts = torch.zeros(1, dtype=torch.int32, device="cuda")

        def bank(r_per=r_per):
            _decode._bank_shrink_kernel[(ROWS, triton.cdiv(16, r_per))](
                x, A, index, t_bank, counts, 0, in_f, 16, A.stride(0), 64, R_PER=r_per,
                BLOCK_R=16, BLOCK_K=min(triton.next_power_of_2(in_f),
                                        max(128, _decode.BANK_SHRINK_FLOATS // r_per)),
                USE_PDL=False, num_warps=4,
            )  # fmt: skip

        fns = {
            "ws base": ws_base,
            "fold, no shrink": lambda: fold(ws=ws_idle, t=t_idle, index=none),
            "fold": fold,
            "bank shrink": bank,
        }
        for f in fns.values():
            f()
        torch.cuda.synchronize()
        ref = torch.einsum("mk,mrk->mr", x.double(), A[index].double())
        t_err = ((t.double().sum(0) - ref).norm() / ref.norm()).item()
        times = bench(fns)
        print(
            f"{out_f}x{in_f} {(block_p, split, stages)}: partials equal "
            f"{torch.equal(ws_ws, ws_fold)}, t err {t_err:.1e}; "
            + ", ".join(f"{n} {v:.1f}" for n, v in times.items())
            + f"; ws base + bank shrink {times['ws base'] + times['bank shrink']:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
