"""Merge and unmerge (issue 5, workload 3): time and fidelity, hqqlora vs PEFT's HqqLoraLinear.

Both sides merge the same "trained-like" adapter into the same HQQ layer, in one run:
``lora_A`` kaiming-uniform (PEFT's init), ``lora_B`` Gaussian with its std chosen so
that ``rms(ΔW) = --rel · rms(W)`` (1% by default, a fine-tune's size), float32
adapters (PEFT keeps adapters in float32 by default), bf16 layer.

1. Time: ``merge(method="requantize")`` and ``unmerge`` against PEFT's
   ``module.merge()`` / ``unmerge()`` (a fresh PEFT module every repetition), and the
   ``HqqLoraLinear`` shim. These are long host-driven calls: ``time.perf_counter``
   with ``torch.cuda.synchronize()`` on both sides of every call.
2. Fidelity at 2/3/4/8 bits: ``merge_report``'s ``captured`` and ``rel_error`` (for
   PEFT, of its merged base layer); the output error of the merged layer against the
   unmerged adapted forward, ``‖merged(x) − apply_lora(base, p, x)‖ / ‖apply_lora(base,
   p, x) − base(x)‖``; and the drift after merge → unmerge,
   ``‖dequant(unmerged) − dequant(base)‖ / ‖dequant(base)‖``.

    python benchmarks/bench_merge.py --device cuda          # 4096x4096 (time and fidelity)
    python benchmarks/bench_merge.py --device cpu           # 1024x1024 time, 512x512 fidelity
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from common import environment, make_hqq_layer, peft_module, print_table

import hqqlora
from hqqlora import dequantize, merge, merge_report, unmerge


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def trained_like(layer, r, rel, *, seed, group_constant=False):
    """A float32 adapter with ``rms(ΔW) = rel · rms(dequant(W))``, on the layer's device."""
    device = layer.W_q.device
    gen = torch.Generator(device=device).manual_seed(seed)
    if group_constant:
        # Pooled A (QA-LoRA), both factors random: ΔW is constant within each group.
        p = hqqlora.init_lora(
            layer, r, 2 * r, group_constant=True, init_lora_weights=False, generator=gen
        )
    else:
        p = hqqlora.init_lora(layer, r, 2 * r, generator=gen)  # kaiming-uniform A, zero B
        p["lora_B"] = torch.randn(p["lora_B"].shape, generator=gen, device=device)
    in_features = layer.meta["shape"][1]
    delta = hqqlora.delta_weight(p, in_features=in_features)
    target = rel * dequantize(layer).float().pow(2).mean().sqrt()
    p["lora_B"] = p["lora_B"] * (target / delta.pow(2).mean().sqrt())
    return p


def shim_module(layer, params, r):
    """Our ``HqqLoraLinear`` over ``layer`` holding ``params`` (scaling = 2r / r = 2)."""
    shim = hqqlora.HqqLoraLinear(layer, "default", r=r, lora_alpha=2 * r, init_lora_weights=False)
    with torch.no_grad():
        shim.lora_A["default"].weight.copy_(params["lora_A"])
        shim.lora_B["default"].weight.copy_(params["lora_B"])
    shim.scaling["default"] = float(params["scaling"])
    return shim.eval()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) * 1e3


