"""Tries launch configurations of the decode kernels (CUDA) and prints the best per shape.

python benchmarks/tune_decode.py            # prints a dict to paste into hqqlora/_decode.py TUNED

Each configuration is checked against the float64 product before it is timed.
"""

from __future__ import annotations

import torch
import triton.testing
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TOKENS = [1, 16, 64]


def candidates(tokens, in_f, explore=False):
    """Configurations to try: MODE 4 (CUDA-core GEMV) at one row, MODE 3 (tensor cores,
    exponent-trick codes) above, a few of the older modes for comparison."""
    steps = in_f // 64
    if tokens == 1:
        grid = [(b, g, sp, w, st) for b in (16, 32, 64) for g in (2, 4, 8) for sp in (8, 16, 32)
                for w in (2, 4, 8) for st in (1,)] if explore else [
            (b, g, sp, w, st) for b in (8, 16, 32) for g in (1, 4) for sp in (8, 16, 64)
            for w in (2, 4) for st in (1, 3)]  # fmt: skip
        configs = [(*c, 4) for c in grid if c[1] * c[2] <= steps]
        if not explore:
            configs += [(b, 1, sp, 4, st, 3) for b in (32, 64) for sp in (4, 8) for st in (2, 3)]
        return configs
    if explore:
        configs = [(b, 1, sp, w, st, 5) for b in (32, 64, 128) for sp in (4, 8, 16)
                   for w in (4, 8) for st in (3, 4)]  # fmt: skip
        configs += [(b, 1, sp, 4, st, 3) for b in (64, 128) for sp in (4, 8) for st in (3, 4)]
        return [c for c in configs if c[2] <= steps]
    grid = [(b, g, sp, 4, st) for b in (16, 32, 64) for g in (1, 2) for sp in (2, 4, 8)
            for st in (2, 3)]  # fmt: skip
    configs = [(*c, 3) for c in grid if c[1] * c[2] <= steps]
    configs += [(b, 1, sp, 4, 3, 0) for b in (32, 64) for sp in (4, 8)]
    return configs


def tune(shapes=SHAPES, tokens_list=TOKENS, rank=16, verbose=True, explore=False):
    """Best ``(block_p, gps, split, warps, stages)`` per ``(out, in, per, tokens)``, with LoRA."""
    best = {}
    for out_f, in_f in shapes:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        A = torch.randn(rank, in_f, device="cuda") / in_f**0.5
        B = torch.randn(out_f, rank, device="cuda") * 0.01
        s = torch.ones(1, device="cuda")
        _, per = layout.packing_bits
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ W.T + (x.double() @ A.double().T) @ B.double().T
            key = (out_f, in_f, per, tokens)
            results = []
            configs = candidates(tokens, in_f, explore)
            if key in _decode.TUNED:
                configs.append(_decode.TUNED[key])
            saved = _decode.TUNED.pop(key, None)
            configs.append(_decode.decode_config(out_f, in_f, per, 64, tokens))
            for config in configs:
                _decode.TUNED[key] = config

                def run(x=x):
                    return _decode.lora_decode(
                        x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s
                    )

                try:
                    err = ((run().double() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"{key} {config}: wrong result (rel err {err:.1e})")
                        continue
                    # A CUDA graph of the call: kernel time without the host's launch time.
                    us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
                except Exception as exc:  # a configuration that does not compile or fit
                    print(f"{key} {config}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                results.append((us, config))
            _decode.TUNED.pop(key, None)
            if saved is not None:
                _decode.TUNED[key] = saved
            if results:
                results.sort()
                best[key] = results[0][1]
                if verbose:
                    print(f"{key}: best {results[0][0]:.1f} us {results[0][1]}")
                    for mode in sorted({c[-1] for _, c in results}):
                        top = [(round(us, 1), c) for us, c in results if c[-1] == mode][:3]
                        print(f"    MODE {mode}: {top}")
    return best


def kernel_table(fn):
    """Each kernel's GPU time per call (µs, names cut short), from the profiler."""
    from bench_decode import kernel_us

    return {name[:24]: round(us, 2) for name, us in kernel_us(fn).items()}


def profile_best(shapes, tokens_list):
    """GPU time (profiler) of gemlite's base and of our LoRA layer, with the tuned configs."""
    from bench_decode import gemlite_of, gpu_us, rel

    for out_f, in_f in shapes:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        gl = gemlite_of(layer)
        A = torch.randn(16, in_f, device="cuda") / in_f**0.5
        B = torch.randn(out_f, 16, device="cuda") * 0.01
        p = {"lora_A": A, "lora_B": B, "scaling": torch.tensor(1.0, device="cuda")}
        W = hqqlora.dequantize(layer).double()
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ours = gpu_us(lambda x=x: hqqlora.apply_lora(layer, p, x))
                err = rel(
                    hqqlora.apply_lora(layer, p, x),
                    x.double() @ W.T + (x.double() @ A.double().T) @ B.double().T,
                )
                base = gpu_us(lambda x=x: gl(x)) if gl is not None else float("nan")
                per_kernel = kernel_table(lambda x=x: hqqlora.apply_lora(layer, p, x))
                default_rows = _decode.SHRINK_ROWS
                for shrink_rows in (1, 2, 4, 8, 16):
                    _decode.SHRINK_ROWS = shrink_rows
                    shrink = kernel_table(lambda x=x: hqqlora.apply_lora(layer, p, x))
                    print(f"    shrink rows {shrink_rows}: {shrink}")
                _decode.SHRINK_ROWS = default_rows
            print(
                f"{out_f}x{in_f} tokens {tokens}: ours LoRA fp32 {ours:.1f} us GPU (rel err {err:.1e}), "
                f"gemlite base {base:.1f} us: {ours / base:.2f}x; kernels {per_kernel}"
            )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="4096² and 14336×4096, 1 and 16 tokens"
    )
    parser.add_argument("--explore", action="store_true", help="a wider grid")
    parser.add_argument("--profile-only", action="store_true", help="no tuning: TUNED as is")
    parser.add_argument("--tokens", type=int, nargs="*", help="these token counts only")
    args = parser.parse_args()
    print(environment("cuda"))
    shapes, tokens = ([(4096, 4096), (14336, 4096)], [1, 16]) if args.quick else (SHAPES, TOKENS)
    tokens = args.tokens or tokens
    if args.profile_only:
        profile_best(shapes, tokens)
        return
    best = tune(shapes, tokens, explore=args.explore)
    print("TUNED = {")
    for key, config in sorted(best.items()):
        print(f"    {key}: {config},")
    print("}", flush=True)
    _decode.TUNED.update(best)
    profile_best(shapes, tokens)


if __name__ == "__main__":
    main()
