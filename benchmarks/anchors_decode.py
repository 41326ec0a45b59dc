"""Issue 11's missed targets against outside kernels on the same HQQ weights (CUDA).

python benchmarks/anchors_decode.py --rounds 5

For 4096² and 14336×4096 at 1, 16 and 64 tokens, every path of one cell in turn,
``--rounds`` times (CUDA-graph time per call, Triton's ``do_bench_cudagraph``, the median of
the rounds and their spread), with its error against the float64 product and its ratio to
the floor (the bytes it must read ÷ the copy bandwidth measured in this run):

- gemlite's A16Wn kernel as HQQ's backend runs it (on sm_90 its split-K partials are added
  in bfloat16 by atomics into the output), and the same with float32 atomics
  (``gemlite.set_native_atomic_bfp16(False)``: a float32 output, then a cast);
- ``torch._weight_int4pack_mm`` (tinygemm, torchao's int4 kernel), its weights converted
  from the HQQ layer's codes with ``(8 − z)·s`` as its zero;
- dense bf16 (cuBLAS) on HQQ's dequantized weight;
- hqqlora: the base term, LoRA with one float32 adapter (``apply_lora`` up to 16 tokens; at
  64, ``mixed_batch_indexed`` over a bank of one) and, at 64 tokens, 64 adapters (a bank of
  64 read through an index, one adapter a row).

Then the kernels of each path at one cell per layer (profiler, µs per call).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton.testing
from bench_decode import (
    DTYPE,
    adapter,
    copy_bandwidth,
    gemlite_of,
    kernel_us,
    layer_bytes,
    params_bytes,
    reference,
    rel,
)
from common import environment, make_hqq_layer

import hqqlora
from hqqlora._base import quant_tensors


def tinygemm_of(layer):
    """``x ↦ torch._weight_int4pack_mm(x, …)`` on the HQQ layer's weights, or ``None``."""
    try:
        from hqq.core.bitpack import BitPack

        out_f, in_f = layer.meta["shape"]
        W_q, scale, zero = quant_tensors(layer)
        codes = BitPack.unpack_4bit_u8(W_q, dtype=torch.uint8).view(out_f, in_f)
        s = scale.float().view(out_f, -1)
        z = zero.float().view(out_f, -1)
        # tinygemm dequantizes (q − 8)·s + zt; HQQ (q − z)·s, so zt = (8 − z)·s.
        scales_zeros = torch.stack([s.t(), ((8 - z) * s).t()], dim=2).to(DTYPE).contiguous()
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        weight = torch._convert_weight_to_int4pack(packed, 8)
        group = in_f // s.shape[1]
        return lambda x: torch._weight_int4pack_mm(x, weight, group, scales_zeros)
    except Exception as exc:  # an old torch or a GPU without the kernel: the table says so
        print(f"tinygemm unavailable: {type(exc).__name__}: {exc}")
        return None


def float32_atomics(gl):
    """gemlite's call with its split-K partials added in float32 (then cast)."""
    import gemlite

    def call(x):
        gemlite.set_native_atomic_bfp16(False)
        try:
            return gl(x)
        finally:
            gemlite.set_native_atomic_bfp16(True)

    return call


def paths(layer, tokens, gl, tiny, dense):
    """(name, call, float64 reference, bytes read) of each path of one cell."""
    in_f = layer.meta["shape"][1]
    x = torch.randn(tokens, in_f, device="cuda", dtype=DTYPE)
    base_ref = reference(layer, x)
    base_bytes = layer_bytes(layer)
    out = []
    if gl is not None:
        out.append(("gemlite (bf16 atomics, its default)", lambda: gl(x), base_ref, base_bytes))
        g32 = float32_atomics(gl)
        out.append(("gemlite (float32 atomics)", lambda: g32(x), base_ref, base_bytes))
    if tiny is not None:
        out.append(("tinygemm int4 (torch)", lambda: tiny(x), base_ref, base_bytes))
    out.append(("dense bf16 (cuBLAS)", lambda: x @ dense.T, base_ref, dense.numel() * 2))
    out.append(("ours base", lambda: hqqlora.base_forward(layer, x), base_ref, base_bytes))
    one = adapter(layer)
    if tokens <= 16:
        out.append(
            (
                "ours LoRA fp32, 1 adapter",
                lambda: hqqlora.apply_lora(layer, one, x),
                reference(layer, x, one),
                base_bytes + params_bytes(one),
            )
        )
        return out
    xs = x.unsqueeze(1)
    ids = torch.arange(tokens, device="cuda")
    bank1 = hqqlora.stack_adapters({"a0": one})
    zeros = torch.zeros_like(ids)
    ref1 = reference(layer, x, one).unsqueeze(1)
    out.append(
        (
            "ours LoRA fp32, 1 adapter (bank of 1)",
            lambda: hqqlora.mixed_batch_indexed(xs, bank1, zeros, base=layer),
            ref1,
            base_bytes + params_bytes(one),
        )
    )
    many = {f"a{i}": adapter(layer, seed=i) for i in range(tokens)}
    bank = hqqlora.stack_adapters(many)
    ref = torch.stack([reference(layer, x[i : i + 1], many[f"a{i}"]) for i in range(tokens)])
    out.append(
        (
            f"ours LoRA fp32, {tokens} adapters",
            lambda: hqqlora.mixed_batch_indexed(xs, bank, ids, base=layer),
            ref,
            base_bytes + sum(params_bytes(p) for p in many.values()),
        )
    )
    return out


def short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: at least 1, got {args.rounds}")
    print(environment("cuda"))
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; 4-bit g64, r=16, {DTYPE} x")
    print(f"graph µs: median of {args.rounds} rounds (spread)\n")
    print("| layer | tokens | path | graph µs | × first row | floor µs | × floor | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    profiles = []
    for out_f, in_f in [(4096, 4096), (14336, 4096)]:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        gl = gemlite_of(layer)
        tiny = tinygemm_of(layer)
        dense = hqqlora.dequantize(layer).to(DTYPE)
        for tokens in args.tokens:
            with torch.no_grad():
                cells = paths(layer, tokens, gl, tiny, dense)
                errs = {}
                for name, fn, ref, _ in cells:
                    y = fn()  # compiles, warms up
                    errs[name] = rel(y.reshape(ref.shape), ref)
                times = {name: [] for name, *_ in cells}
                for _ in range(args.rounds):
                    for name, fn, _, _ in cells:
                        ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
                        times[name].append(1e3 * ms)
                if tokens == 1 or tokens == max(args.tokens):
                    for name, fn, _, _ in cells:
                        profiles.append((f"{out_f}x{in_f}", tokens, name, kernel_us(fn)))
            first = statistics.median(times[cells[0][0]])
            for name, _, _, nbytes in cells:
                ts = times[name]
                med = statistics.median(ts)
                floor = nbytes / bw * 1e6
                print(
                    f"| {out_f}x{in_f} | {tokens} | {name} | {med:.1f} ({min(ts):.1f}–"
                    f"{max(ts):.1f}) | {med / first:.2f} | {floor:.1f} | {med / floor:.2f} | "
                    f"{errs[name]:.2e} |",
                    flush=True,
                )
    print("\nKernels per call (profiler, µs; eager calls, so the sums count overlap twice)\n")
    print("| layer | tokens | path | kernels |")
    print("|---|---|---|---|")
    for shape, tokens, name, kernels in profiles:
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:4]
        listed = "; ".join(f"{short(k)} {v:.1f}" for k, v in top)
        print(f"| {shape} | {tokens} | {name} | {listed} |", flush=True)


if __name__ == "__main__":
    main()
