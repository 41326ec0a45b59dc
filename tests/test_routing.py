"""Model-level routing: functional_call is reentrant and thread-safe, every HQQ layer takes
the pure path under torch.func, and model(..., adapter_names=[...]) reaches every shim."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn

import hqqlora
from hqqlora import functional_call, inject_adapter, prepare_model, quantize_model
from tests.helpers import assert_close_rel, dense_reference, random_adapter
from tests.test_model import assert_unchanged, quantized_bert, snapshot

BASE = "__base__"


class Chain(nn.Module):
    """x → fc1 → gelu → fc2 → gelu → fc3: HQQ layers built with HQQ's own constructor."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        config = BaseQuantizeConfig(nbits=4, group_size=16)
        for name, (d_in, d_out) in {"fc1": (32, 48), "fc2": (48, 48), "fc3": (48, 16)}.items():
            linear = nn.Linear(d_in, d_out)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
                linear.bias.copy_(torch.randn(d_out, generator=gen) * 0.1)
            layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
            layer.bias = layer.bias.detach()  # HQQ keeps a non-leaf clone; as quantize_model
            setattr(self, name, layer)

    def forward(self, x):
        h = nn.functional.gelu(self.fc1(x))
        h = nn.functional.gelu(self.fc2(h))
        return self.fc3(h)


def chain_reference(model, adapters, x):
    """The chain in float64 from dequantized weights; missing adapters mean none."""
    h = x.double()
    for i, name in enumerate(("fc1", "fc2", "fc3")):
        layer = getattr(model, name)
        layer = getattr(layer, "base_layer", layer)
        h = dense_reference(layer, [adapters[name]] if name in adapters else [], h)
        if i < 2:
            h = nn.functional.gelu(h)
    return h


# -- every HQQ layer takes the pure path under transforms (issue 10, item 2) ------------


def test_vmap_and_jvp_with_unadapted_hqq_layers():
    model = Chain()  # plain HQQLinear layers, never prepared: the first call prepares them
    p = random_adapter(model.fc1, 4)
    x = torch.randn(5, 32)
    rows = torch.func.vmap(lambda xi: functional_call(model, {"fc1": p}, (xi,)))(x)
    assert_close_rel(rows, chain_reference(model, {"fc1": p}, x), torch.float32, factor=10)
    tangent = {k: torch.randn_like(v) if k != "scaling" else torch.zeros(()) for k, v in p.items()}
    _, out_t = torch.func.jvp(lambda a: functional_call(model, {"fc1": a}, (x,)), (p,), (tangent,))
    to64 = lambda d: {k: v.double() for k, v in d.items()}  # noqa: E731
    _, ref_t = torch.func.jvp(
        lambda a: chain_reference(model, {"fc1": a}, x), (to64(p),), (to64(tangent),)
    )
    assert_close_rel(out_t, ref_t, torch.float32, factor=10)


def test_vmap_through_shims_without_active_adapters():
    model = Chain()
    inject_adapter(model, "a", target_modules=["fc2", "fc3"], r=2, lora_alpha=4)
    model.fc3.enable_adapters(False)  # a shim with no adapter in use
    p = random_adapter(model.fc1, 4)
    x = torch.randn(3, 32)
    rows = torch.func.vmap(lambda xi: functional_call(model, {"fc1": p}, (xi,)))(x)
    # fc2's adapter has zero B (default init) and fc3's is off: the base output
    assert_close_rel(rows, chain_reference(model, {"fc1": p}, x), torch.float32, factor=10)


def test_vmap_through_peft_shims():
    peft = pytest.importorskip("peft")
    model = Chain()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).base_model.model
    p = random_adapter(model.fc1, 4)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = functional_call(wrapped, {"fc1": p}, (x,))
    rows = torch.func.vmap(lambda xi: functional_call(wrapped, {"fc1": p}, (xi,)))(x)
    assert_close_rel(rows, expected, torch.float32, factor=10)


# -- reentrant and thread-safe (issue 10, item 3) --------------------------------------


def test_functional_call_is_thread_safe():
    model = Chain()
    x = torch.randn(4, 32)
    adapters = [
        {
            name: random_adapter(getattr(model, name), 2, seed=10 * k + i)
            for i, name in enumerate(("fc1", "fc3"))
        }
        for k in range(4)
    ]
    expected = [chain_reference(model, a, x) for a in adapters]
    plain = model(x)
    before = snapshot(model)
    errors, barrier = [], threading.Barrier(4)

    def work(k):
        try:
            barrier.wait()
            for _ in range(25):
                assert_close_rel(
                    functional_call(model, adapters[k], (x,)), expected[k], torch.float32, factor=10
                )
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert_unchanged(model, before)
    assert isinstance(model.fc1, HQQLinear)
    assert torch.equal(model(x), plain)


def test_functional_call_is_reentrant_and_nests():
    model, inner_model = Chain(0), Chain(1)
    p, q = random_adapter(model.fc1, 2), random_adapter(inner_model.fc3, 2, seed=4)
    x = torch.randn(2, 32)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            # a functional_call inside a functional_call, on another model
            side = functional_call(inner_model, {"fc3": q}, (x,))
            return self.body(x) + side

    expected = chain_reference(model, {"fc1": p}, x) + chain_reference(inner_model, {"fc3": q}, x)
    out = functional_call(Outer(), {"body.fc1": p}, (x,))
    assert_close_rel(out, expected, torch.float32, factor=10)


