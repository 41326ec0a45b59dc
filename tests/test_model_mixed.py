"""Model-level mixed batches: functional_call with a bank per layer and one index (or names)
per call, and model(**inputs, adapter_names=[...]) through a whole transformers model; both
equal running each row alone with its own adapters."""

from __future__ import annotations

import itertools

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig
from torch import nn

import hqqlora
from hqqlora import (
    functional_call,
    get_adapter,
    inject_adapter,
    model_weight_norm,
    quantize_model,
    stack_adapters,
)
from hqqlora._state import STATE
from tests.helpers import assert_close_rel, dense_reference, random_adapter
from tests.test_model import assert_unchanged, snapshot

BASE = "__base__"
BERT_TARGETS = ("query", "value", "attention.output.dense", "intermediate.dense")


def sequential(dtype=torch.float64, device="cpu", sizes=(32, 48, 48, 16), group_size=16):
    """Linear → GELU → Linear → GELU → Linear, quantized to 4 bits."""
    torch.manual_seed(0)
    layers = []
    for d_in, d_out in itertools.pairwise(sizes):
        layers += [nn.Linear(d_in, d_out), nn.GELU()]
    model = nn.Sequential(*layers[:-1]).to(dtype)
    config = BaseQuantizeConfig(nbits=4, group_size=group_size)
    return quantize_model(model, config, compute_dtype=dtype, device=device, progress=False)


