"""hqqlora inside PEFT (``use_in_peft``), against PEFT's own HQQ layers as the oracle.

The same quantized model gets PEFT's native ``HqqLoraLinear`` on one side and
hqqlora's layer (through ``hqqlora.use_in_peft``) on the other, with the same adapter
weights; PEFT's model-level API must behave the same on both, except where PEFT's
layer is wrong (bias lost on merge, drifting unmerge, no DoRA in mixed batches).
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn

import hqqlora
from hqqlora import HqqLoraLinear, dequantize, quantize_model, use_in_peft
from tests.helpers import assert_close_rel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hqqlora._peft_layer import PeftHqqLoraLinear  # noqa: E402

BASE = "__base__"
QUANT = BaseQuantizeConfig(nbits=4, group_size=16)


def cached_copy(build):
    """Quantize once per session; each call returns a deep copy (HQQ's optimizer is slow)."""
    build = functools.cache(build)
    return lambda: copy.deepcopy(build())


@cached_copy
def chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    return quantize_model(model, QUANT, compute_dtype=torch.float32, device="cpu", progress=False)


@cached_copy
def bert():
    """A 1-layer BertModel (64 wide) with every Linear quantized, the pooler included."""
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return quantize_model(model, QUANT, compute_dtype=torch.float32, device="cpu", progress=False)


MODELS = {
    "chain": (chain, ["0", "2"], lambda: (torch.randn(4, 64),)),
    "bert": (bert, ["query", "value", "dense"], lambda: (torch.randint(0, 50, (4, 7)),)),
}


def output(model, inputs, **kwargs):
    with torch.no_grad():
        out = model(*inputs, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def lora_config(targets, r=4, **options):
    return LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **options
    )


def copy_adapters(native, ours):
    """Ours gets native's adapter weights (magnitudes moved off their init first)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    state = {k: v for k, v in native.state_dict().items() if ".lora_" in k}
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys


def both(kind, **options):
    """(PEFT's native model, PEFT with hqqlora's layers), same base and adapter weights."""
    make, targets, inputs = MODELS[kind]
    config = lora_config(targets, **options)
    native = get_peft_model(make(), config)
    ours = get_peft_model(make(), use_in_peft(config))
    copy_adapters(native, ours)
    return native.eval(), ours.eval(), inputs()


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def grad_flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def quant_state(layer):
    return [layer.W_q, layer.meta["scale"], layer.meta["zero"], layer.bias]


def codes_agree(W, V, nbits=4):
    """Identical dense weights requantize to identical codes; allow the odd rounding tie."""
    step = (W.float().max() - W.float().min()).item() / 2**nbits
    return ((W.float() - V.float()).abs() > 1e-3 * step).float().mean().item() < 0.01


# -- the layer PEFT builds, and what PEFT sees of it ---------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_peft_puts_our_layer_on_every_hqq_layer_and_counts_it(kind):
    native, ours, _ = both(kind, use_dora=True)
    ours_layers, native_layers = lora_layers(ours), lora_layers(native)
    assert sorted(ours_layers) == sorted(native_layers) and ours_layers
    for layer in ours_layers.values():
        assert type(layer) is PeftHqqLoraLinear
        assert isinstance(layer, LoraLayer) and isinstance(layer, HqqLoraLinear)
    assert ours.get_nb_trainable_parameters() == native.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0
    assert grad_flags(ours) == grad_flags(native)
    status, expected = ours.get_model_status(), native.get_model_status()
    assert status == expected  # trainable/total params, adapters, requires_grad, devices


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("dora", [False, True])
def test_outputs_and_saved_files_equal_peft(kind, dora, tmp_path):
    native, ours, inputs = both(kind, use_dora=dora, use_rslora=True)
    assert_close_rel(output(ours, inputs), output(native, inputs), torch.float32, factor=4)
    native.save_pretrained(tmp_path / "native")
    ours.save_pretrained(tmp_path / "ours")
    saved = {
        side: load_file(tmp_path / side / "adapter_model.safetensors")
        for side in ("native", "ours")
    }
    assert sorted(saved["ours"]) == sorted(saved["native"])
    assert len(saved["ours"]) == 2 * len(lora_layers(ours)) + (
        len(lora_layers(ours)) if dora else 0
    )
    for key, tensor in saved["native"].items():
        assert torch.equal(saved["ours"][key], tensor), key
    configs = {
        side: json.loads((tmp_path / side / "adapter_config.json").read_text())
        for side in ("native", "ours")
    }
    for config in configs.values():  # PEFT keeps target_modules as a set: any order
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
    assert configs["ours"] == configs["native"]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("dora", [False, True])
def test_from_pretrained_reads_peft_files_into_our_layers(kind, dora, tmp_path):
    native, _, inputs = both(kind, use_dora=dora)
    native.save_pretrained(tmp_path)
    make = MODELS[kind][0]
    reference = PeftModel.from_pretrained(make(), tmp_path).eval()
    config = use_in_peft(LoraConfig.from_pretrained(tmp_path))
    low_cpu = kind == "chain"  # PEFT's other loading path: adapters built on meta first
    ours = PeftModel.from_pretrained(make(), tmp_path, config=config, low_cpu_mem_usage=low_cpu)
    ours.eval()
    assert all(type(m) is PeftHqqLoraLinear for m in lora_layers(ours).values())
    assert grad_flags(ours) == grad_flags(reference)  # frozen: is_trainable=False
    y = output(ours, inputs)
    assert_close_rel(y, output(reference, inputs), torch.float32, factor=4)
    assert_close_rel(y, output(native, inputs), torch.float32, factor=4)
    # a further adapter file: add_adapter with the registered config, then load_adapter
    ours.add_adapter("again", use_in_peft(LoraConfig.from_pretrained(tmp_path)))
    ours.load_adapter(tmp_path, "again")
    ours.set_adapter("again")
    assert all(type(m) is PeftHqqLoraLinear for m in lora_layers(ours).values())
    assert torch.equal(output(ours, inputs), y)


@pytest.mark.parametrize("kind", MODELS)
def test_add_set_disable_adapter_names_and_delete_match_peft(kind):
    native, ours, inputs = both(kind)
    targets = MODELS[kind][1][:1]  # "b" on fewer layers: some layers lack it
    config_b = lora_config(targets, use_rslora=True)
    native.add_adapter("b", config_b)
    ours.add_adapter("b", use_in_peft(config_b))
    assert grad_flags(ours) == grad_flags(native)
    copy_adapters(native, ours)

    def same(**kwargs):
        assert_close_rel(
            output(ours, inputs, **kwargs), output(native, inputs, **kwargs), torch.float32, 4
        )

    for active in ("b", ["default", "b"], ["b", "default"], "default"):
        if isinstance(active, str):
            native.set_adapter(active)
            ours.set_adapter(active)
        else:  # PeftModel.set_adapter takes one name; its tuner takes a list
            native.base_model.set_adapter(active)
            ours.base_model.set_adapter(active)
        assert grad_flags(ours) == grad_flags(native)
        same()
    with native.disable_adapter(), ours.disable_adapter():
        same()
        base = output(ours, inputs)
    assert not torch.equal(output(ours, inputs), base)  # enabled again
    same(adapter_names=["default", "b", BASE, "b"])
    for names, flag in (("b", True), (["default", "b"], False), ("default", True)):
        native.set_requires_grad(names, requires_grad=flag)
        ours.set_requires_grad(names, requires_grad=flag)
        assert grad_flags(ours) == grad_flags(native)
    assert ours.get_model_status() == native.get_model_status()
    native.delete_adapter("b")
    ours.delete_adapter("b")
    assert ours.get_model_status() == native.get_model_status()
    assert sorted(ours.state_dict()) == sorted(native.state_dict())
    same()


# -- where PEFT's own layer is wrong -----------------------------------------------------


def hqq_requantized(base, weight):
    """HQQ's own quantizer on `weight` with `base`'s settings (independent of hqqlora)."""
    config = {**copy.deepcopy(base.quant_config), "offload_meta": base.offload_meta}
    layer = HQQLinear(None, config, compute_dtype=base.compute_dtype, device=base.device)
    config.pop("offload_meta")
    layer.quantize(weight.detach().to(base.compute_dtype), **config)
    return layer


def hqq_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, HQQLinear)}


def test_merge_and_unload_keeps_the_bias_and_requantizes_once(monkeypatch):
    native, ours, _ = both("chain")
    config_b = lora_config(["0", "2"])
    native.add_adapter("b", config_b)
    ours.add_adapter("b", use_in_peft(config_b))
    copy_adapters(native, ours)
    native.base_model.set_adapter(["default", "b"])
    ours.base_model.set_adapter(["default", "b"])
    prefix = "base_model.model."
    originals = {
        n.removeprefix(prefix): copy.deepcopy(m.base_layer) for n, m in lora_layers(ours).items()
    }
    deltas = {
        n.removeprefix(prefix): m.get_delta_weight("default") + m.get_delta_weight("b")
        for n, m in lora_layers(ours).items()
    }
    calls = []
    quantize_like = hqqlora._merge.quantize_like
    monkeypatch.setattr(
        hqqlora._merge, "quantize_like", lambda *a, **k: calls.append(1) or quantize_like(*a, **k)
    )
    merged = ours.merge_and_unload()
    reference = native.merge_and_unload()
    assert len(calls) == len(originals)  # two adapters per layer, one requantization each
    for name, layer in hqq_layers(merged).items():
        original = originals[name]
        W = dequantize(original) + deltas[name]
        assert codes_agree(dequantize(layer), dequantize(hqq_requantized(original, W)))
        assert torch.equal(layer.bias, original.bias)  # kept
        assert hqq_layers(reference)[name].bias is None  # PEFT drops it
    assert not lora_layers(merged)


def test_unmerge_restores_the_layers_exactly():
    native, ours, inputs = both("chain")
    originals = {
        n: [t.clone() for t in quant_state(m.base_layer)] for n, m in lora_layers(ours).items()
    }
    with torch.no_grad():
        y = output(ours, inputs)
        for model in (native, ours):
            model.merge_adapter()
            model.unmerge_adapter()
    for name, layer in lora_layers(ours).items():
        for t, t0 in zip(quant_state(layer.base_layer), originals[name], strict=True):
            assert torch.equal(t, t0)
    assert torch.equal(output(ours, inputs), y)
    # PEFT requantizes on unmerge: its layers drift, and their bias is gone.
    drifted = [
        name
        for name, layer in lora_layers(native).items()
        if not torch.equal(dequantize(layer.base_layer), dequantize(originals_layer(ours, name)))
    ]
    assert drifted and all(m.base_layer.bias is None for m in lora_layers(native).values())


def originals_layer(model, name):
    return lora_layers(model)[name].base_layer


@pytest.mark.parametrize("kind", MODELS)
def test_dora_in_mixed_batches(kind):
    native, ours, inputs = both(kind, use_dora=True)
    config_b = lora_config(MODELS[kind][1], r=2, use_dora=True)
    native.add_adapter("b", config_b)
    ours.add_adapter("b", use_in_peft(config_b))
    copy_adapters(native, ours)
    names = ["b", BASE, "default", "b"]
    mixed = output(ours, inputs, adapter_names=names)
    for i, name in enumerate(names):
        row = tuple(t[i : i + 1] for t in inputs)
        if name == BASE:
            with native.disable_adapter():
                expected = output(native, row)
        else:
            native.set_adapter(name)
            expected = output(native, row)
        assert_close_rel(mixed[i : i + 1], expected, torch.float32, factor=4)
    # PEFT refuses DoRA in mixed batches (and leaves its hooks behind: checked last).
    with pytest.raises(ValueError, match="DoRA"):
        output(native, inputs, adapter_names=names)


# -- the call itself -------------------------------------------------------------------


def test_use_in_peft_copies_the_config_and_refuses_what_it_cannot_honour():
    config = lora_config(["0"], use_dora=True)
    registered = use_in_peft(config)
    assert registered is not config and config._custom_modules is None
    assert registered._custom_modules == {HQQLinear: PeftHqqLoraLinear}
    assert registered.to_dict() == config.to_dict()
    assert use_in_peft(registered)._custom_modules == {HQQLinear: PeftHqqLoraLinear}
    with pytest.raises(TypeError, match="peft.LoraConfig, got dict"):
        use_in_peft({"r": 4})
    with pytest.raises(ValueError, match="lora_bias=False"):
        use_in_peft(LoraConfig(lora_bias=True))
    with pytest.raises(ValueError, match="init_lora_weights.*got 'pissa'"):
        use_in_peft(LoraConfig(init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match="aLoRA"):
        alora = LoraConfig(alora_invocation_tokens=[1])
    with pytest.raises(ValueError, match="unsupported variants"):
        use_in_peft(alora)
    other = lora_config(["0"])
    other._register_custom_module({HQQLinear: nn.Linear})
    with pytest.raises(ValueError, match="another custom module"):
        use_in_peft(other)


def test_registering_dispatch_hqq_as_the_custom_module_works_too(tmp_path):
    # The recipe issue 13 found silently broken: 0 trainable parameters, an empty
    # adapter file, add_adapter and disable_adapter raising.
    make, targets, inputs = MODELS["chain"]
    config = lora_config(targets)
    native = get_peft_model(make(), config)
    config = lora_config(targets)
    config._register_custom_module({HQQLinear: hqqlora.dispatch_hqq})
    ours = get_peft_model(make(), config)
    copy_adapters(native, ours)
    assert ours.get_nb_trainable_parameters() == native.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 2 * len(targets)
    ours.add_adapter("b", config)
    with ours.disable_adapter():
        output(ours, inputs())


def test_import_hqqlora_does_not_import_peft():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, hqqlora; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_a_peft_model_with_our_layers_deep_copies_and_pickles(tmp_path):
    _, ours, inputs = both("chain", use_dora=True)
    y = output(ours, inputs)
    assert torch.equal(output(copy.deepcopy(ours), inputs), y)
    torch.save(ours, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(type(m) is PeftHqqLoraLinear for m in lora_layers(loaded).values())
    assert torch.equal(output(loaded, inputs), y)
