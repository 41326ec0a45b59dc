"""Data-parallel and sharded LoRA training throughput over Llama-3-8B-shaped quantized blocks.

torchrun --nproc-per-node 1 benchmarks/bench_distributed.py      # the 1-GPU baseline
torchrun --nproc-per-node 2 benchmarks/bench_distributed.py      # 2 GPUs, NCCL
torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --tiny   # CPU, gloo, tiny shapes

A stack of ``--blocks`` blocks shaped like Llama-3-8B's (hidden 4096, q/o 4096×4096,
k/v 1024×4096, gate/up 14336×4096, down 4096×14336), every linear quantized by HQQ on
the GPU (4-bit, group 64, bf16) with an r=16 LoRA adapter (bf16, lora_alpha 32).
Each block is ``h += o(q ⊙ repeat(silu(k) ⊙ v, 4))`` (a stand-in for attention with
GQA-shaped projections, no softmax: the seven quantized linears carry the work, which
is what hqqlora does) then ``h += down(silu(gate(h)) ⊙ up(h))``, RMS-normed inputs.
Every rank trains on ``--batch`` sequences of ``--seq`` tokens per step (random
hidden states, loss = mean square of the output), with AdamW, in three modes:

* ``functional``: plain HQQ layers, ``hqqlora.functional_call`` + ``torch.func.grad_and_value``,
  ``hqqlora.all_reduce_mean`` over the gradients, AdamW on the adapter leaves;
* ``ddp``: shims (``inject_adapter``) in ``DistributedDataParallel``;
* ``fsdp2``: shims sharded by ``hqqlora.distributed.shard_quantized`` (codes, scales,
  zeros and adapters sharded), one FSDP2 unit per block (its default): FSDP2 gathers a
  block for its forward and again for its backward;
* ``fsdp2-layers`` (on request): one unit per HQQ layer (``units="layers"``);
* ``fsdp2-keep`` (on request): per layer, gathered once per step
  (``reshard_after_forward=False``);
* ``fsdp2-prefetch`` (on request): per block, with FSDP2's explicit prefetching (each
  block's forward issues the next block's all-gather, its backward the previous one's).

Each mode gets its own copy of the same quantized weights (quantized once, kept on the
host between modes), ``--warmup`` untimed steps, then ``--steps`` steps timed between
``torch.cuda.synchronize()`` calls. Rank 0 prints one markdown row per mode: world size,
tokens/s over all ranks, per GPU, the bytes of the quantized base this rank holds
(``hqqlora.distributed.quantized_bytes``: local shards under FSDP2), and the peak of
``torch.cuda.max_memory_allocated`` over ranks during the mode.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import os
import time
import warnings

import torch
import torch.distributed as dist
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn
from torch.nn import functional as F

import hqqlora
from hqqlora.distributed import (
    all_reduce_mean,
    quantized_bytes,
    shard_quantized,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("functional", "ddp", "fsdp2", "fsdp2-layers", "fsdp2-keep", "fsdp2-prefetch")


class Block(nn.Module):
    """A Llama-shaped block: GQA-shaped projections (attention stand-in), then a SiLU MLP."""

    def __init__(self, hidden: int, kv: int, ffn: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.groups = hidden // kv

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(h, h.shape[-1:])
        mix = F.silu(self.k_proj(x)) * self.v_proj(x)
        h = h + self.o_proj(self.q_proj(x) * mix.repeat_interleave(self.groups, dim=-1))
        x = F.rms_norm(h, h.shape[-1:])
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _move(layer: HQQLinear, device: torch.device) -> None:
    """Moves an HQQ layer's codes, scale and zero (HQQ's ``.to``/``.cpu`` do nothing)."""
    layer.W_q.data = layer.W_q.data.to(device)
    for key in ("scale", "zero"):
        layer.meta[key] = layer.meta[key].to(device)
    layer.device = str(device)


def quantized_stack(args, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    """The quantized blocks, the same on every rank (seeded), kept on the host."""
    torch.manual_seed(0)
    blocks = []
    config = BaseQuantizeConfig(nbits=4, group_size=args.group_size)
    for _ in range(args.blocks):
        block = Block(args.hidden, args.kv, args.ffn).to(device=device, dtype=dtype)
        with torch.no_grad():
            for linear in block.children():
                linear.weight.normal_(0, linear.in_features**-0.5)
        hqqlora.quantize_model(block, config, compute_dtype=dtype, device=device, progress=False)
        for name in TARGETS:
            _move(getattr(block, name), torch.device("cpu"))
        blocks.append(block)
    return nn.Sequential(*blocks)


def on_device(stack: nn.Sequential, device: torch.device) -> nn.Sequential:
    model = copy.deepcopy(stack)
    for block in model:
        for name in TARGETS:
            _move(getattr(block, name), device)
    return model


def bf16_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def functional_mode(model, x, args, dtype):
    adapters = {
        path: hqqlora.init_lora(layer, args.rank, 2 * args.rank, dtype=dtype)
        for path, layer in hqqlora._model.hqq_layers(model).items()
    }
    trainable = hqqlora.trainable_params(adapters)
    leaves = [leaf for p in trainable.values() for leaf in p.values()]
    optimizer = torch.optim.AdamW(leaves, lr=1e-4)

    def loss_fn(trainable, x):
        full = {path: {**p, "scaling": adapters[path]["scaling"]} for path, p in trainable.items()}
        return hqqlora.functional_call(model, full, (x,)).float().square().mean()

    grad_and_loss = torch.func.grad_and_value(loss_fn)

    def step():
        grads, loss = all_reduce_mean(grad_and_loss(trainable, x))
        for path, p in trainable.items():
            for key, leaf in p.items():
                leaf.grad = grads[path][key]
        optimizer.step()
        return loss

    return step


def module_step(model, x):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def build_mode(mode, stack, x, args, device, dtype):
    model = on_device(stack, device)
    if mode == "functional":
        return model, functional_mode(model, x, args, dtype)
    hqqlora.inject_adapter(model, target_modules=TARGETS, r=args.rank, lora_alpha=2 * args.rank)
    bf16_adapters(model, dtype)
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model, module_step(wrapped, x)
    # fsdp2: shard_quantized's default, one FSDP2 unit per block; fsdp2-layers: one per
    # HQQ layer; fsdp2-keep: per layer, gathered once per step (not again for backward).
    units = "blocks" if mode in ("fsdp2", "fsdp2-prefetch") else "layers"
    shard_quantized(model, units=units, reshard_after_forward=mode != "fsdp2-keep")
    if mode == "fsdp2-prefetch":
        blocks = list(model)
        for before, after in itertools.pairwise(blocks):
            before.set_modules_to_forward_prefetch([after])
            after.set_modules_to_backward_prefetch([before])
    return model, module_step(model, x)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode, stack, args, device, dtype, world):
    gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype, generator=gen)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, step = build_mode(mode, stack, x, args, device, dtype)
    base_bytes = quantized_bytes(model)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    if args.profile and device.type == "cuda":  # every rank steps (collectives), rank 0 prints
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
    if args.profile and device.type == "cuda" and dist.get_rank() == 0:
        print(f"## {mode}, rank 0, one step")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=12, max_name_column_width=50
            )
        )
    if not torch.isfinite(loss):
        raise RuntimeError(f"{mode}: the loss is not finite ({loss.item()})")
    stats = torch.tensor(
        [elapsed, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0.0],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the largest peak
    del model, step
    gc.collect()
    tokens = world * args.batch * args.seq * args.steps
    return {
        "tokens_s": tokens / stats[0].item(),
        "base_mib": base_bytes / 2**20,
        "peak_mib": stats[1].item() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU with gloo")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES[:3]))
    parser.add_argument("--profile", action="store_true", help="profile one step per mode")
    args = parser.parse_args()
    # The LoRA term comes back as a view (addmm on the flattened rows); these blocks add
    # out of place, so the in-place hazard FSDP2 warns about does not arise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    args.hidden, args.kv, args.ffn, args.group_size = 4096, 1024, 14336, 64
    if args.tiny:
        args.hidden, args.kv, args.ffn, args.group_size = 64, 16, 128, 16
        args.blocks, args.batch, args.seq, args.warmup, args.steps = 2, 2, 8, 1, 2
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: expected names among {MODES}, got {modes}")

    if args.tiny:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    else:
        if not torch.cuda.is_available():
            parser.error("expected a CUDA device (or --tiny for CPU)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dtype, backend = torch.bfloat16, "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        stack = quantized_stack(args, device, dtype)
        results = {mode: run_mode(mode, stack, args, device, dtype, world) for mode in modes}
        if rank == 0:
            _report(args, results, world, device, dtype)
    finally:
        dist.destroy_process_group()


def _report(args, results, world, device, dtype) -> None:
    import hqq

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
    print(
        f"device: {world} × {name} | torch {torch.__version__} | hqq "
        f"{getattr(hqq, '__version__', '?')} | {args.blocks} blocks of hidden {args.hidden}, "
        f"kv {args.kv}, ffn {args.ffn} | 4-bit group {args.group_size}, r={args.rank}, {dtype} | "
        f"{args.batch}×{args.seq} tokens per rank per step, {args.warmup} warmup + "
        f"{args.steps} timed steps"
    )
    print()
    print("| mode | GPUs | tokens/s | tokens/s per GPU | quantized base MiB per GPU | peak MiB |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode} | {world} | {r['tokens_s']:.0f} | {r['tokens_s'] / world:.0f} | "
            f"{r['base_mib']:.4g} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
