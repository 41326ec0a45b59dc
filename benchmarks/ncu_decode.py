"""Nsight Compute's view of the decode kernels next to gemlite's (CUDA): run under ``ncu``.

ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats python benchmarks/ncu_decode.py

Each variant runs a few times first (compilation, autotuning), then once between
``cudaProfilerStart``/``Stop``, so ncu sees one call of each: ours (one float32 adapter,
r=16: the shrink and the main kernel) and gemlite's base, at 1 and 16 tokens, on 4096² and
14336×4096.
"""

from __future__ import annotations

import torch
from bench_decode import adapter, gemlite_of
from common import environment, make_hqq_layer

import hqqlora


def main() -> None:
    print(environment("cuda"))
    cases = []
    for out_f, in_f in ((4096, 4096), (14336, 4096)):
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        p = adapter(layer)
        gl = gemlite_of(layer)
        for tokens in (1, 16):
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            cases.append(
                (
                    f"{out_f}x{in_f} {tokens} ours",
                    lambda x=x, p=p, lay=layer: hqqlora.apply_lora(lay, p, x),
                )
            )
            if gl is not None:
                cases.append((f"{out_f}x{in_f} {tokens} gemlite", lambda x=x, gl=gl: gl(x)))
    with torch.no_grad():
        for _, fn in cases:
            for _ in range(5):
                fn()
        torch.cuda.synchronize()
        for name, fn in cases:
            torch.cuda.nvtx.range_push(name)
            torch.cuda.cudart().cudaProfilerStart()
            fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            torch.cuda.nvtx.range_pop()
            print("ran", name, flush=True)


if __name__ == "__main__":
    main()
