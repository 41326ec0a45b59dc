"""Decode at the bandwidth floor (CUDA): one layer, mixed-adapter batches, a whole model.

    python benchmarks/bench_decode.py [--tune] [--blocks 4] [--out RESULTS.md]

Every figure is measured in this one run on one device, side by side:

- GPU time: the sum of the kernel times of one call (torch.profiler, memsets included),
- wall time: the median time of one call (triton.testing.do_bench); "graph" rows
  replay a CUDA graph of the call, so their wall time has no Python in it,
- floor: the bytes the call must read (packed codes, scales and zeros, the adapters
  it uses, each once) divided by the copy bandwidth measured in this run,
- error: ``‖y − y64‖ / ‖y64‖`` against the float64 product with HQQ's dequantized
  weight (plus the adapter term in float64 where there is one).

Anchors: gemlite's A16Wn kernels on the very same HQQ weights
(``gemlite.helper.A16Wn().from_hqqlinear``, no adapter), dense bf16 (cuBLAS), HQQ's
own forward, PEFT's HqqLoraLinear.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton.testing
from common import environment, make_hqq_layer, peft_module, print_table

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_tensors

DTYPE = torch.bfloat16
RANK = 16


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def profiled(fn, calls: int, warmup: int = 3):
    """torch.profiler's record (CUDA activity) of ``calls`` calls of ``fn``, after
    ``warmup`` calls outside it."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_us(fn, calls: int = 30) -> dict[str, float]:
    """GPU time per call of each CUDA kernel (and memset/memcpy) ``fn`` launches, by
    name, from torch.profiler."""
    prof = profiled(fn, calls)
    return {
        e.key: e.self_device_time_total / calls
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    }


def gpu_us(fn, calls: int = 30) -> float:
    """Sum of CUDA kernel (and memset/memcpy) times per call, from torch.profiler."""
    return sum(kernel_us(fn, calls).values())


def wall_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


