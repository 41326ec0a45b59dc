"""Shared benchmark plumbing: layers, timing, environment, tables."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def environment(device: str) -> str:
    """One line naming the device and the versions beside every number."""
    import hqq
    import peft

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = (
            f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        )
    return (
        f"device: {name} | torch {torch.__version__} | hqq {getattr(hqq, '__version__', '0.2.8.post1')}"
        f" | peft {peft.__version__} | python {platform.python_version()}"
    )


def time_fn(fn: Callable[[], object], device: str, *, reps: int = 50) -> float:
    """Median time of `fn()` in milliseconds: device events on CUDA, perf_counter on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_hqq_layer(
    in_features,
    out_features,
    *,
    nbits=4,
    group_size=64,
    dtype=torch.bfloat16,
    device="cpu",
    bias=False,
    seed=0,
):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(
            torch.randn(out_features, in_features, generator=gen) / in_features**0.5
        )
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    return HQQLinear(linear, config, compute_dtype=dtype, device=device)


def random_params(layer, r, *, dtype, dora=False, seed=1, scaling=2.0):
    import hqqlora

    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = layer.meta["shape"]
    device = layer.W_q.device
    p = {
        "lora_A": (torch.randn(r, in_features, generator=gen) / in_features**0.5).to(device, dtype),
        "lora_B": (torch.randn(out_features, r, generator=gen) * 0.01).to(device, dtype),
        "scaling": torch.tensor(scaling, device=device),
    }
    if dora:
        p["magnitude"] = hqqlora.dora_weight_norm(layer, p) * 1.1
    return p


def peft_module(layer, params, *, r, lora_alpha, adapter_name="default", module=None):
    """PEFT's HqqLoraLinear over `layer` (or a new adapter on `module`) holding `params`."""
    from peft import LoraConfig
    from peft.tuners.lora.hqq import HqqLoraLinear

    dora = "magnitude" in params
    config = LoraConfig(r=r, lora_alpha=lora_alpha, use_dora=dora, init_lora_weights=False)
    if module is None:
        module = HqqLoraLinear(layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha)
    else:
        module.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
    dtype, device = params["lora_A"].dtype, params["lora_A"].device
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if adapter_name in getattr(module, name):
            getattr(module, name)[adapter_name].to(device=device, dtype=dtype)
    with torch.no_grad():
        module.lora_A[adapter_name].weight.copy_(params["lora_A"])
        module.lora_B[adapter_name].weight.copy_(params["lora_B"])
        module.scaling[adapter_name] = float(params["scaling"])
        if dora:
            module.lora_magnitude_vector[adapter_name].weight.copy_(params["magnitude"])
    return module.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def print_table(title: str, header: list[str], rows: list[list[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def profile_kernels(fn: Callable[[], object], name: str, *, calls: int, top: int) -> None:
    """Prints the CUDA kernel time per call of ``fn`` (torch.profiler) and its top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in events) / calls
    print(f"\n## {name}: GPU kernel time per call {gpu_us:.1f} us")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / calls:8.1f} us  x{e.count // calls}  {e.key[:100]}")
