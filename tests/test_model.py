"""Model-level calls: functional_call under torch.func and torch.compile, quantize_model, inject."""

from __future__ import annotations

import copy

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hqqlora
from hqqlora import (
    apply_lora,
    dequantize,
    functional_call,
    get_adapter,
    inject_adapter,
    quantize_model,
)
from tests.helpers import assert_close_rel, random_adapter

PATHS = ("fc1", "block.fc2", "fc3")


class Tiny(nn.Module):
    """x → fc1 → gelu → (+ block.fc2) → fc3, with a nested module."""

    def __init__(self, d_in=32, d_hidden=48, d_out=16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.block = nn.Module()
        self.block.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        h = h + self.block.fc2(h)
        return self.fc3(h)


def make_model(nbits=4, seed=0, skip=()):
    torch.manual_seed(seed)
    model = Tiny()
    config = BaseQuantizeConfig(nbits=nbits, group_size=16)
    return quantize_model(
        model, config, compute_dtype=torch.float32, device="cpu", skip=skip, progress=False
    )


def make_adapters(model, *, dora=False, r=4, seed=1):
    layers = {"fc1": model.fc1, "block.fc2": model.block.fc2, "fc3": model.fc3}
    return {
        path: random_adapter(layer, r, dora=dora, seed=seed + i)
        for i, (path, layer) in enumerate(layers.items())
    }


def ref_layer(layer, p, x):
    """One adapted layer in float64, DoRA's norm detached as in PEFT."""
    W = dequantize(layer).double()
    y = x @ W.T + layer.bias.double()
    A, B, s = p["lora_A"], p["lora_B"], p["scaling"]
    lora = s * (x @ A.T @ B.T)
    if "magnitude" not in p:
        return y + lora
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    c = p["magnitude"] / n
    return y + (c - 1) * (x @ W.T) + c * lora


def reference(model, adapters, x):
    """Tiny's forward in float64 from dequantized weights; adapters must be float64."""
    h = torch.nn.functional.gelu(ref_layer(model.fc1, adapters["fc1"], x))
    h = h + ref_layer(model.block.fc2, adapters["block.fc2"], h)
    return ref_layer(model.fc3, adapters["fc3"], h)


def to64(adapters, requires_grad=False):
    return {
        path: {
            k: v.detach().double().requires_grad_(requires_grad and k != "scaling")
            for k, v in p.items()
        }
        for path, p in adapters.items()
    }


def snapshot(model):
    return {
        "modules": [(path, id(m)) for path, m in model.named_modules()],
        "attrs": {path: sorted(vars(m)) for path, m in model.named_modules()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "state": {
            k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
        },
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["attrs"] == before["attrs"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# quantize_model


def test_quantize_model_replaces_linears_in_place():
    torch.manual_seed(0)
    model = Tiny()
    dense = copy.deepcopy(model)
    out = quantize_model(
        model,
        BaseQuantizeConfig(nbits=8, group_size=16),
        compute_dtype=torch.float32,
        device="cpu",
        progress=False,
    )
    assert out is model
    for path in PATHS:
        layer = model.get_submodule(path)
        assert isinstance(layer, HQQLinear)
        W = dense.get_submodule(path).weight
        assert (dequantize(layer) - W).abs().max() < 0.02 * W.abs().max()
        assert torch.equal(layer.bias, dense.get_submodule(path).bias)


@pytest.mark.parametrize("skip", ["fc2", ["block.fc2"], "block.*"])
def test_quantize_model_skip(skip):
    model = make_model(skip=skip)
    assert type(model.block.fc2) is nn.Linear
    assert isinstance(model.fc1, HQQLinear) and isinstance(model.fc3, HQQLinear)


def test_quantize_model_bad_input():
    with pytest.raises(TypeError, match="BaseQuantizeConfig"):
        quantize_model(Tiny(), {"nbits": 4}, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        quantize_model(
            "model", BaseQuantizeConfig(nbits=4), compute_dtype=torch.float32, device="cpu"
        )
    with pytest.raises(ValueError, match=r"bare nn\.Linear"):
        quantize_model(
            nn.Linear(8, 8),
            BaseQuantizeConfig(nbits=4, group_size=8),
            compute_dtype=torch.float32,
            device="cpu",
        )


# functional_call: values, purity, errors


@pytest.mark.parametrize("dora", [False, True])
def test_functional_call_matches_reference(dora):
    model = make_model()
    adapters = make_adapters(model, dora=dora)
    x = torch.randn(5, 32)
    before = snapshot(model)
    y = functional_call(model, adapters, (x,))
    assert_unchanged(model, before)
    assert_close_rel(y, reference(model, to64(adapters), x.double()), torch.float32, factor=10)


def test_functional_call_subset_and_kwargs():
    model = make_model()
    adapters = make_adapters(model)
    x = torch.randn(3, 32)
    y = functional_call(model, {"fc3": adapters["fc3"]}, (), {"x": x})
    zero = {p: {**a, "lora_B": torch.zeros_like(a["lora_B"])} for p, a in adapters.items()}
    zero["fc3"] = adapters["fc3"]
    assert_close_rel(y, reference(model, to64(zero), x.double()), torch.float32, factor=10)
    assert torch.equal(functional_call(model, {}, x), model(x))


@settings(max_examples=8)
@given(
    r=st.integers(1, 8),
    nbits=st.sampled_from([2, 3, 4, 8]),
    dora=st.booleans(),
    seed=st.integers(0, 99),
)
def test_functional_call_property(r, nbits, dora, seed):
    model = make_model(nbits=nbits, seed=seed)
    adapters = make_adapters(model, dora=dora, r=r, seed=seed)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed))
    y = functional_call(model, adapters, (x,))
    assert_close_rel(y, reference(model, to64(adapters), x.double()), torch.float32, factor=10)


def test_functional_call_on_shims_ignores_their_adapters():
    peft = pytest.importorskip("peft")
    model = make_model()
    adapters = make_adapters(model, dora=True)
    x = torch.randn(4, 32)
    expected = functional_call(model, adapters, (x,))
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["fc1", "fc2", "fc3"], init_lora_weights=False
    )
    wrapped = peft.get_peft_model(model, config).base_model.model
    assert type(wrapped.fc1).__name__ == "HqqLoraLinear"
    before = snapshot(wrapped)
    y = functional_call(wrapped, adapters, (x,))
    assert_unchanged(wrapped, before)
    assert torch.equal(y, expected)
    assert not torch.allclose(wrapped(x), expected)


def test_functional_call_restores_model_on_exception():
    model = make_model()
    adapters = make_adapters(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Expected `x` of shape \(\.\.\., 32\)"):
        functional_call(model, adapters, (torch.randn(3, 31),))
    assert_unchanged(model, before)

    class Boom(Tiny):
        def forward(self, x):
            self.fc3(x[..., :48].new_zeros(1, 48))
            raise RuntimeError("boom")

    boom = Boom()
    boom.load_state_dict(Tiny().state_dict())
    quantize_model(
        boom,
        BaseQuantizeConfig(nbits=4, group_size=16),
        compute_dtype=torch.float32,
        device="cpu",
        progress=False,
    )
    before = snapshot(boom)
    with pytest.raises(RuntimeError, match="boom"):
        functional_call(boom, make_adapters(boom), (torch.randn(2, 32),))
    assert_unchanged(boom, before)


def test_functional_call_bad_paths():
    model = make_model(skip="fc2")
    adapters = make_adapters(make_model())
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"unknown paths \['nope'\] and non-HQQ modules \['block.fc2'\]"
    ):
        functional_call(model, {"nope": adapters["fc1"], **adapters}, (torch.randn(2, 32),))
    with pytest.raises(ValueError, match=r"lora_A'\]` of shape \(r, 32\)"):
        functional_call(model, {"fc1": adapters["fc3"]}, (torch.randn(2, 32),))
    with pytest.raises(TypeError, match="dict of module path"):
        functional_call(model, [adapters["fc1"]], (torch.randn(2, 32),))
    assert_unchanged(model, before)


# torch.func


@pytest.mark.parametrize("dora", [False, True])
def test_grad_matches_dense_autograd(dora):
    model = make_model()
    adapters = make_adapters(model, dora=dora)
    x = torch.randn(6, 32)
    target = torch.randn(6, 16)

    def loss(trainable):
        full = {p: {**trainable[p], "scaling": adapters[p]["scaling"]} for p in trainable}
        return (functional_call(model, full, (x,)) - target).pow(2).mean()

    trainable = {p: {k: v for k, v in a.items() if k != "scaling"} for p, a in adapters.items()}
    grads = torch.func.grad(loss)(trainable)

    ref = to64(adapters, requires_grad=True)
    (reference(model, ref, x.double()) - target.double()).pow(2).mean().backward()
    for path, g in grads.items():
        assert set(g) == set(trainable[path])
        for key, value in g.items():
            assert_close_rel(value, ref[path][key].grad, torch.float32, factor=50)


def test_vmap_over_rows():
    model = make_model()
    adapters = make_adapters(model, dora=True)
    x = torch.randn(5, 32)
    rows = torch.func.vmap(lambda xi: functional_call(model, adapters, (xi,)))(x)
    assert_close_rel(rows, functional_call(model, adapters, (x,)), torch.float32, factor=10)


def test_vmap_over_stacked_adapters():
    model = make_model()
    ensemble = [make_adapters(model, dora=True, seed=s) for s in (1, 5, 9)]
    stacked = {
        path: {k: torch.stack([a[path][k] for a in ensemble]) for k in ensemble[0][path]}
        for path in ensemble[0]
    }
    x = torch.randn(4, 32)
    out = torch.func.vmap(lambda a: functional_call(model, a, (x,)))(stacked)
    assert out.shape == (3, 4, 16)
    for i, a in enumerate(ensemble):
        assert_close_rel(out[i], reference(model, to64(a), x.double()), torch.float32, factor=10)


def test_jvp_matches_reference():
    model = make_model()
    adapters = make_adapters(model)
    x = torch.randn(4, 32)
    gen = torch.Generator().manual_seed(3)
    tangents = {
        p: {
            k: torch.randn(v.shape, generator=gen) if k != "scaling" else torch.zeros(())
            for k, v in a.items()
        }
        for p, a in adapters.items()
    }
    _, tangent_out = torch.func.jvp(
        lambda a: functional_call(model, a, (x,)), (adapters,), (tangents,)
    )
    _, ref_tangent = torch.func.jvp(
        lambda a: reference(model, a, x.double()), (to64(adapters),), (to64(tangents),)
    )
    assert_close_rel(tangent_out, ref_tangent, torch.float32, factor=10)


# torch.compile


def test_compile_apply_lora_fullgraph():
    model = make_model()
    params = make_adapters(model, dora=True)["fc1"]
    x = torch.randn(3, 32)
    torch._dynamo.reset()
    compiled = torch.compile(apply_lora, fullgraph=True, backend="aot_eager")
    assert_close_rel(
        compiled(model.fc1, params, x), apply_lora(model.fc1, params, x), torch.float32
    )


def test_compile_whole_model_functional_call_fullgraph():
    model = make_model()
    adapters = make_adapters(model)
    x = torch.randn(3, 32)
    before = snapshot(model)
    torch._dynamo.reset()
    forward = torch.compile(
        lambda a, x: functional_call(model, a, (x,)), fullgraph=True, backend="aot_eager"
    )
    y = forward(adapters, x)
    assert_unchanged(model, before)
    assert_close_rel(y, reference(model, to64(adapters), x.double()), torch.float32, factor=10)
    loss = torch.compile(lambda a: forward(a, x).pow(2).sum(), fullgraph=True, backend="aot_eager")
    grads = torch.func.grad(lambda a: functional_call(model, a, (x,)).pow(2).sum())(adapters)
    leaves = {
        p: {k: v.detach().requires_grad_() for k, v in a.items()} for p, a in adapters.items()
    }
    loss(leaves).backward()
    for path in grads:
        assert_close_rel(
            leaves[path]["lora_B"].grad, grads[path]["lora_B"], torch.float32, factor=10
        )


def quantized_bert(num_hidden_layers=1):
    """A small transformers BertModel (eval mode), quantized to 4 bits but its pooler."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return quantize_model(
        model,
        BaseQuantizeConfig(nbits=4, group_size=16),
        compute_dtype=torch.float32,
        device="cpu",
        skip="pooler.dense",
        progress=False,
    )


def test_functional_call_on_transformers_bert():
    model = quantized_bert()
    path = "encoder.layer.0.attention.self.query"
    params = random_adapter(model.get_submodule(path), 4)
    ids = torch.randint(0, 50, (2, 7))
    before = snapshot(model)
    out = functional_call(model, {path: params}, (), {"input_ids": ids}).last_hidden_state
    assert_unchanged(model, before)
    zero = {path: {**params, "lora_B": torch.zeros_like(params["lora_B"])}}
    base = functional_call(model, zero, (), {"input_ids": ids}).last_hidden_state
    assert torch.allclose(base, model(input_ids=ids).last_hidden_state, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-4)
    grads = torch.func.grad(
        lambda a: functional_call(model, a, (), {"input_ids": ids}).last_hidden_state.pow(2).mean()
    )({path: params})
    assert grads[path]["lora_B"].abs().sum() > 0


# inject_adapter / get_adapter (need the shim)


def test_inject_and_get_adapter():
    pytest.importorskip("hqqlora._nn")
    from hqqlora._nn import HqqLoraLinear

    model = make_model()
    x = torch.randn(3, 32)
    base_out = model(x)
    fc1 = model.fc1
    out = inject_adapter(
        model, target_modules=["fc1", "fc2"], r=4, lora_alpha=8, init_lora_weights=False
    )
    assert out is model
    assert isinstance(model.fc1, HqqLoraLinear) and model.fc1.base_layer is fc1
    assert isinstance(model.block.fc2, HqqLoraLinear) and isinstance(model.fc3, HQQLinear)
    adapters = get_adapter(model)
    assert sorted(adapters) == ["block.fc2", "fc1"]
    assert float(adapters["fc1"]["scaling"]) == 2.0
    assert_close_rel(functional_call(model, adapters, (x,)), model(x), torch.float32, factor=10)
    assert not torch.allclose(model(x), base_out)
    with pytest.raises(ValueError, match="matched none"):
        inject_adapter(model, target_modules=["nope"], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="'other'"):
        get_adapter(model, "other")


def test_functional_call_accepts_group_constant_adapters():
    torch.manual_seed(0)
    model = hqqlora.quantize_model(
        torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)),
        BaseQuantizeConfig(nbits=4, group_size=16),
        compute_dtype=torch.float32,
        device="cpu",
    )
    adapters = {
        "0": hqqlora.init_lora(model[0], 4, 8, group_constant=True, init_lora_weights=False),
        "2": hqqlora.init_lora(model[2], 4, 8, init_lora_weights=False),
    }
    assert adapters["0"]["lora_A"].shape == (4, 64 // 16)
    x = torch.randn(3, 64)
    expected = hqqlora.apply_lora(
        model[2], adapters["2"], torch.relu(hqqlora.apply_lora(model[0], adapters["0"], x))
    )
    torch.testing.assert_close(hqqlora.functional_call(model, adapters, (x,)), expected)
