"""Kernel times of one training step (forward + backward w.r.t. A and B), eager vs compiled.

python benchmarks/profile_train.py --tokens 4096
"""

from __future__ import annotations

import argparse

import torch
from common import environment, make_hqq_layer, profile_kernels, random_params

import hqqlora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print(environment("cuda"))
    layer = make_hqq_layer(args.size, args.size, device="cuda")
    params = random_params(layer, args.rank, dtype=torch.bfloat16)
    train = {k: v.detach().clone().requires_grad_(k != "scaling") for k, v in params.items()}
    leaves = [train["lora_A"], train["lora_B"]]
    x = torch.randn(args.tokens, args.size, device="cuda", dtype=torch.bfloat16)

    def fwd(p, xx):
        return hqqlora.apply_lora(layer, p, xx)

    compiled = torch.compile(fwd, fullgraph=True, dynamic=False)
    for name, f in (("eager", fwd), ("compiled", compiled)):

        def step(f=f):
            return torch.autograd.grad(f(train, x).float().square().mean(), leaves)

        for _ in range(10):
            step()
        profile_kernels(step, f"{name} training step", calls=20, top=10)


if __name__ == "__main__":
    main()
