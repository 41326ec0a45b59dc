"""Routing edge cases found by an adversarial review (issue 10, items 1-4 and 8): each
test failed on the first version of the routing (e5af0a3)."""

from __future__ import annotations

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn
from torch.utils.checkpoint import checkpoint

from hqqlora import HqqLoraLinear, apply_lora, functional_call, prepare_model
from tests.helpers import make_layer, random_adapter


def _layer(**kwargs):
    layer = make_layer(**kwargs)
    layer.bias = layer.bias.detach()  # HQQ keeps a non-leaf clone; as quantize_model
    return layer


def _close(actual, expected):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-5 * scale


def test_functional_call_refuses_a_layer_with_an_instance_forward():
    # hqq's own prepare_for_inference (patch_hqq_inference), accelerate's
    # add_hook_to_module and `layer.forward = torch.compile(layer.forward)` set an
    # instance attribute `forward`, which would shadow the routed one: refused loudly.
    layer = _layer()
    original = layer.forward
    layer.forward = lambda x: original(x)
    model = nn.Sequential(layer)
    p = random_adapter(layer, 4)
    with pytest.raises(ValueError, match="instance `forward`"):
        functional_call(model, {"0": p}, (torch.randn(3, 64),))


def test_functional_call_routes_through_accelerate_style_hooks_added_after_prepare():
    layer = _layer()
    model = prepare_model(nn.Sequential(layer))
    layer._old_forward = layer.forward  # what accelerate's add_hook_to_module does
    layer.forward = lambda *a, **k: layer._old_forward(*a, **k)
    p = random_adapter(layer, 4)
    x = torch.randn(3, 64)
    _close(functional_call(model, {"0": p}, (x,)), apply_lora(layer, p, x))


def test_building_a_layer_of_a_prepared_class_keeps_routing():
    # HQQLinear.__init__ calls self.set_backend, a classmethod that assigns
    # cls.forward: on the shared routed class that erases routing process-wide.
    layer = _layer()
    model = prepare_model(nn.Sequential(layer))
    routed = type(layer)
    routed_forward = routed.__dict__["forward"]
    p = random_adapter(layer, 4)
    x = torch.randn(3, 64)
    try:
        type(layer)(  # "a layer like this one", or type(layer).from_weights(...)
            nn.Linear(64, 48), BaseQuantizeConfig(nbits=4, group_size=16), device="cpu"
        )
        _close(functional_call(model, {"0": p}, (x,)), apply_lora(layer, p, x))
        layer.set_backend(HQQLinear.backend)  # the same through an instance
        _close(functional_call(model, {"0": p}, (x,)), apply_lora(layer, p, x))
    finally:
        routed.forward = routed_forward  # do not poison the other tests


def test_checkpoint_around_functional_call_gives_exact_gradients():
    # Checkpointing *inside* the model recomputes the forward during backward, after the
    # call's routing ended (a documented limit, as for torch.func.functional_call);
    # checkpointing *around* functional_call re-enters it on recomputation.
    model = nn.Sequential(_layer())
    leaf = lambda p: {k: v.clone().requires_grad_(k != "scaling") for k, v in p.items()}  # noqa: E731
    p, q = leaf(random_adapter(model[0], 4)), leaf(random_adapter(model[0], 4))
    x = torch.randn(3, 64, requires_grad=True)
    for use_reentrant in (True, False):
        p["lora_B"].grad = q["lora_B"].grad = None
        checkpoint(
            lambda x: functional_call(model, {"0": p}, (x,)), x, use_reentrant=use_reentrant
        ).pow(2).sum().backward()
        apply_lora(model[0], q, x).pow(2).sum().backward()
        _close(p["lora_B"].grad, q["lora_B"].grad)


@pytest.mark.parametrize("config", [{"use_dora": True, "lora_dropout": 0.1}, "dora"])
def test_shim_refuses_a_config_it_cannot_read(config):
    # A dict (what hqqlora.load_adapter returns as the config) was silently ignored:
    # plain LoRA instead of DoRA, no dropout. Honouring a dict would do too.
    try:
        shim = HqqLoraLinear(_layer(), "a", config=config, r=4, lora_alpha=8)
    except (TypeError, ValueError):
        return
    assert isinstance(config, dict), "a config that is no config was accepted"
    assert shim.use_dora["a"] and shim.lora_dropout["a"] == 0.1, "the config was ignored"


def test_compiled_functional_call_naming_a_peft_shim_after_prepare_model():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.hqq import HqqLoraLinear as PeftHqq

    layer = _layer()
    model = nn.Sequential(PeftHqq(layer, "x", config=peft.LoraConfig(r=2, lora_alpha=4), r=2))
    prepare_model(model)  # what the README and the error message prescribe
    p = random_adapter(layer, 4)
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, x: functional_call(model, {"0": a}, (x,)), fullgraph=True, backend="eager"
    )
    _close(compiled(p, x), apply_lora(layer, p, x))


def test_functional_call_ignores_a_merged_shims_own_adapter():
    layer = _layer(nbits=8)
    shim = HqqLoraLinear(layer, "own", r=4, lora_alpha=8, init_lora_weights=False)
    shim.merge()  # its own adapter is now inside shim.base_layer
    p = random_adapter(layer, 4)
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = functional_call(nn.Sequential(shim), {"0": p}, (x,))
    _close(got, apply_lora(layer, p, x))  # "its own adapters ignored"


def test_hooks_on_the_base_layer_still_run():
    layer = _layer()
    calls = []
    layer.register_forward_hook(lambda module, args, out: calls.append(1))
    HqqLoraLinear(layer, "a", r=2, lora_alpha=4)(torch.randn(2, 64))
    apply_lora(layer, random_adapter(layer, 2), torch.randn(2, 64))
    assert len(calls) == 2  # as PEFT's shim (base_layer(x)) and before e5af0a3
