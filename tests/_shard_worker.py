"""What each process of tests/test_shard.py runs (spawned by torch.multiprocessing).

One spawned run of two gloo ranks does every FSDP2 check: the same model, one copy
kept whole as the reference, the other sharded by ``shard_quantized``; forward,
backward (two ranks on their rows against the whole batch), DoRA, gathered
``merge``/``merge_report``/``dequantize``, memory held per rank, and sharded
checkpoints (``save_adapter`` on every rank, ``load_adapter`` + ``assign_adapter``).
Each rank writes what it saw to ``out/rank<k>.pt``; the test process asserts.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import hqqlora
from hqqlora.distributed import all_reduce_mean, gathered, quantized_bytes, shard_quantized
from tests.test_model import make_model

ROWS = 5  # 3 + 2 rows over two ranks: unequal shares
PATHS = ("fc1", "block.fc2")  # adapted; fc3 stays a plain HQQLinear, sharded too
ADAPTERS = {  # name -> (r, lora_alpha, use_dora); r=3 shards unevenly (2 + 1 rows)
    "default": (3, 6, False),
    "dora": (4, 8, True),
}


def build() -> torch.nn.Module:
    """Tiny (fc1 → gelu → + block.fc2 → fc3, 4-bit, group 16, fp32) with two adapters, random."""
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    for name, (r, alpha, dora) in ADAPTERS.items():
        hqqlora.inject_adapter(
            model,
            name,
            target_modules=list(PATHS),
            r=r,
            lora_alpha=alpha,
            use_dora=dora,
            init_lora_weights=False,
        )
    with torch.no_grad():
        for path in PATHS:
            shim = model.get_submodule(path)
            for layer in (*shim.lora_A.values(), *shim.lora_B.values()):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.3)
            for magnitude in shim.lora_magnitude_vector.values():
                magnitude.weight.mul_(1 + 0.1 * torch.rand(magnitude.weight.shape, generator=gen))
    return model


def glue() -> torch.nn.Linear:
    """A frozen 16 → 32 linear, so that built models stack."""
    linear = torch.nn.Linear(16, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 16, generator=torch.Generator().manual_seed(5)) / 4)
        linear.bias.zero_()
    linear.requires_grad_(False)
    return linear


def fsdp2_runs_under_torch_func() -> bool:
    """Whether this torch's FSDP2 supports torch.func transforms (2.13 does, 2.11 does not).

    FSDP2's forward hook applies an autograd.Function to the unit's inputs; functorch
    refuses one without ``setup_context``, which torch 2.11's lacks.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    return "setup_context" in vars(_fsdp_param_group.RegisterPostBackwardFunction)


