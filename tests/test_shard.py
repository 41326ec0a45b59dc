"""hqqlora.distributed sharding: FSDP2 over the quantized base, sharded checkpoints (gloo, CPU).

The multi-process checks share one spawned run of two ranks (tests/_shard_worker.py),
each against a whole copy of the same model; the argument checks run in this process.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hqqlora
from hqqlora._model import hqq_layers
from hqqlora.distributed import (
    assign_adapter,
    gathered,
    quantized_bytes,
    register_quant_params,
    shard_quantized,
)
from tests.helpers import assert_close_rel
from tests.test_model import make_model


def _gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


pytestmark = [
    pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo"),
    # One xdist worker takes the whole module, so its module-scoped run of two ranks is
    # spawned once (addopts: --dist loadgroup).
    pytest.mark.xdist_group("shard_ranks"),
]

if _gloo_available():
    import _shard_worker as worker

SPAWN_LIMIT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks saw, and the folder they wrote to."""
    out = tmp_path_factory.mktemp("shard")
    context = mp.start_processes(
        worker.run,
        args=(2, str(out / "init"), str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_LIMIT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the two spawned ranks did not finish in {SPAWN_LIMIT_S} s")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)], out


@pytest.fixture
def world_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _assert_adapters_equal(a, b):
    assert sorted(a) == sorted(b)
    for path in a:
        assert sorted(a[path]) == sorted(b[path]), path
        for key in a[path]:
            assert torch.equal(a[path][key], b[path][key]), (path, key)


# --- two ranks ------------------------------------------------------------------


def test_each_rank_holds_half_of_the_quantized_base_scales_and_zeros_included(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        # Every tensor the HQQ layers hold (parameters as local shards, buffers, meta):
        # the scales and zeros must not stay whole in `meta` beside the sharded codes.
        held_whole, counted_whole = seen["bytes_whole"]
        held_local, counted_local = seen["bytes_local"]
        assert counted_whole == held_whole
        assert held_local <= held_whole / 2  # every tensor here splits evenly in two
        assert counted_local == held_local
        assert seen["meta_tensors"] == []
    assert rank0["bytes_local"][0] + rank1["bytes_local"][0] == rank0["bytes_whole"][0]


def test_every_hqq_layer_is_sharded_on_its_own_and_the_root_too(ranks):
    (rank0, _), _ = ranks
    # One FSDP2 unit per adapted shim and per plain HQQ layer: one layer gathered at a time.
    assert rank0["units"] == ["", "block.fc2", "fc1", "fc3"]


@pytest.mark.parametrize("name", sorted(worker.ADAPTERS) if _gloo_available() else [])
def test_two_ranks_on_their_rows_give_the_whole_batch_forward_and_gradients(ranks, name):
    (rank0, rank1), _ = ranks
    y_ref, grads_ref = rank0["ref", name]
    rows = torch.tensor_split(torch.arange(worker.ROWS), 2)
    for k, seen in enumerate((rank0, rank1)):
        y, grads = seen["sharded", name]
        # The same operations on the same gathered tensors, on 3 or 2 rows instead of 5
        # (the matmul may block them differently): equal to fp32 rounding.
        assert_close_rel(y, y_ref[rows[k]], torch.float32)
        # fp32: a sum over 5 rows against 3 + 2 then a mean over ranks, ~1e-7 relative.
        for path in grads_ref:
            for key in grads_ref[path]:
                assert_close_rel(grads[path][key], grads_ref[path][key], torch.float32)
    # The gradients were reduced: both ranks hold the same whole-batch gradient.
    _assert_adapters_equal(rank0["sharded", name][1], rank1["sharded", name][1])


def test_block_units_hold_half_and_train_like_the_whole_batch(ranks):
    (rank0, rank1), _ = ranks
    # A stack of two blocks: one unit per block (not per layer), and the root.
    assert rank0["blocked_units"] == ["", "0", "1"]
    for seen in (rank0, rank1):
        local, whole_bytes = seen["blocked_bytes"]
        assert 2 * local == pytest.approx(whole_bytes, rel=0.05)
    y_ref, grads_ref = rank0["blocked_ref"]
    rows = torch.tensor_split(torch.arange(worker.ROWS), 2)
    for k, seen in enumerate((rank0, rank1)):
        y, grads = seen["blocked"]
        assert_close_rel(y, y_ref[rows[k]], torch.float32)
        assert sorted(grads) == sorted(grads_ref) and len(grads) == 4
        for path in grads_ref:
            for key in grads_ref[path]:
                assert_close_rel(grads[path][key], grads_ref[path][key], torch.float32)


def test_sharded_eval_forward_equals_the_whole_model(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        torch.testing.assert_close(seen["eval_sharded"], seen["eval_ref"], rtol=0, atol=0)


def test_gathered_layers_dequantize_merge_and_report_as_the_whole_model(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        ref, got = seen["views_ref"], seen["views_gathered"]
        assert sorted(got["merged"]) == sorted(ref["merged"]) and len(ref["merged"]) == 4
        for kind in ("dequant", "merged"):
            for key in ref[kind]:
                assert torch.equal(got[kind][key], ref[kind][key]), (kind, key)
        assert got["report"] == ref["report"]


def test_a_sharded_layer_outside_its_forward_is_refused_not_misread(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        assert "got DTensor shards" in seen["shard_error"]
        assert "hqqlora.distributed.gathered" in seen["shard_error"]


def test_functional_grad_over_a_sharded_base_equals_the_whole_batch(ranks):
    (rank0, rank1), _ = ranks
    if rank0["functional_sharded"] is None:
        pytest.skip(
            f"torch {torch.__version__}: FSDP2's forward hook cannot run under torch.func "
            "transforms (its RegisterPostBackwardFunction has no setup_context)"
        )
    ref = rank0["functional_ref"]
    for seen in (rank0, rank1):
        for path in ref:
            for key in ref[path]:
                got = seen["functional_sharded"][path][key]
                assert_close_rel(got, ref[path][key], torch.float32)


def test_save_adapter_on_every_rank_writes_one_adapter_that_peft_reads(ranks):
    (rank0, rank1), out = ranks
    peft = pytest.importorskip("peft")
    for name, (r, alpha, dora) in worker.ADAPTERS.items():
        folder = out / f"adapter_{name}"
        for seen in (rank0, rank1):  # in place on every rank when save_adapter returned
            assert seen["listing", name] == ["adapter_config.json", "adapter_model.safetensors"]
        loaded, config = hqqlora.load_adapter(folder)
        assert (config["r"], config["lora_alpha"], config["use_dora"]) == (r, alpha, dora)
        _assert_adapters_equal(loaded, rank0["adapters"][name])  # whole tensors, not shards

        x = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
        model = peft.PeftModel.from_pretrained(make_model(), folder).eval()
        assert type(model.base_model.model.fc1).__name__ == "HqqLoraLinear"
        with torch.no_grad():
            got = model(x)
        expected = hqqlora.functional_call(make_model(), loaded, (x,))
        assert_close_rel(got, expected, torch.float32, factor=10)
    assert (rank0["writes"], rank1["writes"]) == (2, 0)  # rank 0 wrote, rank 1 waited
    # One folder per adapter and no leftover siblings.
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(("rank", "init")))
    assert names == ["a_file", "adapter_default", "adapter_dora"]


def test_load_adapter_and_assign_adapter_fill_the_shards_on_every_rank(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        for path, params in seen["zeroed"].items():
            assert not params["lora_A"].any() and not params["lora_B"].any(), path
        for name in worker.ADAPTERS:
            _assert_adapters_equal(seen["loaded", name], seen["adapters"][name])
        torch.testing.assert_close(seen["eval_loaded"], seen["eval_ref"], rtol=0, atol=0)


def test_a_write_failing_on_rank0_raises_on_every_rank(ranks):
    (rank0, rank1), _ = ranks
    assert rank0["failed_save"][0] in ("FileExistsError", "NotADirectoryError"), rank0
    assert rank1["failed_save"][0] == "RuntimeError", rank1
    assert "save_adapter: rank 0 failed to write" in rank1["failed_save"][1]
    assert rank0["failed_save"][0] in rank1["failed_save"][1]


# --- one process ------------------------------------------------------------------


def _tiny_with_shims(dora=True):
    model = make_model()
    hqqlora.inject_adapter(
        model,
        target_modules=["fc1", "fc2"],
        r=4,
        lora_alpha=8,
        use_dora=dora,
        init_lora_weights=False,
    )
    return model


def test_register_quant_params_keeps_every_output_and_frees_meta():
    model = _tiny_with_shims()
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = model(x), model.fc3(torch.randn(3, 48, generator=torch.Generator().manual_seed(0)))
    whole = {p: hqqlora.dequantize(m.get_base_layer()) for p, m in [("fc1", model.fc1)]}
    scale = model.fc3.meta["scale"]
    assert register_quant_params(model) is model
    layer = model.fc3  # a plain HQQLinear: its own call runs hqqlora's forward now
    assert isinstance(layer.scale, nn.Parameter)
    assert layer.scale.data_ptr() == scale.data_ptr()  # the same storage, not a copy
    scale = layer.scale
    assert not layer.scale.requires_grad and not layer.zero.requires_grad
    assert isinstance(layer.bias, nn.Parameter) and not layer.bias.requires_grad
    assert "scale" not in layer.meta and "zero" not in layer.meta
    names = {n for n, _ in model.named_parameters()}
    assert {"fc3.W_q", "fc3.scale", "fc3.zero", "fc3.bias", "fc1.base_layer.scale"} <= names
    with torch.no_grad():
        after = model(x), layer(torch.randn(3, 48, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert torch.equal(hqqlora.dequantize(model.fc1.get_base_layer()), whole["fc1"])
    register_quant_params(model)  # a second call changes nothing
    assert model.fc3.scale is scale


def test_quantized_bytes_counts_codes_scales_zeros_and_biases():
    model = make_model()
    expected = sum(
        t.numel() * t.element_size()
        for m in (model.fc1, model.block.fc2, model.fc3)
        for t in (m.W_q, m.meta["scale"], m.meta["zero"], m.bias)
    )
    assert quantized_bytes(model) == expected
    assert quantized_bytes(register_quant_params(model)) == expected


def test_shard_quantized_needs_a_process_group():
    with pytest.raises(RuntimeError, match=r"shard_quantized: expected an initialized process"):
        shard_quantized(make_model())


def test_shard_quantized_refuses_bad_models_and_changes_nothing(world_of_one):
    with pytest.raises(ValueError, match=r"Expected a model with HQQLinear layers, got none\."):
        shard_quantized(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch.nn.Module, got int\."):
        shard_quantized(3)
    model = make_model()
    model.fc3.offload_meta = True  # as HQQ marks it (a real one needs pinned CUDA memory)
    with pytest.raises(ValueError, match=r"without offload_meta, got one at 'fc3'"):
        shard_quantized(model)
    assert "scale" in model.fc1.meta and not isinstance(model.fc1.W_q, type(None))
    assert type(model.fc1.W_q) is nn.Parameter  # not sharded


def test_shard_quantized_twice_is_refused(world_of_one):
    model = shard_quantized(_tiny_with_shims())
    with pytest.raises(ValueError, match=r"Expected a model not yet sharded by FSDP2"):
        shard_quantized(model)


def test_shard_quantized_world_of_one_is_the_whole_model(world_of_one):
    model = _tiny_with_shims()
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = model(x)
    whole = quantized_bytes(model)
    shard_quantized(model)
    assert quantized_bytes(model) == whole
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def _stack():
    """Two blocks of three HQQ layers in a ModuleList, and a plain HQQ head outside it."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.Sequential(_tiny_with_shims(dora=False), nn.Linear(16, 32)) for _ in range(2)
            )
            self.head = make_model().fc1

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    return Stack()


def _units(model):
    fsdp = torch.distributed.fsdp.FSDPModule
    return sorted(p for p, m in model.named_modules() if isinstance(m, fsdp))


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        ("blocks", ["", "head", "layers.0", "layers.1"]),
        ("layers", ["", "head"] + [f"layers.{i}.0.{p}" for i in (0, 1) for p in ("block.fc2", "fc1", "fc3")]),
        ("first", ["", "head", "layers.0", "layers.1.0.block.fc2", "layers.1.0.fc1", "layers.1.0.fc3"]),
    ],
)  # fmt: skip
def test_shard_quantized_units(world_of_one, units, expected):
    model = _stack()
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = model(x)
    chosen = [model.layers[0]] if units == "first" else units
    shard_quantized(model, units=chosen)
    assert _units(model) == expected
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_model_without_a_stack_gets_a_unit_per_layer(world_of_one):
    model = shard_quantized(_tiny_with_shims())
    assert _units(model) == ["", "block.fc2", "fc1", "fc3"]


@pytest.mark.parametrize("units", ["block", ["layers.0"], "self"])
def test_shard_quantized_refuses_bad_units_and_changes_nothing(world_of_one, units):
    model = _stack()
    units = [model] if units == "self" else units
    with pytest.raises(ValueError, match=r"Expected `units` to be"):
        shard_quantized(model, units=units)
    assert "scale" in model.head.meta and _units(model) == []


_UNSHARDABLE = {
    "twice": lambda m: [m.layers[0], m.layers[0]],
    "inside a shim": lambda m: [m.layers[0][0].fc1.base_layer],
    "an adapter dict": lambda m: [m.layers[0][0].fc1.lora_A],
    "a list without forward": lambda m: [m.layers, m.layers[1]],
}


@pytest.mark.parametrize("case", sorted(_UNSHARDABLE))
def test_shard_quantized_refuses_units_it_cannot_shard_and_changes_nothing(world_of_one, case):
    # fully_shard would fail half way (a repeat, a ModuleList/ModuleDict without forward)
    # or shard a layer apart from the shim whose forward reads it: refused before any change.
    model = _stack()
    with pytest.raises(ValueError, match=r"Expected `units`"):
        shard_quantized(model, units=_UNSHARDABLE[case](model))
    assert _units(model) == []
    assert all("scale" in m.meta for m in hqq_layers(model).values())


def test_shard_quantized_refuses_a_keyword_fully_shard_does_not_take(world_of_one):
    model = _stack()
    with pytest.raises(TypeError, match=r"reshard_after_foward"):
        shard_quantized(model, reshard_after_foward=False)
    assert _units(model) == []
    assert all("scale" in m.meta for m in hqq_layers(model).values())


def _blocks_of(model):
    """A forward through a container of blocks (the container itself has none)."""

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = model

        def forward(self, x):
            for stage in self.stages:
                for block in stage if isinstance(stage, nn.ModuleList) else [stage]:
                    x = block(x)
            return x

    return Holder()


def test_shard_quantized_refuses_a_model_without_forward_and_changes_nothing(world_of_one):
    model = _stack().layers  # a ModuleList: fully_shard cannot take it as the root
    with pytest.raises(ValueError, match=r"Expected `model` to have a forward"):
        shard_quantized(model)
    assert _units(model) == []
    assert all("scale" in m.meta for m in hqq_layers(model).values())


def test_blocks_inside_lists_without_forward_are_sharded(world_of_one):
    # Stages of blocks, each stage a ModuleList (no forward, so no unit of its own).
    stage = [_stack().layers for _ in range(3)]
    model = _blocks_of(nn.ModuleList(stage))
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = model(x)
    shard_quantized(model)
    assert {"", "stages.0.0", "stages.0.1"} <= set(_units(model))
    assert not {"stages", "stages.0", "stages.1"} & set(_units(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_gathered_takes_the_unit_that_holds_a_layer(world_of_one):
    model = _stack()
    whole = hqqlora.dequantize(model.layers[0][0].fc1.get_base_layer())
    shard_quantized(model)
    with (
        pytest.raises(ValueError, match=r"pass the unit that holds it"),
        gathered(model.layers[0][0].fc1),
    ):
        pass
    with gathered(model.layers[0]) as block:
        assert torch.equal(hqqlora.dequantize(block[0].fc1.get_base_layer()), whole)


def test_gathered_refuses_an_unsharded_module():
    with (
        pytest.raises(ValueError, match=r"Expected a module sharded by FSDP2"),
        gathered(make_model()),
    ):
        pass


def test_assign_adapter_round_trips_on_a_whole_model():
    model = _tiny_with_shims()
    source = _tiny_with_shims()
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    adapters = {
        p: {k: v.detach().clone() for k, v in a.items()}
        for p, a in hqqlora.get_adapter(source).items()
    }
    assert assign_adapter(model, adapters) is model
    _assert_adapters_equal(
        {p: {k: v.detach() for k, v in a.items()} for p, a in hqqlora.get_adapter(model).items()},
        adapters,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("fc1"), r"got unknown paths \[\] and none for \['fc1'\]"),
        (lambda a: a.update(fc3=a["fc1"]), r"got unknown paths \['fc3'\]"),
        (
            lambda a: a.update(fc1={**a["fc1"], "scaling": torch.tensor(3.0)}),
            r"Expected rank 4 and scaling 2 for 'fc1' \(the shim's\), got rank 4 and scaling 3\.",
        ),
        (
            lambda a: a.update(fc1={k: v for k, v in a["fc1"].items() if k != "magnitude"}),
            r"Expected a `magnitude` for 'fc1' \(the shim's adapter is DoRA\), got none\.",
        ),
        (
            lambda a: a.update(fc1={**a["fc1"], "lora_A": a["fc1"]["lora_A"][:, :8]}),
            r"adapters\['fc1'\]",
        ),
    ],
)
def test_assign_adapter_refuses_a_mismatch_and_changes_nothing(change, message):
    model = _tiny_with_shims()
    adapters = {
        p: {k: v.detach().clone() * 2 for k, v in a.items()}
        for p, a in hqqlora.get_adapter(model).items()
    }
    for params in adapters.values():
        params["scaling"] = params["scaling"] / 2
    before = {
        p: {k: v.detach().clone() for k, v in a.items()}
        for p, a in hqqlora.get_adapter(model).items()
    }
    change(adapters)
    with pytest.raises(ValueError, match=message):
        assign_adapter(model, adapters)
    _assert_adapters_equal(
        {p: {k: v.detach() for k, v in a.items()} for p, a in hqqlora.get_adapter(model).items()},
        before,
    )


def test_assign_adapter_refuses_non_dicts():
    with pytest.raises(TypeError, match=r"Expected `adapters` to be a dict"):
        assign_adapter(_tiny_with_shims(), [1])


def test_save_adapter_of_a_whole_model_is_not_a_collective(world_of_one, tmp_path, monkeypatch):
    # Plain tensors: the caller's rank writes (rank 0 only, in the usual DDP script),
    # with no collective that the other ranks would have to join.
    calls = []
    monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **k: calls.append(a))
    model = _tiny_with_shims(dora=False)
    hqqlora.save_adapter(tmp_path / "a", hqqlora.get_adapter(model), r=4, lora_alpha=8)
    assert calls == []
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4


def test_mixed_precision_with_a_param_dtype_is_refused_and_changes_nothing(world_of_one):
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    model = _tiny_with_shims()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"without param_dtype, got .*param_dtype=torch\.bfloat16"):
        shard_quantized(model, mp_policy=policy)
    assert not isinstance(model, FSDPModule) and "scale" in model.fc1.base_layer.meta
    assert model.fc1.base_layer.W_q.dtype == torch.uint8


def test_mixed_precision_without_param_dtype_keeps_the_codes(world_of_one):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = _tiny_with_shims()
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = model(x)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32, output_dtype=torch.float64)
    shard_quantized(model, mp_policy=policy)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float64  # each unit's output cast: later layers see float64
    assert_close_rel(got, expected, torch.float32, factor=4)


@pytest.mark.parametrize("nbits", [4, 3, 8])
def test_register_quant_params_holds_the_codes_bytes_as_a_float_that_can_be_sharded(nbits):
    # FSDP2 of torch 2.11 makes each shard `nn.Parameter(shard)`, which requires grad:
    # an integer W_q raised "only Tensors of floating point dtype can require gradients".
    model = make_model(nbits=nbits)
    layer = model.fc3
    codes = layer.W_q.detach().clone()
    storage = layer.W_q.data_ptr()
    dense = layer.dequantize().double()  # HQQ's own, before the layer changes
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
    register_quant_params(model)
    W_q = layer.W_q
    assert isinstance(W_q, nn.Parameter) and not W_q.requires_grad
    assert W_q.is_floating_point() and W_q.shape == codes.shape
    assert W_q.data_ptr() == storage  # the same bytes, viewed, not copied
    W_q.detach().requires_grad_(True)  # what FSDP2 2.11 does to each shard
    assert torch.equal(W_q.detach().view(codes.dtype), codes)
    torch.testing.assert_close(hqqlora.dequantize(layer).double(), dense, rtol=0, atol=0)
    with torch.no_grad():
        got = layer(x)
    want = x.double() @ dense.T + layer.bias.double()
    assert_close_rel(got.double(), want, torch.float32, factor=16)


def test_codes_cast_after_registration_are_refused_not_misread():
    model = register_quant_params(_tiny_with_shims())
    model.to(torch.bfloat16)  # casts every float parameter, the codes' view too
    with pytest.raises(ValueError, match=r"viewed as a 1-byte float .* got torch\.bfloat16"):
        model(torch.randn(5, 32, dtype=torch.bfloat16))
