"""Forward (LoRA, DoRA inference), compiled forward, and training step: hqqlora vs PEFT.

Both sides use the same HQQ layer and the same adapter tensors, timed in one run.
Ratios are against HQQ's own base forward on the same device.

    python benchmarks/bench_forward.py --device cuda          # 4096x4096, as in RESULTS.md
    python benchmarks/bench_forward.py --device cpu --size 1024
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size", type=int, default=None, help="in = out features (4096 on cuda, 1024 on cpu)"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--train-tokens", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = parser.parse_args()
    device = args.device
    size = args.size or (4096 if device == "cuda" else 1024)
    tokens = args.tokens or ([1, 16, 256, 4096] if device == "cuda" else [1, 16, 256])
    train_tokens = args.train_tokens or (4096 if device == "cuda" else 256)
    dtype = torch.bfloat16
    r = args.rank
    torch.manual_seed(0)

    layer = make_hqq_layer(size, size, nbits=4, group_size=64, dtype=dtype, device=device)
    lora = random_params(layer, r, dtype=dtype)
    dora = random_params(layer, r, dtype=dtype, dora=True, seed=2)
    norm = hqqlora.dora_weight_norm(layer, dora)
    peft_lora = peft_module(layer, lora, r=r, lora_alpha=2 * r)
    peft_dora = peft_module(layer, dora, r=r, lora_alpha=2 * r)
    env = environment(device)
    print(env)
    text = f"{env}\n\nlayer {size}x{size}, 4-bit, group 64, r={r}, {dtype}, no bias; times are medians\n\n"

    def ours_lora(x):
        return hqqlora.apply_lora(layer, lora, x)

    def ours_dora(x):
        return hqqlora.apply_lora(layer, dora, x, weight_norm=norm)

    compiled_lora = compiled_dora = compiled_base = graphed_lora = graphed_dora = None
    if not args.no_compile:
        compiled_lora = torch.compile(ours_lora, fullgraph=True, dynamic=False)
        compiled_dora = torch.compile(ours_dora, fullgraph=True, dynamic=False)
        compiled_base = torch.compile(
            lambda x: hqqlora._base.pure_forward(layer, x), fullgraph=True, dynamic=False
        )
        if device == "cuda":
            # mode="reduce-overhead" replays CUDA graphs: no per-call launch or guard cost.
            graphed_lora = torch.compile(
                lambda x: ours_lora(x).clone(),
                mode="reduce-overhead",
                fullgraph=True,
                dynamic=False,
            )
            graphed_dora = torch.compile(
                lambda x: ours_dora(x).clone(),
                mode="reduce-overhead",
                fullgraph=True,
                dynamic=False,
            )

    rows, checks = [], []
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(t, size, device=device, dtype=dtype)
            base_ms = time_fn(lambda x=x: layer(x), device)
            row = [t, base_ms]
            pairs = [
                ("ours base", lambda x=x: hqqlora.base_forward(layer, x)),
                ("PEFT LoRA", lambda x=x: peft_lora(x)),
                ("ours LoRA", lambda x=x: ours_lora(x)),
                ("PEFT DoRA", lambda x=x: peft_dora(x)),
                ("ours DoRA (weight_norm)", lambda x=x: ours_dora(x)),
            ]
            if compiled_lora is not None:
                pairs += [
                    ("compiled base", lambda x=x: compiled_base(x)),
                    ("compiled LoRA", lambda x=x: compiled_lora(x)),
                    ("compiled DoRA", lambda x=x: compiled_dora(x)),
                ]
            if graphed_lora is not None:
                pairs += [
                    ("compiled+graphs LoRA", lambda x=x: graphed_lora(x)),
                    ("compiled+graphs DoRA", lambda x=x: graphed_dora(x)),
                ]
            for _, fn in pairs:
                row.append(time_fn(fn, device) / base_ms)
            rows.append(row)
            checks.append(
                [
                    t,
                    rel_err(ours_lora(x), peft_lora(x)),
                    rel_err(ours_dora(x), peft_dora(x)),
                    rel_err(compiled_lora(x), peft_lora(x)) if compiled_lora else "-",
                    rel_err(compiled_dora(x), peft_dora(x)) if compiled_dora else "-",
                ]
            )
    header = ["tokens", "HQQ base (ms)"] + [f"{name} / base" for name, _ in pairs]
    text += print_table(f"Forward, {device}", header, rows)
    text += print_table(
        "Agreement with PEFT (relative error of the output)",
        ["tokens", "ours LoRA", "ours DoRA", "compiled LoRA", "compiled DoRA"],
        checks,
    )

    # Training step: forward and backward w.r.t. the adapter tensors.
    x = torch.randn(train_tokens, size, device=device, dtype=dtype)
    train = {k: v.detach().clone().requires_grad_(k != "scaling") for k, v in lora.items()}
    leaves = [train["lora_A"], train["lora_B"]]
    peft_lora.train()
    peft_leaves = [peft_lora.lora_A["default"].weight, peft_lora.lora_B["default"].weight]

    def step_peft():
        loss = peft_lora(x).float().square().mean()
        return torch.autograd.grad(loss, peft_leaves)

    def step_ours(fn):
        def step():
            loss = fn(train, x).float().square().mean()
            return torch.autograd.grad(loss, leaves)

        return step

    def fwd(p, xx):
        return hqqlora.apply_lora(layer, p, xx)

    train_rows = []
    base_ms = time_fn(lambda: layer(x), device)
    peft_ms = time_fn(step_peft, device)
    ours_ms = time_fn(step_ours(fwd), device)
    train_rows.append(["PEFT eager", peft_ms, peft_ms / base_ms, 1.0])
    train_rows.append(["ours eager", ours_ms, ours_ms / base_ms, ours_ms / peft_ms])
    if not args.no_compile:
        compiled_fwd = torch.compile(fwd, fullgraph=True, dynamic=False)
        comp_ms = time_fn(step_ours(compiled_fwd), device)
        train_rows.append(["ours compiled", comp_ms, comp_ms / base_ms, comp_ms / peft_ms])
        g_ref, g_comp = step_peft(), step_ours(compiled_fwd)()
        text += f"\ncompiled training-step gradient vs PEFT: rel err A {rel_err(g_comp[0], g_ref[0]):.2e}, B {rel_err(g_comp[1], g_ref[1]):.2e}\n"
    text += print_table(
        f"Training step (forward + backward w.r.t. A, B), {train_tokens} tokens, {device}; base forward {base_ms:.4g} ms",
        ["", "ms", "/ base forward", "/ PEFT"],
        train_rows,
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
