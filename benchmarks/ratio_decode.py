"""Issue 11's first target, measured in turn: the adapted layer against gemlite's base (CUDA).

python benchmarks/ratio_decode.py --rounds 5

For 4096² and 14336×4096 at 1 and 16 tokens: CUDA-graph time per call (µs, Triton's
``do_bench_cudagraph``, median of its replays) of gemlite's base kernel, of ``apply_lora``
with float32 LoRA (the default) and DoRA with a held norm, eager and under
``torch.compile(fullgraph=True)``, and of ``_decode.lora_decode`` called directly (the
kernels without ``apply_lora``'s checks). The variants take turns, ``--rounds`` times; the
table gives each one's median and its ratio to gemlite's median, with the spread
(lowest–highest) of the rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton.testing
from bench_decode import DTYPE, RANK, adapter, gemlite_of
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors


def variants(layer, x):
    """The calls to time, by name."""
    gl = gemlite_of(layer)
    lora = adapter(layer)
    dora = adapter(layer, dora=True)
    norm = hqqlora.dora_weight_norm(layer, dora)
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    kernel_args = {
        "lora_A": lora["lora_A"],
        "lora_B": lora["lora_B"],
        "scaling": lora["scaling"].reshape(1),
        "bias": layer.bias,
    }
    compiled = torch.compile(
        lambda xx: hqqlora.apply_lora(layer, lora, xx), fullgraph=True, dynamic=False
    )
    compiled_dora = torch.compile(
        lambda xx: hqqlora.apply_lora(layer, dora, xx, weight_norm=norm),
        fullgraph=True,
        dynamic=False,
    )
    calls = {
        "gemlite base": (lambda: gl(x)) if gl is not None else None,
        "ours base": lambda: hqqlora.base_forward(layer, x),
        "ours LoRA fp32": lambda: hqqlora.apply_lora(layer, lora, x),
        "ours LoRA fp32 compiled": lambda: compiled(x),
        "ours DoRA fp32": lambda: hqqlora.apply_lora(layer, dora, x, weight_norm=norm),
        "ours DoRA fp32 compiled": lambda: compiled_dora(x),
        "lora_decode (kernels only)": lambda: _decode.lora_decode(
            x, W_q, scale, zero, layout, **kernel_args
        ),
    }
    return {name: fn for name, fn in calls.items() if fn is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16], help="1 to 16")
    args = parser.parse_args()
    if not all(1 <= t <= 16 for t in args.tokens):
        parser.error(f"--tokens: 1 to 16 each, got {args.tokens}")
    if args.rounds < 1:
        parser.error(f"--rounds: at least 1, got {args.rounds}")
    print(environment("cuda"))
    print(f"r={RANK}, 4-bit g64, {DTYPE} x, graph µs: median of {args.rounds} rounds (spread)\n")
    print("| layer | tokens | path | graph µs | × gemlite |")
    print("|---|---|---|---|---|")
    for out_f, in_f in [(4096, 4096), (14336, 4096)]:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device="cuda", dtype=DTYPE)
            with torch.no_grad():
                calls = variants(layer, x)
                times = {name: [] for name in calls}
                for fn in calls.values():
                    fn()  # compiles, warms up
                for _ in range(args.rounds):
                    for name, fn in calls.items():
                        us = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
                        times[name].append(1e3 * us)
            gemlite = times.get("gemlite base")
            ref = statistics.median(gemlite) if gemlite else None
            for name, ts in times.items():
                med = statistics.median(ts)
                ratio = f"{med / ref:.2f}" if ref else "n/a (no gemlite)"
                print(
                    f"| {out_f}x{in_f} | {tokens} | {name} | {med:.1f} ({min(ts):.1f}–"
                    f"{max(ts):.1f}) | {ratio} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