def test_prepared_layers_keep_their_behaviour_and_pickle_as_hqq():
    model = Chain()
    x = torch.randn(3, 32)
    before_out, before = model(x), snapshot(model)
    prepare_model(model)
    assert_unchanged(model, before)
    assert isinstance(model.fc1, HQQLinear) and type(model.fc1).__name__ == "HQQLinear"
    assert torch.equal(model(x), before_out)  # outside hqqlora calls: HQQ's own forward
    restored = pickle.loads(pickle.dumps(model.fc1))
    assert type(restored) is HQQLinear
    assert torch.equal(restored(x), model.fc1(x))
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), before_out)


def test_compile_needs_prepared_layers():
    model = Chain()
    p = random_adapter(model.fc1, 2)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, x: functional_call(model, {"fc1": a}, (x,)), fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception, match=r"prepare_model"):
        compiled(p, torch.randn(2, 32))
    prepare_model(model)
    torch._dynamo.reset()
    x = torch.randn(2, 32)
    assert_close_rel(
        compiled(p, x), chain_reference(model, {"fc1": p}, x), torch.float32, factor=10
    )


def test_functional_call_refuses_ambiguous_paths():
    model = Chain()
    inject_adapter(model, "a", target_modules=["fc2"], r=2, lora_alpha=4)
    p = random_adapter(model.fc2.base_layer, 2)
    with pytest.raises(ValueError, match=r"non-HQQ modules \['fc2.base_layer'\]"):
        functional_call(model, {"fc2.base_layer": p}, (torch.randn(2, 32),))
    shared = nn.Sequential()
    shared.add_module("a", model.fc2.base_layer)
    shared.add_module("b", model.fc2.base_layer)
    with pytest.raises(ValueError, match="shared between paths"):
        functional_call(shared, {"a": p}, (torch.randn(2, 48),))


# -- model(..., adapter_names=[...]) (issue 10, item 1) --------------------------------


def _bert():
    model = quantized_bert(num_hidden_layers=2)
    targets = ["query", "value", "dense"]
    inject_adapter(model, "a", target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    inject_adapter(
        model,
        "b",
        target_modules=["query", "value"],
        r=2,
        lora_alpha=8,
        use_dora=True,
        init_lora_weights=False,
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, hqqlora.HqqLoraLinear) and "b" in m.lora_magnitude_vector:
                w = m.lora_magnitude_vector["b"].weight
                w.mul_(1 + 0.3 * torch.rand(w.shape, generator=gen))  # c ≠ 1
    return model.eval()


def _set_everywhere(model, name):
    for m in model.modules():
        if isinstance(m, hqqlora.HqqLoraLinear):
            if name == BASE:
                m.enable_adapters(False)
            else:
                m.enable_adapters(True)
                m.set_adapter(name)


def test_model_adapter_names_route_to_every_layer():
    model = _bert()
    ids = torch.randint(0, 50, (3, 7))
    names = ["a", "b", BASE]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).last_hidden_state
        for i, name in enumerate(names):
            _set_everywhere(model, name)
            row = model(input_ids=ids[i : i + 1]).last_hidden_state
            assert_close_rel(mixed[i : i + 1], row, torch.float32, factor=10)
        _set_everywhere(model, "a")
        # after the call, nothing lingers: a plain call uses the active adapter
        assert torch.equal(
            model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        )
        active = model(input_ids=ids).last_hidden_state
        assert not torch.allclose(active[1], mixed[1], atol=1e-4)


def test_model_adapter_names_on_a_model_without_kwargs():
    model = quantize_model(
        nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)),
        BaseQuantizeConfig(nbits=4, group_size=16),
        compute_dtype=torch.float32,
        device="cpu",
        progress=False,
    )
    inject_adapter(
        model, "a", target_modules=["0", "2"], r=2, lora_alpha=4, init_lora_weights=False
    )
    inject_adapter(model, "b", target_modules=["2"], r=2, lora_alpha=4, init_lora_weights=False)
    model.eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = model(x, adapter_names=["b", "a", BASE])
        for i, name in enumerate(["b", "a", BASE]):
            _set_everywhere(model, name)
            assert_close_rel(y[i : i + 1], model(x[i : i + 1]), torch.float32, factor=10)


def test_model_adapter_names_errors_leave_no_state():
    model = quantize_model(
        nn.Sequential(nn.Linear(32, 16)),
        BaseQuantizeConfig(nbits=4, group_size=16),
        compute_dtype=torch.float32,
        device="cpu",
        progress=False,
    )
    inject_adapter(model, "a", target_modules=["0"], r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="eval mode"):
        model.train()(x, adapter_names=["a", BASE])
    model.eval()
    expected = model(x)
    with pytest.raises(ValueError, match=r"unknown \['zz'\]"):
        model(x, adapter_names=["zz", "a"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(x, adapter_names=["a"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(x, adapter_names="a")
    assert hqqlora._route.adapter_names_in_use() is None
    assert torch.equal(model(x), expected)


def test_model_adapter_names_are_per_thread():
    model = _bert()
    ids = torch.randint(0, 50, (2, 5))
    _set_everywhere(model, "a")
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
        mixed = model(input_ids=ids, adapter_names=["b", BASE]).last_hidden_state
    errors = []

    def work(with_names):
        try:
            for _ in range(10):
                with torch.no_grad():
                    if with_names:
                        out = model(input_ids=ids, adapter_names=["b", BASE]).last_hidden_state
                        torch.testing.assert_close(out, mixed)
                    else:
                        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, plain)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k % 2 == 0,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