def timing_table(layer, params, r, device, reps, warmup):
    """Median ms of each merge/unmerge; every repetition starts from the same layer."""
    times: dict[str, list[float]] = {}

    def record(name, ms, rep):
        if rep >= warmup:
            times.setdefault(name, []).append(ms)

    for rep in range(warmup + reps):
        # PEFT: a fresh module each time (merge replaces its base layer in place).
        module = peft_module(layer, params, r=r, lora_alpha=2 * r)
        _, ms = _timed(module.merge, device)
        record("PEFT merge()", ms, rep)
        _, ms = _timed(module.unmerge, device)
        record("PEFT unmerge()", ms, rep)

        merged, ms = _timed(lambda: merge(layer, params, warn=False), device)
        record("ours merge(requantize, warn=False)", ms, rep)
        _, ms = _timed(lambda m=merged: unmerge(m, params), device)
        record("ours unmerge(requantize)", ms, rep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, ms = _timed(lambda: merge(layer, params), device)
        record("ours merge(requantize), default warn=True", ms, rep)
        merged, ms = _timed(lambda: merge(layer, params, method="same_grid", warn=False), device)
        record("ours merge(same_grid)", ms, rep)
        _, ms = _timed(lambda m=merged: unmerge(m, params, method="same_grid"), device)
        record("ours unmerge(same_grid)", ms, rep)

        shim = shim_module(layer, params, r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, ms = _timed(shim.merge, device)
        record("shim HqqLoraLinear.merge()", ms, rep)
        _, ms = _timed(shim.unmerge, device)
        record("shim HqqLoraLinear.unmerge()", ms, rep)

    med = {name: statistics.median(v) for name, v in times.items()}
    rows = []
    for name, ms in med.items():
        ref = med["PEFT unmerge()"] if "unmerge" in name else med["PEFT merge()"]
        rows.append([name, ms, ms / ref])
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor, denom: torch.Tensor) -> float:
    return float(torch.linalg.norm((a.double() - b.double()).flatten())) / float(
        torch.linalg.norm(denom.double().flatten())
    )


def drift(unmerged, base) -> float:
    W = dequantize(base).double()
    return _rel(dequantize(unmerged), W, W)


def output_errors(base, params, merged, x):
    """(float64, bf16 forward) output error of ``merged`` vs the unmerged adapted layer.

    float64: from the dequantized weights, so the error is the merge's alone; bf16:
    the layers' own forwards, whose output rounding (≈0.1 of a 1% update) adds a floor.
    """
    in_features = base.meta["shape"][1]
    W = dequantize(base).double()
    p64 = {k: v.double() for k, v in params.items()}
    delta = hqqlora.delta_weight(p64, in_features=in_features)
    x64 = x.double().reshape(-1, in_features)
    adapted = x64 @ (W + delta).T
    exact = _rel(x64 @ dequantize(merged).double().T, adapted, adapted - x64 @ W.T)
    ref = hqqlora.apply_lora(base, params, x)
    fwd = _rel(hqqlora.base_forward(merged, x), ref, ref.double() - hqqlora.base_forward(base, x))
    return exact, fwd


def fidelity_rows(size, nbits, r, rel, device, dtype, tokens):
    layer = make_hqq_layer(size, size, nbits=nbits, group_size=64, dtype=dtype, device=device)
    plain = trained_like(layer, r, rel, seed=1)
    pooled = trained_like(layer, r, rel, seed=1, group_constant=True)
    x = torch.randn(tokens, size, device=device, dtype=dtype)
    rows = []

    def row(who, method, adapter, params, merged, unmerged):
        report = merge_report(layer, params, merged)
        exact, fwd = output_errors(layer, params, merged, x)
        rows.append(
            [
                nbits,
                who,
                method,
                adapter,
                report["captured"],
                report["rel_error"],
                exact,
                fwd,
                drift(unmerged, layer),
            ]
        )

    module = peft_module(layer, plain, r=r, lora_alpha=2 * r)
    module.merge()
    peft_merged = module.get_base_layer()
    module.unmerge()
    row("PEFT", "merge()/unmerge()", "plain", plain, peft_merged, module.get_base_layer())

    ours = merge(layer, plain, warn=False)
    row("ours", "requantize (functional)", "plain", plain, ours, unmerge(ours, plain))

    shim = shim_module(layer, plain, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        shim.merge()
    shim_merged = shim.get_base_layer()
    shim.unmerge()
    row("ours", "requantize (shim)", "plain", plain, shim_merged, shim.get_base_layer())

    grid = merge(layer, plain, method="same_grid", warn=False)
    row("ours", "same_grid", "plain", plain, grid, unmerge(grid, plain, method="same_grid"))

    zp = merge(layer, pooled, method="zero_point", warn=False)
    row(
        "ours",
        "zero_point",
        "group-constant",
        pooled,
        zp,
        unmerge(zp, pooled, method="zero_point"),
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size", type=int, default=None, help="timed layer, in = out (4096 on cuda, 1024 on cpu)"
    )
    parser.add_argument(
        "--fidelity-size",
        type=int,
        default=None,
        help="fidelity layers (--size on cuda, 512 on cpu)",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rel", type=float, default=0.01, help="rms(ΔW) / rms(W)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--reps", type=int, default=None, help="10 on cuda, 3 on cpu")
    parser.add_argument("--tokens", type=int, default=256, help="rows of x for the output error")
    parser.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = parser.parse_args()
    device = args.device
    size = args.size or (4096 if device == "cuda" else 1024)
    fid_size = args.fidelity_size or (size if device == "cuda" else 512)
    reps = args.reps or (10 if device == "cuda" else 3)
    warmup = 1 if device == "cuda" else 0
    r, rel, dtype = args.rank, args.rel, torch.bfloat16
    torch.manual_seed(0)

    env = environment(device)
    print(env)
    text = f"{env}\n\n"
    adapter = (
        f"LoRA r={r}, float32 adapter: A kaiming-uniform, B Gaussian scaled so that "
        f"rms(ΔW) = {rel:g}·rms(W)"
    )

    layer = make_hqq_layer(size, size, nbits=4, group_size=64, dtype=dtype, device=device)
    params = trained_like(layer, r, rel, seed=1)
    with torch.no_grad():
        rows = timing_table(layer, params, r, device, reps, warmup)
    text += "\n" + print_table(
        f"Merge / unmerge time, {device}: layer {size}x{size}, 4-bit, group 64, bf16, no bias; "
        f"{adapter}; median of {reps} (host timer, synchronized), ratio vs PEFT's merge or unmerge",
        ["operation", "ms", "/ PEFT"],
        rows,
    )

    fid = []
    with torch.no_grad():
        for nbits in args.bits:
            fid += fidelity_rows(fid_size, nbits, r, rel, device, dtype, args.tokens)
    text += "\n" + print_table(
        f"Merge fidelity, {device}: layer {fid_size}x{fid_size}, group 64, bf16; {adapter} "
        "(zero_point: a group-constant adapter of the same size, init_lora(group_constant=True)). "
        "captured, rel_error: merge_report. output err: ‖merged(x) − apply_lora(base, p, x)‖ / "
        f"‖apply_lora(base, p, x) − base(x)‖ on x ~ N(0, 1) of {args.tokens} rows, in float64 "
        "from the dequantized weights and with the bf16 forwards (whose output rounding adds a "
        "floor). drift: ‖dequant(unmerge(merge(base))) − dequant(base)‖ / ‖dequant(base)‖",
        [
            "bits",
            "who",
            "method",
            "adapter",
            "captured",
            "rel_error",
            "output err (f64)",
            "output err (bf16)",
            "drift",
        ],
        fid,
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
