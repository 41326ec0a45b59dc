"""How much of an adapter survives a merge, per method and bit width; LoftQ vs plain quantization.

Run: PYTHONPATH=. python benchmarks/merge_fidelity.py [--size 512] [--rank 16]

Prints two tables, with the device, dtypes, shapes and library versions:

1. ``merge_report`` figures (captured, rel_error) for a plain LoRA adapter merged
   by ``"requantize"`` and ``"same_grid"``, and for a group-constant adapter of the
   same size merged by ``"zero_point"``, at 2/3/4/8 bits.
2. ``‖W - (dequant(Q) + ΔW)‖ / ‖W‖`` of ``loftq`` against plain quantization's
   ``‖W - dequant(Q)‖ / ‖W‖`` at 2/3/4 bits.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

import hqqlora
from hqqlora import dequantize, init_lora, loftq, merge, merge_report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def gaussian_weight(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, size, generator=gen) / size**0.5


def quantized(weight, nbits, group_size, dtype, device):
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    return HQQLinear.from_weights(weight.clone(), None, config, compute_dtype=dtype, device=device)


def trained_like(base, rank, rel, *, group_constant, seed):
    """An adapter whose ΔW has rms ``rel`` times the weight's rms (a fine-tune's size)."""
    gen = torch.Generator().manual_seed(seed)
    p = init_lora(base, rank, 2 * rank, group_constant=group_constant, generator=gen)
    p["lora_B"] = torch.randn(p["lora_B"].shape, generator=gen)
    delta = hqqlora.delta_weight(p, in_features=p["lora_B"].shape[0])
    target = rel * dequantize(base).float().pow(2).mean().sqrt()
    p["lora_B"] = p["lora_B"] * (target / delta.pow(2).mean().sqrt())
    return p


def merge_table(size, rank, rel, group_size, device):
    print(
        f"\n## Merge fidelity: weight {size}x{size} (N(0, 1/{size})), group_size {group_size}, "
        f"LoRA r={rank}, rms(ΔW) = {rel:g}·rms(W)\n"
    )
    print("| dtype | bits | method | adapter | captured | rel_error | max|ΔW|/step | clamped |")
    print("|---|---|---|---|---|---|---|---|")
    weight = gaussian_weight(size, 0)
    for dtype_name, dtype in DTYPES.items():
        for nbits in (2, 3, 4, 8):
            base = quantized(weight, nbits, group_size, dtype, device)
            plain = trained_like(base, rank, rel, group_constant=False, seed=1)
            pooled = trained_like(base, rank, rel, group_constant=True, seed=1)
            rows = [
                ("requantize", "plain", plain),
                ("same_grid", "plain", plain),
                ("requantize", "group-constant", pooled),
                ("zero_point", "group-constant", pooled),
            ]
            for method, kind, params in rows:
                r = merge_report(base, params, merge(base, params, method=method, warn=False))
                print(
                    f"| {dtype_name} | {nbits} | {method} | {kind} | {r['captured']:.4f} | "
                    f"{r['rel_error']:.2e} | {r['step_ratio']:.3f} | {r['clamped']} |"
                )


def loftq_table(size, rank, group_size, num_iters, device):
    print(
        f"\n## LoftQ: weight {size}x{size} (N(0, 1/{size})), group_size {group_size}, "
        f"r={rank}, num_iters={num_iters}, compute dtype float32\n"
    )
    print("| bits | plain ‖W−Q‖/‖W‖ | LoftQ ‖W−(Q+ΔW)‖/‖W‖ | ratio |")
    print("|---|---|---|---|")
    weight = gaussian_weight(size, 0)
    norm = float(torch.linalg.norm(weight))
    for nbits in (2, 3, 4):
        config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        base = quantized(weight, nbits, group_size, torch.float32, device)
        plain = float(torch.linalg.norm(weight - dequantize(base).float().cpu())) / norm
        layer, params = loftq(
            weight,
            config,
            rank,
            2 * rank,
            compute_dtype=torch.float32,
            device=device,
            num_iters=num_iters,
        )
        fit = dequantize(layer).float() + hqqlora.delta_weight(params)
        err = float(torch.linalg.norm(weight - fit.cpu())) / norm
        print(f"| {nbits} | {plain:.4f} | {err:.4f} | {err / plain:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rel", type=float, default=0.02, help="rms(ΔW) / rms(W)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-iters", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import hqq

    print(
        f"device: {device_name()} | python {platform.python_version()} | torch {torch.__version__} "
        f"| hqq {getattr(hqq, '__version__', 'unknown')} | hqqlora {hqqlora.__version__}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merge_table(args.size, args.rank, args.rel, args.group_size, device)
        loftq_table(args.size, args.rank, args.group_size, args.num_iters, device)


if __name__ == "__main__":
    sys.exit(main())
