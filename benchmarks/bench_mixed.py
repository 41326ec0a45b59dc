"""Mixed-adapter batches (issue 5, workload 2): hqqlora vs PEFT's HqqLoraLinear.

Row ``i`` of ``x`` (shape ``(rows, tokens, size)``) gets adapter ``i mod n`` of ``n``
distinct LoRA adapters (round-robin), through one 4-bit group-64 HQQ layer (bf16, or --dtype).
Both sides use the same layer and the same adapter tensors, timed in one run:

* HQQ base: the layer's own forward (the denominator of every ratio);
* PEFT: one ``HqqLoraLinear`` holding all adapters, ``forward(x, adapter_names=names)``;
* ours dict: ``mixed_batch(x, adapters, names, base=layer)`` (stacks on every call, or in
  eager mode on the CPU loops over the adapters in the batch where that is cheaper);
* ours indexed: ``mixed_batch_indexed(x, bank, index, base=layer)`` with the bank
  stacked once (outside the timed region) and the index tensor on the device;
* ours compiled: the indexed form under ``torch.compile(fullgraph=True, dynamic=False)``.

Then the same for DoRA adapters (``weight_norm`` precomputed); PEFT's mixed-batch
path refuses DoRA adapters, which the table shows as "n/a".

    python benchmarks/bench_mixed.py --device cuda          # 4096x4096, 64 rows x 128 tokens
    python benchmarks/bench_mixed.py --device cpu           # 512x512, 64 rows x 8 tokens

On the CPU (issue 11, item 6: never slower than PEFT), float32 on one thread:

    python benchmarks/bench_mixed.py --device cpu --size 1024 --rows 32 --tokens 8 \
        --counts 1 16 --dtype float32 --threads 1 --no-compile --reps 40

and the eager CPU algorithms side by side (the loop over the adapters in the batch
against the batched gather, each forced), with the choice ``_loop_pays`` makes:

    python benchmarks/bench_mixed.py --device cpu --loop-grid --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import (
    environment,
    make_hqq_layer,
    peft_module,
    print_table,
    random_params,
    rel_err,
    time_fn,
)

import hqqlora

COUNTS = (1, 4, 16, 64)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_group(fns, device: str, reps: int) -> dict[str, float]:
    """Median ms of each function: device events on CUDA; on CPU, interleaved rounds.

    On a shared CPU the load drifts over seconds; timing the functions round-robin
    lets every one of them (the base layer included) see the same drift.
    """
    if device == "cuda":
        return {name: time_fn(fn, device) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def loop_grid(args) -> None:
    """Times the two eager CPU algorithms of ``mixed_batch_indexed``, each forced."""
    import hqqlora._mixed as mixed_module

    decide = mixed_module._loop_pays
    r = args.rank
    rows_out = []
    for size in (64, 256, 1024):
        layer = make_hqq_layer(size, size, nbits=4, group_size=64, dtype=torch.float32)
        adapters = {
            f"a{k}": random_params(layer, r, dtype=torch.float32, seed=100 + k) for k in range(64)
        }
        for rows, tokens in ((8, 1), (32, 1), (32, 8), (64, 1)):
            x = torch.randn(rows, tokens, size)
            for n in (1, 4, 16, 64):
                if n > rows:
                    continue
                bank = hqqlora.stack_adapters({f"a{k}": adapters[f"a{k}"] for k in range(n)})
                index = torch.arange(rows) % n

                def forced(loop, bank=bank, index=index, x=x, layer=layer):
                    def run():
                        mixed_module._loop_pays = lambda *a: loop
                        try:
                            return hqqlora.mixed_batch_indexed(x, bank, index, base=layer)
                        finally:
                            mixed_module._loop_pays = decide

                    return run

                with torch.no_grad():
                    ms = time_group(
                        {
                            "base": lambda x=x, layer=layer: hqqlora.base_forward(layer, x),
                            "loop": forced(True),
                            "batched": forced(False),
                        },
                        "cpu",
                        args.reps,
                    )
                base = ms["base"]
                faster = "loop" if ms["loop"] < ms["batched"] else "batched"
                chosen = "loop" if decide(rows, n, r, size, size) else "batched"
                rows_out.append(
                    [size, rows, tokens, n, base * 1e3]
                    + [(ms[k] - base) * 1e3 for k in ("loop", "batched")]
                    + [faster, chosen]
                )
    text = f"{environment('cpu')}\n\n" + print_table(
        f"Eager CPU algorithms of mixed_batch_indexed, LoRA r={r} float32, round-robin adapters, "
        "time over the base forward (µs, medians)",
        [
            "size",
            "rows",
            "tokens",
            "adapters",
            "base (µs)",
            "loop +",
            "batched +",
            "faster",
            "chosen",
        ],
        rows_out,
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


def _reference(layer, adapters, names, x, norms=None):
    """Each row through its own adapter with ``apply_lora``: the ground truth."""
    rows = []
    for i, name in enumerate(names):
        kw = {} if norms is None else {"weight_norm": norms[name]}
        rows.append(hqqlora.apply_lora(layer, adapters[name], x[i : i + 1], **kw))
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size", type=int, default=None, help="in = out features (4096 on cuda, 512 on cpu)"
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=None, help="128 on cuda, 8 on cpu")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10, help="timed calls per median on cpu")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="append the markdown tables to this file")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--loop-grid", action="store_true", help="CPU: loop vs batched grid")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loop_grid:
        loop_grid(args)
        return
    device = args.device
    size = args.size or (4096 if device == "cuda" else 512)
    tokens = args.tokens or (128 if device == "cuda" else 8)
    rows, r, dtype = args.rows, args.rank, getattr(torch, args.dtype)
    counts = [n for n in args.counts if n <= rows]
    n_max = max(counts)
    torch.manual_seed(0)
    # One compiled function re-specializes per bank size (and LoRA/DoRA): allow it.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else None
    setattr(torch._dynamo.config, limit or "cache_size_limit", 64)

    layer = make_hqq_layer(size, size, nbits=4, group_size=64, dtype=dtype, device=device)
    lora = {f"a{k}": random_params(layer, r, dtype=dtype, seed=100 + k) for k in range(n_max)}
    dora = {
        f"d{k}": random_params(layer, r, dtype=dtype, dora=True, seed=200 + k) for k in range(n_max)
    }
    dora_norm = {name: hqqlora.dora_weight_norm(layer, p) for name, p in dora.items()}

    # All adapters loaded into one PEFT module, as a PEFT user serving a mixed batch does.
    peft = None
    for name, p in lora.items():
        peft = peft_module(layer, p, r=r, lora_alpha=2 * r, adapter_name=name, module=peft)

    # PEFT's mixed batch refuses DoRA adapters: try it once on one adapter.
    peft_dora, peft_dora_error = None, None
    x_try = torch.randn(2, 3, size, device=device, dtype=dtype)
    try:
        trial = peft_module(layer, dora["d0"], r=r, lora_alpha=2 * r, adapter_name="d0")
        with torch.no_grad():
            trial(x_try, adapter_names=["d0", "d0"])
    except Exception as exc:  # PEFT raises ValueError; anything else is reported as well
        peft_dora_error = f"{type(exc).__name__}: {exc}"
    else:
        peft_dora = trial
        for name, p in list(dora.items())[1:]:
            peft_dora = peft_module(
                layer, p, r=r, lora_alpha=2 * r, adapter_name=name, module=peft_dora
            )

    serve = None
    if not args.no_compile:

        @torch.compile(fullgraph=True, dynamic=False)
        def serve(x, bank, index, norms):
            return hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norms)

    env = environment(device)
    print(env)
    if peft_dora_error:
        print(f"PEFT DoRA mixed batch: {peft_dora_error}")
    text = (
        f"{env}\n\nlayer {size}x{size}, 4-bit, group 64, no bias, {args.dtype}; "
        f"x {rows}x{tokens}x{size} {args.dtype}; LoRA r={r} {args.dtype} adapters assigned "
        "round-robin to rows; times are medians\n\n"
    )
    x = torch.randn(rows, tokens, size, device=device, dtype=dtype)

    lora_rows, dora_rows, checks = [], [], []
    with torch.no_grad():
        for n in counts:
            names = [f"a{i % n}" for i in range(rows)]
            adapters = {f"a{k}": lora[f"a{k}"] for k in range(n)}
            bank = hqqlora.stack_adapters(adapters)
            index = torch.tensor([i % n for i in range(rows)], device=device)
            _sync(device)
            fns = {
                "base": lambda: layer(x),
                "PEFT": lambda names=names: peft(x, adapter_names=names),
                "ours dict": lambda a=adapters, names=names: hqqlora.mixed_batch(
                    x, a, names, base=layer
                ),
                "ours indexed": lambda b=bank, i=index: hqqlora.mixed_batch_indexed(
                    x, b, i, base=layer
                ),
            }
            if serve is not None:
                fns["ours compiled"] = lambda b=bank, i=index: serve(x, b, i, None)
            ms = time_group(fns, device, args.reps)
            base_ms = ms.pop("base")
            del fns["base"]
            row = [n, base_ms] + [ms[k] / base_ms for k in fns]
            row += [ms[k] / ms["PEFT"] for k in fns if k != "PEFT"]
            lora_rows.append(row)

            outs = {k: fn() for k, fn in fns.items()}
            ref = _reference(layer, adapters, names, x)
            errs = [rel_err(outs[k], outs["PEFT"]) for k in fns if k != "PEFT"]
            checks.append(["LoRA", n, *errs, max(errs), rel_err(outs["PEFT"], ref)])

        for n in counts:
            names = [f"d{i % n}" for i in range(rows)]
            adapters = {f"d{k}": dora[f"d{k}"] for k in range(n)}
            norms = {name: dora_norm[name] for name in adapters}
            bank = hqqlora.stack_adapters(adapters)
            bank_norm = hqqlora.bank_weight_norm(layer, bank, norms)
            index = torch.tensor([i % n for i in range(rows)], device=device)
            _sync(device)
            fns = {
                "base": lambda: layer(x),
                "ours dict": lambda a=adapters, names=names, w=norms: hqqlora.mixed_batch(
                    x, a, names, base=layer, weight_norm=w
                ),
                "ours indexed": lambda b=bank, i=index, w=bank_norm: hqqlora.mixed_batch_indexed(
                    x, b, i, base=layer, weight_norm=w
                ),
            }
            if serve is not None:
                fns["ours compiled"] = lambda b=bank, i=index, w=bank_norm: serve(x, b, i, w)
            if peft_dora is not None:
                fns["PEFT"] = lambda names=names: peft_dora(x, adapter_names=names)
            ms = time_group(fns, device, args.reps)
            base_ms, peft_ms = ms.pop("base"), ms.pop("PEFT", None)
            del fns["base"]
            fns.pop("PEFT", None)
            row = [n, base_ms, "n/a" if peft_ms is None else peft_ms / base_ms]
            row += [ms[k] / base_ms for k in fns]
            row += ["n/a" if peft_ms is None else ms[k] / peft_ms for k in fns]
            dora_rows.append(row)

            outs = {k: fn() for k, fn in fns.items()}
            ref = _reference(layer, adapters, names, x, norms)
            if peft_dora is not None:
                peft_out = peft_dora(x, adapter_names=names)
                errs = [rel_err(outs[k], peft_out) for k in fns]
                peft_ref = rel_err(peft_out, ref)
            else:
                errs = [rel_err(outs[k], ref) for k in fns]
                peft_ref = "n/a"
            checks.append(["DoRA", n, *errs, max(errs), peft_ref])

    ours = ["ours dict", "ours indexed"] + ([] if serve is None else ["ours compiled"])
    text += "\n" + print_table(
        f"Mixed batch, LoRA, {device}",
        ["adapters", "HQQ base (ms)", "PEFT / base"]
        + [f"{k} / base" for k in ours]
        + [f"{k} / PEFT" for k in ours],
        lora_rows,
    )
    dora_caption = (
        f"Mixed batch, DoRA (weight_norm precomputed), {device}"
        if peft_dora is not None
        else f"Mixed batch, DoRA (weight_norm precomputed), {device}; PEFT refuses DoRA in mixed batches"
        f" ({peft_dora_error.splitlines()[0][:120]})"
    )
    text += "\n" + print_table(
        dora_caption,
        ["adapters", "HQQ base (ms)", "PEFT / base"]
        + [f"{k} / base" for k in ours]
        + [f"{k} / PEFT" for k in ours],
        dora_rows,
    )
    text += "\n" + print_table(
        "Agreement: relative error ‖ours − PEFT‖/‖PEFT‖ of the output (DoRA without PEFT: vs "
        "per-row apply_lora); last column: PEFT vs per-row apply_lora, the bf16 noise level",
        ["kind", "adapters", *ours, "max", "PEFT vs per-row"],
        checks,
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