def graphed(fn):
    """A CUDA graph of ``fn()`` (warmed up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    return graph.replay, out


def graph_us(fn) -> float:
    """Time per call of ``fn`` captured many times in one CUDA graph (Triton's
    ``do_bench_cudagraph``): GPU time with the gaps between kernels, no host launch time."""
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def layer_bytes(layer) -> int:
    W_q, scale, zero = quant_tensors(layer)
    return sum(t.numel() * t.element_size() for t in (W_q, scale, zero))


def params_bytes(p) -> int:
    return sum(v.numel() * v.element_size() for k, v in p.items() if k != "scaling")


def gemlite_of(layer):
    try:
        from gemlite.helper import A16Wn

        return A16Wn(device="cuda", dtype=DTYPE).from_hqqlinear(layer, del_orig=False)
    except Exception as exc:  # gemlite missing or refusing the layer: the table says so
        print(f"gemlite unavailable: {type(exc).__name__}: {exc}")
        return None


def adapter(layer, *, dtype=torch.float32, dora=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = layer.meta["shape"]
    p = {
        "lora_A": (torch.randn(RANK, in_f, generator=gen) / in_f**0.5).to("cuda", dtype),
        "lora_B": (torch.randn(out_f, RANK, generator=gen) * 0.02).to("cuda", dtype),
        "scaling": torch.tensor(2.0, device="cuda"),
    }
    if dora:
        p["magnitude"] = (hqqlora.dora_weight_norm(layer, p) * 1.05).float()
    return p


def reference(layer, x, p=None):
    W = hqqlora.dequantize(layer).double()
    y = x.double() @ W.T
    if p is not None:
        s = float(p["scaling"])
        lora = s * (x.double() @ p["lora_A"].double().T) @ p["lora_B"].double().T
        if "magnitude" in p:
            n = torch.linalg.norm(W + s * p["lora_B"].double() @ p["lora_A"].double(), dim=1)
            y = (p["magnitude"].double() / n) * (y + lora)
        else:
            y = y + lora
    return y


def single_layer_table(bw: float) -> str:
    rows = []
    for out_f, in_f in [(4096, 4096), (14336, 4096)]:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        gl = gemlite_of(layer)
        dense_w = hqqlora.dequantize(layer)
        lora32 = adapter(layer)
        lora16 = adapter(layer, dtype=DTYPE)
        dora32 = adapter(layer, dora=True)
        norm = hqqlora.dora_weight_norm(layer, dora32)
        peft_lora = peft_module(layer, lora32, r=RANK, lora_alpha=2 * RANK)
        for tokens in (1, 16):
            x = torch.randn(tokens, in_f, device="cuda", dtype=DTYPE)
            floor = (layer_bytes(layer) + params_bytes(lora32)) / bw * 1e6
            floor_base = layer_bytes(layer) / bw * 1e6
            variants = {
                "gemlite base": (lambda: gl(x), None) if gl is not None else None,
                "dense bf16 cuBLAS": (lambda: x @ dense_w.T, None),
                "HQQ base": (lambda: layer(x), None),
                "ours base": (lambda: hqqlora.base_forward(layer, x), None),
                "ours LoRA fp32": (lambda: hqqlora.apply_lora(layer, lora32, x), lora32),
                "ours LoRA bf16": (lambda: hqqlora.apply_lora(layer, lora16, x), lora16),
                "ours DoRA fp32": (
                    lambda: hqqlora.apply_lora(layer, dora32, x, weight_norm=norm),
                    dora32,
                ),
                "ours LoRA fp32 exact (dense)": (
                    lambda: hqqlora.apply_lora(layer, lora32, x, exact=True),
                    lora32,
                ),
                "PEFT LoRA fp32": (lambda: peft_lora(x), lora32),
            }
            compiled = torch.compile(
                lambda xx: hqqlora.apply_lora(layer, lora32, xx), fullgraph=True, dynamic=False
            )
            variants["ours LoRA fp32 compiled"] = (lambda: compiled(x), lora32)
            base_gemlite = base_graph = None
            with torch.no_grad():
                for name, item in variants.items():
                    if item is None:
                        rows.append([f"{out_f}x{in_f}", tokens, name, "n/a", "", "", "", ""])
                        continue
                    fn, p = item
                    try:
                        y = fn()
                        err = rel(y, reference(layer, x, p))
                        g = gpu_us(fn)
                        w = wall_us(fn)
                        try:
                            gw = graph_us(fn)
                        except Exception:
                            gw = float("nan")
                    except Exception as exc:
                        rows.append(
                            [
                                f"{out_f}x{in_f}",
                                tokens,
                                name,
                                f"error {type(exc).__name__}: {str(exc)[:60]}",
                                "",
                                "",
                                "",
                                "",
                            ]
                        )
                        continue
                    if name == "gemlite base":
                        base_gemlite, base_graph = g, gw
                    # Programmatic dependent launch overlaps our two kernels, so the sum of
                    # kernel times counts the overlap twice: the graph replay ratio is fair.
                    ratio = (
                        f"{g / base_gemlite:.2f} / {gw / base_graph:.2f}" if base_gemlite else ""
                    )
                    fl = floor_base if p is None else floor
                    rows.append(
                        [f"{out_f}x{in_f}", tokens, name, f"{g:.1f}", f"{w:.1f}", f"{gw:.1f}",
                         f"{fl:.1f}", ratio, f"{err:.2e}"]
                    )  # fmt: skip
    return print_table(
        "One layer, 4-bit g64, r=16, bf16 x: GPU time per call (profiler), wall (eager), graph (many calls in one CUDA graph), µs",
        [
            "layer",
            "tokens",
            "path",
            "GPU µs",
            "wall µs",
            "graph µs",
            "floor µs",
            "× gemlite (GPU / graph)",
            "rel err",
        ],
        rows,
    )


def mixed_table(bw: float) -> str:
    rows = []
    out_f = in_f = 4096
    layer = make_hqq_layer(in_f, out_f, device="cuda")
    gl = gemlite_of(layer)
    x64 = torch.randn(64, 1, in_f, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        if gl is not None:
            g = gpu_us(lambda: gl(x64[:, 0]))
            rows.append(
                [
                    "gemlite base, 64 tokens",
                    "-",
                    "-",
                    f"{g:.1f}",
                    "",
                    f"{layer_bytes(layer) / bw * 1e6:.1f}",
                    "",
                    "",
                ]
            )
        base_g = gpu_us(lambda: layer(x64[:, 0]))
        rows.append(["HQQ base, 64 tokens", "-", "-", f"{base_g:.1f}", "", "", "", ""])
        for kind in ("LoRA", "DoRA"):
            adapters = {f"a{i}": adapter(layer, dora=kind == "DoRA", seed=i) for i in range(64)}
            bank = hqqlora.stack_adapters(adapters)
            norm = hqqlora.bank_weight_norm(layer, bank) if kind == "DoRA" else None
            per_adapter = params_bytes(adapters["a0"]) + (out_f * 4 if kind == "DoRA" else 0)
            for distinct in (1, 16, 64):
                index = (torch.arange(64, device="cuda") % distinct).to(torch.int64)
                floor = (layer_bytes(layer) + distinct * per_adapter) / bw * 1e6

                def fn(index=index):
                    return hqqlora.mixed_batch_indexed(
                        x64, bank, index, base=layer, weight_norm=norm
                    )

                def old(index=index):
                    return hqqlora.mixed_batch_indexed(
                        x64, bank, index, base=layer, weight_norm=norm, exact=True
                    )

                y = fn()
                errs = []
                for i in (0, distinct - 1, 63):
                    p = adapters[f"a{int(index[i])}"]
                    errs.append(rel(y[i], reference(layer, x64[i], p)))
                g = gpu_us(fn)
                gw = graph_us(fn)
                g_old = gpu_us(old)
                rows.append(
                    [f"{kind} 64×1 token", distinct, f"{g_old:.1f}", f"{g:.1f}", f"{gw:.1f}",
                     f"{floor:.1f}", f"{g / floor:.2f} / {gw / floor:.2f}", f"{max(errs):.2e}"]
                )  # fmt: skip
        # prefill: 64 sequences × 128 tokens, 64 distinct float32 adapters
        adapters = {f"a{i}": adapter(layer, seed=i) for i in range(64)}
        for dtype in (torch.float32, DTYPE):
            bank = hqqlora.stack_adapters(
                {
                    k: {n: (v.to(dtype) if n != "scaling" else v) for n, v in p.items()}
                    for k, p in adapters.items()
                }
            )
            xp = torch.randn(64, 128, in_f, device="cuda", dtype=DTYPE)
            index = torch.arange(64, device="cuda")
            g = gpu_us(
                lambda bank=bank: hqqlora.mixed_batch_indexed(xp, bank, index, base=layer), calls=5
            )
            hq = gpu_us(lambda: layer(xp), calls=5)
            rows.append(
                [f"prefill 64×128, {str(dtype)[6:]} adapters", 64, "", f"{g:.1f}", "", "", f"{g / hq:.2f}× HQQ base ({hq:.0f} µs)", ""]
            )  # fmt: skip
    return print_table(
        "Mixed-adapter batches, 4096², 4-bit g64, r=16, float32 adapters (the default) unless said",
        [
            "batch",
            "distinct adapters",
            "dense path GPU µs",
            "GPU µs",
            "graph µs",
            "floor µs",
            "× floor (GPU / graph)",
            "rel err",
        ],
        rows,
    )


SHAPES = {
    "q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
    "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336),
}  # fmt: skip


def llama_layers(blocks: int, device: str = "cuda") -> list[dict]:
    """``blocks`` Llama-3-8B-shaped blocks of HQQ layers (names of :data:`SHAPES`)."""
    return [
        {
            n: make_hqq_layer(i, o, device=device, seed=b * 7 + j)
            for j, (n, (o, i)) in enumerate(SHAPES.items())
        }
        for b in range(blocks)
    ]


def decode_step(x, blocks: int, linear):
    """One decode step through ``blocks`` Llama-shaped blocks from ``x``: ``linear(b,
    name, h)`` is the layer ``name`` of block ``b`` applied to ``h`` (attention reduced to
    its projections, k and v computed and dropped)."""
    h = x
    for blk in range(blocks):
        q = linear(blk, "q", h)
        linear(blk, "k", h)
        linear(blk, "v", h)
        h = h + linear(blk, "o", q)
        g = linear(blk, "gate", h)
        u = linear(blk, "up", h)
        h = h + linear(blk, "down", torch.nn.functional.silu(g) * u)
    return h


def model_table(bw: float, blocks: int, with_peft: bool) -> str:
    """One decode step of ``blocks`` Llama-3-8B-shaped blocks for 64 sequences."""
    layers = llama_layers(blocks)
    n_adapters = 64
    banks, bank_bytes_each = [], []
    for blk in layers:
        bb, by = {}, {}
        for name, layer in blk.items():
            ads = {f"a{i}": adapter(layer, seed=i) for i in range(n_adapters)}
            bb[name] = hqqlora.stack_adapters(ads)
            by[name] = params_bytes(ads["a0"])
        banks.append(bb)
        bank_bytes_each.append(by)
    x = torch.randn(64, 1, 4096, device="cuda", dtype=DTYPE)
    codes = sum(layer_bytes(layer) for blk in layers for layer in blk.values())

    def step(linear):
        return decode_step(x, blocks, linear)

    rows = []
    results = {}
    gls = [{n: gemlite_of(layer) for n, layer in blk.items()} for blk in layers]
    with torch.no_grad():
        if all(g is not None for blk in gls for g in blk.values()):
            replay, _ = graphed(
                lambda: step(
                    lambda b, n, h: gls[b][n](h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
                )
            )
            results["gemlite base, no adapters (graph)"] = (wall_us(replay), gpu_us(replay), codes)
        for distinct in (1, 64):
            index = (torch.arange(64, device="cuda") % distinct).to(torch.int64)
            fn = lambda index=index: step(  # noqa: E731
                lambda b, n, h: hqqlora.mixed_batch_indexed(
                    h, banks[b][n], index, base=layers[b][n]
                )
            )
            replay, _ = graphed(fn)
            read = codes + distinct * sum(sum(by.values()) for by in bank_bytes_each)
            results[f"hqqlora, {distinct} distinct adapter(s) (graph)"] = (
                wall_us(replay),
                gpu_us(replay),
                read,
            )
        if with_peft:
            try:
                from peft.tuners.lora.hqq import HqqLoraLinear  # noqa: F401

                mods = []
                for b, blk in enumerate(layers):
                    mb = {}
                    for name, layer in blk.items():
                        m = None
                        for i in range(n_adapters):
                            p = {
                                k: v[i]
                                if k in ("lora_A", "lora_B")
                                else torch.tensor(float(banks[b][name].scaling[i]))
                                for k, v in banks[b][name]._asdict().items()
                                if k in ("lora_A", "lora_B", "scaling")
                            }
                            m = peft_module(
                                layer,
                                p,
                                r=RANK,
                                lora_alpha=2 * RANK,
                                adapter_name=f"a{i}",
                                module=m,
                            )
                        mb[name] = m
                    mods.append(mb)
                names = [f"a{i}" for i in range(64)]
                fn = lambda: step(lambda b, n, h: mods[b][n](h, adapter_names=names))  # noqa: E731
                times = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t = triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median")
                    times.append(t * 1e3)
                results["PEFT eager, 64 distinct adapters"] = (
                    statistics.median(times),
                    gpu_us(fn, calls=2),
                    None,
                )
            except Exception as exc:
                print(f"PEFT whole-model run failed: {type(exc).__name__}: {exc}")
    floor_64 = (codes + 64 * sum(sum(by.values()) for by in bank_bytes_each)) / bw * 1e6
    floor_1 = (codes + sum(sum(by.values()) for by in bank_bytes_each)) / bw * 1e6
    gem = results.get("gemlite base, no adapters (graph)")
    for name, (w, g, read) in results.items():
        tps = 64 / (w * 1e-6)
        floor = read / bw * 1e6 if read else None
        rows.append(
            [name, f"{w:.0f}", f"{g:.0f}", f"{tps:,.0f}", f"{floor:.0f}" if floor else "",
             f"{w / floor:.2f}" if floor else "", f"{tps / (64 / (gem[0] * 1e-6)):.2f}" if gem else ""]
        )  # fmt: skip
    rows.append(
        ["floor, 1 adapter", f"{floor_1:.0f}", "", f"{64 / (floor_1 * 1e-6):,.0f}", "", "", ""]
    )
    rows.append(
        ["floor, 64 adapters", f"{floor_64:.0f}", "", f"{64 / (floor_64 * 1e-6):,.0f}", "", "", ""]
    )
    return print_table(
        f"Whole-model decode step: {blocks} Llama-3-8B-shaped blocks (q,o 4096², k,v 1024×4096, gate/up 14336×4096, down 4096×14336), 4-bit g64, 64 sequences × 1 token, r=16 float32 adapters",
        [
            "path",
            "step µs (wall)",
            "GPU µs",
            "tokens/s",
            "floor µs",
            "× floor",
            "× gemlite throughput",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune", action="store_true", help="tune the kernels first (minutes)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--only", default="single,mixed,model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = environment("cuda")
    print(env)
    if args.tune:
        from tune_decode import tune

        best = tune(verbose=True)
        _decode.TUNED.update(best)
        print("TUNED = {")
        for key, config in sorted(best.items()):
            print(f"    {key}: {config},")
        print("}")
    bw = copy_bandwidth()
    text = f"{env}\n\ncopy bandwidth {bw / 1e12:.2f} TB/s\n\n"
    only = args.only.split(",")
    for name, fn in (
        ("single", lambda: single_layer_table(bw)),
        ("mixed", lambda: mixed_table(bw)),
        ("model", lambda: model_table(bw, args.blocks, not args.no_peft)),
    ):
        if name in only:
            try:
                text += fn() + "\n"
            except Exception as exc:
                import traceback

                traceback.print_exc()
                text += f"{name}: failed: {type(exc).__name__}: {exc}\n"
            if args.out:  # after each table, so a run cut short keeps what it measured
                with open(args.out, "a") as f:
                    f.write(text)
                text = ""


if __name__ == "__main__":
    main()