def bert(dtype=torch.float64):
    """A 2-layer transformers BertModel in eval mode, quantized to 4 bits but its pooler."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).to(dtype).eval()
    config = BaseQuantizeConfig(nbits=4, group_size=16)
    return quantize_model(
        model, config, compute_dtype=dtype, device="cpu", skip="pooler.dense", progress=False
    )


def layer_paths(model):
    return sorted(p for p in hqqlora._model.hqq_layers(model) if p != "pooler.dense")


def make_adapters(model, spec, dtype=torch.float64, paths=None):
    """path → name → adapter, from spec = {name: (rank, is_dora)}; magnitudes off their init."""
    paths = layer_paths(model) if paths is None else paths
    by_path = {}
    for i, path in enumerate(paths):
        layer = hqqlora._model.hqq_layers(model)[path]
        by_path[path] = {
            name: random_adapter(
                layer, r, scaling=0.5 + k, dora=dora, seed=100 * i + k, dtype=dtype
            )
            for k, (name, (r, dora)) in enumerate(spec.items())
        }
    return by_path


def banks_of(by_path, names_order=None):
    return {path: stack_adapters(d, names_order) for path, d in by_path.items()}


def per_row(model, by_path, names, args, kwargs=None, run=None):
    """Each row alone through functional_call with its own adapter dicts (none for BASE)."""
    rows = []
    kwargs = kwargs or {}
    for i, name in enumerate(names):
        adapters = {p: d[name] for p, d in by_path.items() if name in d}
        row_args = tuple(a[i : i + 1] for a in args)
        row_kwargs = {k: v[i : i + 1] for k, v in kwargs.items()}
        out = functional_call(model, adapters, row_args, row_kwargs)
        rows.append(out if run is None else run(out))
    return torch.cat(rows)


def sequential_dense(model, by_path, names, x):
    """The sequential in float64 from dequantized weights, each row with its own adapters."""
    rows = []
    for i, name in enumerate(names):
        h = x[i : i + 1].double()
        for path, module in model.named_children():
            if isinstance(module, nn.GELU):
                h = nn.functional.gelu(h)
                continue
            adapter = by_path.get(path, {}).get(name)
            module = getattr(module, "base_layer", module)  # a shim's base
            h = dense_reference(module, [] if adapter is None else [adapter], h)
        rows.append(h)
    return torch.cat(rows)


def index_of(bank, names):
    return torch.tensor([bank.names.index(n) if n in bank.names else -1 for n in names])


SPEC = {"a": (4, False), "b": (2, True), "c": (3, True)}
NAMES = ["b", "a", BASE, "c", "b"]


# -- equal to per-row application --------------------------------------------------------


@pytest.mark.parametrize("form", ["names", "index"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sequential_equals_per_row(form, dtype):
    model = sequential(dtype)
    by_path = make_adapters(model, SPEC, dtype=torch.float32 if dtype != torch.float64 else dtype)
    banks = banks_of(by_path)
    x = torch.randn(5, 3, 32, dtype=dtype)  # (batch, seq, in): the index applies to dim 0
    index = NAMES if form == "names" else index_of(banks["0"], NAMES)
    before = snapshot(model)
    y = functional_call(model, banks, (x,), adapter_index=index)
    assert_unchanged(model, before)
    assert y.shape == (5, 3, 16) and y.dtype == dtype
    expected = sequential_dense(model, by_path, NAMES, x)
    assert_close_rel(y, expected, dtype, factor=4)
    assert_close_rel(per_row(model, by_path, NAMES, (x,)), expected, dtype, factor=4)


@pytest.mark.parametrize("form", ["names", "index"])
def test_bert_equals_per_row(form):
    model = bert()
    by_path = make_adapters(model, SPEC)
    banks = banks_of(by_path)
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[2, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    index = NAMES if form == "names" else index_of(next(iter(banks.values())), NAMES)
    before = snapshot(model)
    y = functional_call(model, banks, (), inputs, adapter_index=index).last_hidden_state
    assert_unchanged(model, before)
    expected = per_row(model, by_path, NAMES, (), inputs, run=lambda o: o.last_hidden_state)
    assert_close_rel(y, expected, torch.float64, factor=4)
    # every row is adapted: not the base model's output
    base = model(**inputs).last_hidden_state
    for i, name in enumerate(NAMES):
        same = torch.allclose(y[i], base[i], atol=1e-6)
        assert same == (name == BASE), name


def test_a_bank_lacking_a_name_gives_base_in_its_layer_and_dicts_apply_to_every_row():
    model = sequential()
    by_path = make_adapters(model, SPEC)
    by_path["2"] = {"a": by_path["2"]["a"]}  # only "a" adapts the middle layer
    fixed = random_adapter(model[4], 2, dora=True, seed=9, dtype=torch.float64)
    adapters = {"0": stack_adapters(by_path["0"]), "2": stack_adapters(by_path["2"]), "4": fixed}
    x = torch.randn(5, 32, dtype=torch.float64)
    y = functional_call(model, adapters, (x,), adapter_index=NAMES)
    expected = sequential_dense(model, {**by_path, "4": dict.fromkeys(SPEC, fixed)}, NAMES, x)
    assert_close_rel(y[[0, 1, 3, 4]], expected[[0, 1, 3, 4]], torch.float64, factor=4)
    # the BASE row still gets the dict at "4", which applies to every row
    base_row = sequential_dense(model, {"4": {BASE: fixed}}, [BASE], x[2:3])
    assert_close_rel(y[2:3], base_row, torch.float64, factor=4)
    # a tensor index means one entry in every bank: banks of other names are refused
    with pytest.raises(ValueError, match="same names in the same order"):
        functional_call(model, adapters, (x,), adapter_index=torch.zeros(5, dtype=torch.long))


def test_the_model_itself_a_layer_or_a_shim():
    model = sequential()
    layer = model[0]
    params = make_adapters(model, SPEC, paths=["0"])["0"]
    bank = stack_adapters(params)
    x = torch.randn(5, 2, 32, dtype=torch.float64)
    expected = torch.cat(
        [
            dense_reference(layer, [params[n]] if n != BASE else [], x[i : i + 1])
            for i, n in enumerate(NAMES)
        ]
    )
    for form in (NAMES, index_of(bank, NAMES)):
        assert_close_rel(
            functional_call(layer, {"": bank}, (x,), adapter_index=form), expected, torch.float64
        )
    shim = hqqlora.HqqLoraLinear(layer, "own", r=2, lora_alpha=2)
    assert_close_rel(
        functional_call(shim, {"": bank}, x, adapter_index=NAMES), expected, torch.float64
    )


def test_a_bank_on_peft_shims():
    peft = pytest.importorskip("peft")
    model = sequential()
    by_path = make_adapters(model, SPEC)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "4"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).base_model.model
    assert type(wrapped[0]).__module__.startswith("peft")
    x = torch.randn(5, 32, dtype=torch.float64)
    with torch.no_grad():
        y = functional_call(wrapped, banks_of(by_path), (x,), adapter_index=NAMES)
    assert_close_rel(y, sequential_dense(model, by_path, NAMES, x), torch.float64, factor=4)


def test_held_weight_norms_are_the_ones_used():
    model = sequential()
    by_path = make_adapters(model, SPEC)
    banks = banks_of(by_path)
    x = torch.randn(5, 2, 32, dtype=torch.float64)
    index = index_of(banks["0"], NAMES)
    norms = model_weight_norm(model, banks)
    assert sorted(norms) == ["0", "2", "4"] and norms["0"].shape == (3, 48)
    computed = functional_call(model, banks, (x,), adapter_index=index)
    held = functional_call(model, banks, (x,), adapter_index=index, weight_norm=norms)
    assert_close_rel(held, computed, torch.float64)
    # n doubled is c halved: the same as halving the DoRA magnitudes
    doubled = {p: 2 * n for p, n in norms.items()}
    y = functional_call(model, banks, (x,), adapter_index=index, weight_norm=doubled)
    halved = {
        p: {
            n: {**a, "magnitude": a["magnitude"] / 2} if "magnitude" in a else a
            for n, a in d.items()
        }
        for p, d in by_path.items()
    }
    assert_close_rel(y, sequential_dense(model, halved, NAMES, x), torch.float64, factor=4)
    # dict adapters take held norms too
    dicts = {p: d["b"] for p, d in by_path.items()}
    dict_norms = model_weight_norm(model, dicts)
    y = functional_call(model, dicts, (x,), weight_norm={p: 2 * n for p, n in dict_norms.items()})
    halved_b = {p: {"b": d["b"]} for p, d in halved.items()}
    expected = sequential_dense(model, halved_b, ["b"] * 5, x)
    assert_close_rel(y, expected, torch.float64, factor=4)
    lora_only = {p: {"a": d["a"]} for p, d in by_path.items()}
    assert model_weight_norm(model, {p: d["a"] for p, d in lora_only.items()}) == {}
    assert model_weight_norm(model, banks_of(lora_only)) == {}


def test_weight_norms_of_a_merged_shim_are_its_unmerged_base_ones():
    model = sequential()
    by_path = make_adapters(model, SPEC, paths=["2"])
    original = model[2]
    inject_adapter(model, "own", target_modules=["2"], r=2, lora_alpha=2, use_dora=True)
    with torch.no_grad():
        model[2].lora_B["own"].weight.normal_()
    model[2].merge()
    bank = stack_adapters(by_path["2"])
    norms = model_weight_norm(model, {"2": bank})
    torch.testing.assert_close(norms["2"], hqqlora.bank_weight_norm(original, bank))
    x = torch.randn(5, 48, dtype=torch.float64)
    y = functional_call(
        model[2], {"": bank}, (x,), adapter_index=NAMES, weight_norm={"": norms["2"]}
    )
    expected = torch.cat(
        [
            dense_reference(original, [by_path["2"][n]] if n != BASE else [], x[i : i + 1])
            for i, n in enumerate(NAMES)
        ]
    )
    assert_close_rel(y, expected, torch.float64)


def test_grad_wrt_bank_tensors_equals_per_row_grad():
    model = sequential()
    by_path = make_adapters(model, SPEC)
    banks = banks_of(by_path)
    x = torch.randn(5, 2, 32, dtype=torch.float64)
    index = index_of(banks["0"], NAMES)
    leaves = {p: (b.lora_A, b.lora_B, b.magnitude) for p, b in banks.items()}

    def loss(leaves):
        rebuilt = {
            p: b._replace(lora_A=leaves[p][0], lora_B=leaves[p][1], magnitude=leaves[p][2])
            for p, b in banks.items()
        }
        return functional_call(model, rebuilt, (x,), adapter_index=index).square().sum()

    grads = torch.func.grad(loss)(leaves)

    # The reference: each row alone with dicts sliced out of the same leaves, summed.
    refs = {p: tuple(t.detach().clone().requires_grad_() for t in ls) for p, ls in leaves.items()}
    total = 0
    for i, name in enumerate(NAMES):
        adapters = {}
        if name != BASE:
            for p, d in by_path.items():
                k, r = banks[p].names.index(name), d[name]["lora_A"].shape[0]
                A, B, m = refs[p]
                adapters[p] = {"lora_A": A[k, :r], "lora_B": B[k, :, :r]}
                adapters[p]["scaling"] = d[name]["scaling"]
                if "magnitude" in d[name]:
                    adapters[p]["magnitude"] = m[k]
        total = total + functional_call(model, adapters, (x[i : i + 1],)).square().sum()
    total.backward()
    for p in leaves:
        for got, ref in zip(grads[p], refs[p], strict=True):
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, ref.grad, rtol=1e-9, atol=1e-12)


# -- model(**inputs, adapter_names=[...]) on injected shims -----------------------------


def _injected_bert():
    model = bert()
    inject_adapter(model, "a", target_modules=list(BERT_TARGETS), r=4, lora_alpha=8)
    inject_adapter(model, "b", target_modules=["query", "value"], r=2, lora_alpha=4, use_dora=True)
    inject_adapter(model, "c", target_modules=["intermediate.dense"], r=3, lora_alpha=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, hqqlora.HqqLoraLinear):
                for name in m.lora_B:
                    m.lora_B[name].weight.normal_(0, 0.2, generator=gen)  # B off its zero init
                for mag in m.lora_magnitude_vector.values():
                    mag.weight.mul_(1 + 0.3 * torch.rand(mag.weight.shape, generator=gen))
    return model.eval()


def test_peft_adapter_names_through_bert_equal_per_row_and_banks():
    model = _injected_bert()
    names = ["b", "a", BASE, "c", "b"]
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    with torch.no_grad():
        y = model(**inputs, adapter_names=names).last_hidden_state
        by_path = {}
        for name in ("a", "b", "c"):
            for path, params in get_adapter(model, name).items():
                by_path.setdefault(path, {})[name] = params
        banked = functional_call(model, banks_of(by_path), (), inputs, adapter_index=names)
        # Per row through functional_call; the shims it does not name would run their own
        # active adapter: switch those off for the reference.
        shims = [m for m in model.modules() if isinstance(m, hqqlora.HqqLoraLinear)]
        for m in shims:
            m.enable_adapters(False)
        expected = per_row(model, by_path, names, (), inputs, run=lambda o: o.last_hidden_state)
        for m in shims:
            m.enable_adapters(True)
    # The injected adapters are float32 (init_lora's default): the term is computed in float32.
    assert_close_rel(y, expected, torch.float32, factor=4)
    assert_close_rel(banked.last_hidden_state, expected, torch.float32, factor=4)
    assert STATE.adapter_names is None and STATE.adapters is None
    assert not torch.allclose(y[2], y[1]) and not torch.allclose(y[0], y[3])


# -- bad input: clear errors, no state left ------------------------------------------------


def _bad_calls(model, banks, x):
    other = stack_adapters({"a": random_adapter(model[2], 2, dtype=torch.float64)})
    shim = sequential()
    inject_adapter(shim, "a", target_modules=["0"], r=2, lora_alpha=2)
    b0 = banks["0"]
    return [
        (TypeError, "int32 or torch.int64", dict(adapter_index=torch.zeros(5))),
        (TypeError, "int32 or torch.int64", dict(adapter_index=torch.zeros(5, dtype=torch.int16))),
        (ValueError, r"shape \(batch,\)", dict(adapter_index=torch.zeros(5, 1, dtype=torch.long))),
        (ValueError, r"shape \(5,\), one entry per row", dict(adapter_index=torch.zeros(4).long())),
        (ValueError, r"`adapter_index` values in \[-1, 3\), got values in \[0, 3\]", dict(adapter_index=torch.arange(5) % 4)),
        (ValueError, r"`adapter_index` values in \[-1, 3\), got values in \[-2, 0\]", dict(adapter_index=torch.tensor([0, -2, 0, 0, 0]))),
        (ValueError, r"unknown \['zz'\]", dict(adapter_index=["a", "zz", "b", BASE, "a"])),
        (TypeError, "tensor of shape \\(batch,\\) or a list of adapter names", dict(adapter_index="a")),
        (TypeError, "names to be strings", dict(adapter_index=[0, 1, 2, 0, 1])),
        (ValueError, r"one entry per row", dict(adapter_index=["a", "b"])),
        (ValueError, "Expected `adapter_index`", dict(adapter_index=None)),
        (ValueError, "got only adapter dicts", dict(adapters={"0": random_adapter(model[0], 2, dtype=torch.float64)})),
        (ValueError, r"non-HQQ modules \['1'\]", dict(adapters={**banks, "1": b0})),
        (ValueError, r"\(out, in\) = \(48, 48\)", dict(adapters={**banks, "2": b0})),
        (ValueError, "on its layer's device", dict(adapters={**banks, "0": b0._replace(lora_A=b0.lora_A.to("meta"))})),
        (ValueError, r"\.scaling of shape \(3,\)", dict(adapters={**banks, "0": b0._replace(scaling=b0.scaling[:2])})),
        (ValueError, r"\.lora_A of shape \(n, r, in\)", dict(adapters={**banks, "0": b0._replace(lora_A=b0.lora_A[0])})),
        (ValueError, "same names in the same order", dict(adapters={**banks, "2": other}, adapter_index=torch.zeros(5, dtype=torch.long))),
        (ValueError, r"unknown paths \['9'\]", dict(weight_norm={"9": torch.ones(3, 48)})),
        (TypeError, "dict of module path -> norms", dict(weight_norm=[torch.ones(3, 48)])),
        (ValueError, r"weight_norm` of shape \(3, 48\)", dict(weight_norm={"0": torch.ones(48, dtype=torch.float64)})),
        (ValueError, "positive", dict(weight_norm={"0": torch.zeros(3, 48, dtype=torch.float64)})),
        (ValueError, r"non-HQQ modules \['0.base_layer'\]", dict(model=shim, adapters={"0.base_layer": b0})),
    ]  # fmt: skip


def test_bad_input_raises_and_leaves_no_state():
    model = sequential()
    banks = banks_of(make_adapters(model, SPEC))
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = model(x)
    before = snapshot(model)
    for error, match, call in _bad_calls(model, banks, x):
        call = {"model": model, "adapters": banks, "adapter_index": NAMES[:5], **call}
        target = call.pop("model")
        with pytest.raises(error, match=match):
            functional_call(target, call.pop("adapters"), (x,), **call)
        assert STATE.adapters is None and STATE.running is None
        assert_unchanged(model, before)
    assert torch.equal(model(x), expected)


def test_banks_are_refused_where_only_dicts_fit():
    model = sequential()
    banks = banks_of(make_adapters(model, SPEC))
    with pytest.raises(
        TypeError, match=r"adapters\['0'\]` to be a dict of tensors, got AdapterBank"
    ):
        hqqlora.merge_and_unload(model, banks)


# -- torch.compile ----------------------------------------------------------------------


# dynamo inspects captured tensors' .grad; torch warns about that for non-leaf ones
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compile_fullgraph_one_graph_for_every_index():
    model = sequential(torch.float32)
    by_path = make_adapters(model, SPEC, dtype=torch.float32)
    banks = banks_of(by_path)
    norms = model_weight_norm(model, banks)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def serve(banks, index, x):
        return functional_call(model, banks, (x,), adapter_index=index, weight_norm=norms)

    x = torch.randn(5, 3, 32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for names in (NAMES, ["c", "c", "a", BASE, "b"]):
            y = serve(banks, index_of(banks["0"], names), x)
            expected = sequential_dense(model, by_path, names, x)
            assert_close_rel(y, expected, torch.float32, factor=4)


# -- CUDA graphs (run on a GPU) ------------------------------------------------------------


def _gpu_case(dtype):
    model = sequential(dtype, device="cuda", sizes=(128, 256, 128), group_size=64)
    by_path = make_adapters(model, SPEC, dtype=torch.float32)
    by_path = {
        p: {n: {k: v.cuda() for k, v in a.items()} for n, a in d.items()}
        for p, d in by_path.items()
    }
    banks = banks_of(by_path)
    norms = model_weight_norm(model, banks)
    return model, by_path, banks, norms


GPU_INDICES = (NAMES, ["c", "c", "a", BASE, "b"], [BASE, "a", "b", "a", "c"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_reduce_overhead_equals_per_row(dtype):
    model, by_path, banks, norms = _gpu_case(dtype)
    torch._dynamo.reset()

    @torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)
    def serve(index, x):
        return functional_call(model, banks, (x,), adapter_index=index, weight_norm=norms)

    x = torch.randn(5, 3, 128, device="cuda", dtype=dtype)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the first calls record, the later ones replay
            for names in GPU_INDICES:
                y = serve(index_of(banks["0"], names).cuda(), x).clone()
                expected = sequential_dense(model, by_path, names, x)
                assert_close_rel(y, expected, dtype, factor=10)
                assert_close_rel(per_row(model, by_path, names, (x,)), expected, dtype, factor=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_eager_functional_call():
    model, by_path, banks, norms = _gpu_case(torch.float32)
    index = index_of(banks["0"], NAMES).cuda()
    x = torch.randn(5, 3, 128, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (and check the held norms once) off-graph
        for _ in range(3):
            functional_call(model, banks, (x,), adapter_index=index, weight_norm=norms)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = functional_call(model, banks, (x,), adapter_index=index, weight_norm=norms)
    for names in GPU_INDICES:
        index.copy_(index_of(banks["0"], names))
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        expected = sequential_dense(model, by_path, names, x)
        assert_close_rel(y, expected, torch.float32, factor=10)