def batch() -> torch.Tensor:
    return torch.randn(ROWS, 32, generator=torch.Generator().manual_seed(4))


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the HQQ layers hold: parameters (local shards), buffers, meta."""
    total = 0
    for module in model.modules():
        if not isinstance(module, hqqlora.HqqLoraLinear) and hasattr(module, "W_q"):
            tensors = [*module.parameters(), *module.buffers()]
            tensors += [v for v in module.meta.values() if isinstance(v, torch.Tensor)]
            tensors += [] if isinstance(module.bias, torch.nn.Parameter) else [module.bias]
            for t in tensors:
                if t is None:
                    continue
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def adapter_grads(model: torch.nn.Module, name: str) -> dict:
    return {
        path: {k: whole(v.grad) for k, v in params.items() if k != "scaling"}
        for path, params in hqqlora.get_adapter(model, name).items()
    }


def step(model, x, *, rows, world, name):
    """Forward on ``rows`` of ``x`` with adapter ``name`` active, loss weighted to the batch mean."""
    hqqlora.set_adapter(model, name)
    model.zero_grad(set_to_none=True)
    y = model(x[rows])
    loss = (world / ROWS) * y.square().sum()
    loss.backward()
    return whole(y), adapter_grads(model, name)


def layer_views(model: torch.nn.Module) -> dict:
    """Dequantized base, merged layers and merge reports, per layer and adapter."""
    views = {"dequant": {}, "merged": {}, "report": {}}
    for path in (*PATHS, "fc3"):
        module = model.get_submodule(path)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        views["dequant"][path] = hqqlora.dequantize(base).clone()
        if path == "fc3":
            continue
        for name in ADAPTERS:
            params = {k: whole(v) for k, v in module.adapter_params(name).items()}
            merged = hqqlora.merge(base, params)
            views["merged"][path, name] = hqqlora.dequantize(merged).clone()
            views["report"][path, name] = hqqlora.merge_report(base, params, merged=merged)
    return views


def full_adapter(model, name):
    return {
        path: {k: whole(v) for k, v in params.items()}
        for path, params in hqqlora.get_adapter(model, name).items()
    }


def run(rank: int, world: int, init_file: str, out: str) -> None:
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen: dict = {}
    x = batch()
    rows = torch.tensor_split(torch.arange(ROWS), world)[rank]
    model = build()
    reference = copy.deepcopy(model)
    seen["bytes_whole"] = held_bytes(model), quantized_bytes(model)

    shard_quantized(model)
    seen["units"] = sorted(p for p, m in model.named_modules() if isinstance(m, FSDPModule))
    seen["bytes_local"] = held_bytes(model), quantized_bytes(model)
    seen["meta_tensors"] = sorted(
        f"{path}:{k}"
        for path, m in model.named_modules()
        if hasattr(m, "meta") and isinstance(m.meta, dict)
        for k, v in m.meta.items()
        if isinstance(v, torch.Tensor)
    )
    seen["adapters"] = {name: full_adapter(reference, name) for name in ADAPTERS}

    # Forward and backward: the reference on the whole batch, the shards on their rows.
    for name in ADAPTERS:
        seen["ref", name] = step(reference, x, rows=slice(None), world=1, name=name)
        seen["sharded", name] = step(model, x, rows=rows, world=world, name=name)
    with torch.no_grad():
        seen["eval_ref"] = reference.eval()(x)
        seen["eval_sharded"] = model.eval()(x)
    reference.train(), model.train()

    # Gathered layers: dequantize, merge, merge_report as on the whole model.
    seen["views_ref"] = layer_views(reference)
    with gathered(model):
        seen["views_gathered"] = layer_views(model)
    try:
        hqqlora.dequantize(model.fc3)
        seen["shard_error"] = None
    except ValueError as error:
        seen["shard_error"] = str(error)

    # The functional way over a sharded base: functional_call, torch.func.grad, all_reduce_mean.
    adapters = seen["adapters"]["dora"]

    def loss_fn(trainable, module, rows, world):
        full = {p: {**a, "scaling": adapters[p]["scaling"]} for p, a in trainable.items()}
        return (world / ROWS) * hqqlora.functional_call(module, full, (x[rows],)).square().sum()

    trainable = hqqlora.trainable_params(adapters)
    seen["functional_ref"] = torch.func.grad(loss_fn)(trainable, reference, slice(None), 1)
    seen["functional_sharded"] = None
    if fsdp2_runs_under_torch_func():
        grads = torch.func.grad(loss_fn)(trainable, model, rows, world)
        seen["functional_sharded"] = all_reduce_mean(grads)

    # Checkpoints: one folder from every rank's call; then zeroed adapters loaded back.
    writes = []
    replace_folder = hqqlora._io.replace_folder
    hqqlora._io.replace_folder = lambda *a, **k: (writes.append(a[0]), replace_folder(*a, **k))
    for name, (r, alpha, dora) in ADAPTERS.items():
        folder = out / f"adapter_{name}"
        hqqlora.save_adapter(
            folder, hqqlora.get_adapter(model, name), r=r, lora_alpha=alpha, use_dora=dora
        )
        seen["listing", name] = sorted(p.name for p in folder.iterdir())  # in place on return
    seen["writes"] = len(writes)
    zeros = {
        path: {k: (v * 0 if k != "scaling" else v) for k, v in params.items()}
        for path, params in seen["adapters"]["default"].items()
    }
    hqqlora.assign_adapter(model, zeros, adapter_name="default")
    seen["zeroed"] = full_adapter(model, "default")
    for name in ADAPTERS:
        loaded, _ = hqqlora.load_adapter(out / f"adapter_{name}", model=model)
        hqqlora.assign_adapter(model, loaded, adapter_name=name)
        seen["loaded", name] = full_adapter(model, name)
    hqqlora.set_adapter(model, "dora")
    with torch.no_grad():
        seen["eval_loaded"] = model.eval()(x)

    # Block units (shard_quantized's default on a stack): two blocks, each gathered whole.
    blocked = torch.nn.Sequential(*(torch.nn.Sequential(build(), glue()) for _ in range(2)))
    blocked_ref = copy.deepcopy(blocked)
    shard_quantized(blocked)
    seen["blocked_units"] = sorted(
        p for p, m in blocked.named_modules() if isinstance(m, FSDPModule)
    )
    seen["blocked_bytes"] = quantized_bytes(blocked), quantized_bytes(blocked_ref)
    seen["blocked_ref"] = step(blocked_ref, x, rows=slice(None), world=1, name="dora")
    seen["blocked"] = step(blocked, x, rows=rows, world=world, name="dora")

    # A write that fails on rank 0 raises on every rank, with no hang.
    (out / "a_file").touch()
    try:
        hqqlora.save_adapter(
            out / "a_file" / "adapter", hqqlora.get_adapter(model), r=3, lora_alpha=6
        )
        seen["failed_save"] = None
    except Exception as error:
        seen["failed_save"] = (type(error).__name__, str(error), traceback.format_exc())
    torch.save(seen, out / f"rank{rank}.pt")
    dist.destroy_process_group()
