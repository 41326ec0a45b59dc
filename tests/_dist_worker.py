"""What each process of tests/test_distributed.py runs (spawned by torch.multiprocessing).

One spawned run of two gloo ranks does every multi-process check, to pay the
~3 s import of torch + hqq per process once: data-parallel training against one
process on the whole batch, collective counts, rank generators and dropout, and
last (it breaks the group) a rank that never joins the collective. Each rank
writes what it saw to ``out/rank<k>.pt``; the test process does the asserting.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import optree
import torch
import torch.distributed as dist
from hqq.core.quantize import BaseQuantizeConfig

import hqqlora
from hqqlora.distributed import all_reduce_mean, rank_generator

ROWS = 9  # split 5 / 4 over two ranks: unequal shares, so the loss weighting matters
STEPS = 4
TIMEOUT_S = 2.0


def tiny_model() -> torch.nn.Module:
    """Linear(32→48), ReLU, Linear(48→16), quantized 4-bit, group 16; the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    config = BaseQuantizeConfig(nbits=4, group_size=16)
    return hqqlora.quantize_model(
        model, config, compute_dtype=torch.float32, device="cpu", progress=False
    )


def tiny_adapters(model: torch.nn.Module) -> dict:
    """A DoRA adapter on layer 0 and a LoRA adapter on layer 2, A and B both random."""
    gen = torch.Generator().manual_seed(1)
    return {
        "0": hqqlora.init_lora(
            model[0], 4, 8, use_dora=True, init_lora_weights=False, generator=gen
        ),
        "2": hqqlora.init_lora(model[2], 4, 8, init_lora_weights=False, generator=gen),
    }


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(ROWS, 32, generator=gen), torch.randn(ROWS, 16, generator=gen)


def train(model, adapters, x, y, *, total_rows, world, reduce=None, dropout=None):
    """``STEPS`` AdamW steps of ``functional_call`` + ``torch.func.grad`` on rows ``x``, ``y``.

    The loss on these rows is ``(world / total_rows) · Σ_rows ‖f(x) − y‖²``, so the ranks'
    losses average to the mean over all ``total_rows`` rows. ``reduce`` averages the
    ``(grads, loss)`` tree over ranks; ``dropout`` is ``(p, generator)`` on layer 0's input.
    Returns the trained adapters (new tensors; ``adapters`` is left alone) and the losses.
    """
    trainable = {
        path: {k: v.clone() for k, v in p.items()}
        for path, p in hqqlora.trainable_params(adapters).items()
    }
    leaves = [leaf for p in trainable.values() for leaf in p.values()]
    optimizer = torch.optim.AdamW(leaves, lr=1e-2, weight_decay=0.01)
    weight = world / total_rows

    def loss_fn(trainable, x, y):
        full = {path: {**p, "scaling": adapters[path]["scaling"]} for path, p in trainable.items()}
        if dropout is None:
            out = hqqlora.functional_call(model, full, (x,))
        else:
            p, generator = dropout
            hidden = hqqlora.apply_lora(model[0], full["0"], x, dropout=p, generator=generator)
            out = hqqlora.apply_lora(model[2], full["2"], model[1](hidden))
        return weight * (out - y).square().sum()

    grad_and_loss = torch.func.grad_and_value(loss_fn)
    losses = []
    for _ in range(STEPS):
        grads, loss = grad_and_loss(trainable, x, y)
        if reduce is not None:
            grads, loss = reduce((grads, loss))
        for leaf, grad in zip(leaves, optree.tree_leaves(grads), strict=True):
            leaf.grad = grad
        optimizer.step()
        losses.append(loss.item())
    return trainable, losses


def run(rank: int, world: int, init_file: str, out: str) -> None:
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen: dict = {}
    model, x, y = tiny_model(), *batch()
    adapters = tiny_adapters(model)
    untouched = {path: {k: v.clone() for k, v in p.items()} for path, p in adapters.items()}
    rows = torch.tensor_split(torch.arange(ROWS), world)[rank]

    # (a) + (b): N ranks on their rows, gradients averaged; count the collectives.
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        seen["distributed"], seen["distributed_losses"] = train(
            model, adapters, x[rows], y[rows], total_rows=ROWS, world=world, reduce=all_reduce_mean
        )
    finally:
        dist.all_reduce = all_reduce
    seen["collectives"] = list(calls)
    seen["reduced_leaves"] = 1 + sum(len(p) for p in hqqlora.trainable_params(adapters).values())
    if rank == 0:  # one process on the whole batch, no collective
        seen["single"], seen["single_losses"] = train(
            model, adapters, x, y, total_rows=ROWS, world=1
        )
    seen["adapters_after"] = adapters
    seen["adapters_before"] = untouched

    # (c): per-rank generators: two runs with the same seed draw the same masks.
    seen["draws"] = torch.rand(8, generator=rank_generator(7))
    for run_index in range(2):
        seen[f"dropout_run{run_index}"], _ = train(
            model,
            adapters,
            x[rows],
            y[rows],
            total_rows=ROWS,
            world=world,
            reduce=all_reduce_mean,
            dropout=(0.5, rank_generator(7)),
        )

    # A known mean over ranks, across dtypes: leaf · (rank + 1) averages to leaf · 1.5.
    tree = {
        "a": torch.linspace(-1, 1, 10) * (rank + 1),
        "b": [torch.arange(5, dtype=torch.float64) * (rank + 1), None],
        "c": torch.full((3, 4), 2.0) * (rank + 1),
    }
    seen["mean_tree"] = all_reduce_mean(tree, bucket_bytes=16)
    torch.save(seen, out / f"rank{rank}.pt")

    # (d): rank 1 fails before the collective but stays alive; rank 0 must not hang.
    if rank == 1:
        try:
            raise RuntimeError("simulated failure before the collective")
        except RuntimeError:
            deadline = time.monotonic() + 60
            while not (out / "timeout0.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return
    started = time.monotonic()
    try:
        all_reduce_mean(tree, timeout=TIMEOUT_S)
        result = {"error": None}
    except Exception as error:
        result = {
            "error": type(error).__name__,
            "message": str(error),
            "trace": traceback.format_exc(),
        }
    result["elapsed"] = time.monotonic() - started
    torch.save(result, out / "timeout0.pt")
