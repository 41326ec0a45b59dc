"""Where the time of a compiled decode step goes (CUDA): kernel times from torch.profiler.

python benchmarks/profile_decode.py --tokens 1
"""

from __future__ import annotations

import argparse

import torch
from common import environment, make_hqq_layer, profile_kernels, random_params

import hqqlora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print(environment("cuda"))
    layer = make_hqq_layer(args.size, args.size, device="cuda")
    params = random_params(layer, args.rank, dtype=torch.float32)
    x = torch.randn(args.tokens, args.size, device="cuda", dtype=torch.bfloat16)
    from bench_decode import gemlite_of

    gl = gemlite_of(layer)
    variants = {
        "gemlite base": lambda: gl(x),
        "HQQ base forward": lambda: layer(x),
        "ours eager LoRA": lambda: hqqlora.apply_lora(layer, params, x),
        "ours compiled LoRA": torch.compile(
            lambda: hqqlora.apply_lora(layer, params, x), fullgraph=True, dynamic=False
        ),
    }
    with torch.no_grad():
        for name, fn in variants.items():
            for _ in range(20):
                fn()
            profile_kernels(fn, name, calls=50, top=6)


if __name__ == "__main__":
    main()
