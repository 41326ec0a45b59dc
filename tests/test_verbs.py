"""Model-level verbs (set_adapter, disable_adapter, delete_adapter, merge_and_unload).

Oracles: PEFT's PeftModel on the same quantized model with the same adapter weights,
and float64 dense references (DESIGN's forward and merge formulas).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn

import hqqlora
from hqqlora import (
    HqqLoraLinear,
    delete_adapter,
    dequantize,
    disable_adapter,
    inject_adapter,
    merge_and_unload,
    quantize_model,
    set_adapter,
)
from tests.helpers import assert_close_rel, dense_reference, random_adapter

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

PATHS = ("0", "2", "4")  # the Linear layers of the chain
WIDTHS = (64, 48, 32, 16)
PEFT_PREFIX = "base_model.model."


def quantized_chain(nbits=4, seed=0):
    """64 → 48 → 32 → 16 with ReLUs between, every Linear an HQQLinear with a bias."""
    torch.manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(d_in, d_out))
        if i < 2:
            layers.append(nn.ReLU())
    config = BaseQuantizeConfig(nbits=nbits, group_size=16)
    return quantize_model(
        nn.Sequential(*layers), config, compute_dtype=torch.float32, device="cpu", progress=False
    )


def pair(dora=False, nbits=4):
    """(PEFT's model, ours) on the same quantized chain with the same adapter weights.

    Adapter "default" (r=4) on layers 0 and 2, "b" (r=3, rslora, DoRA if `dora`) on
    layers 2 and 4, magnitudes away from their init (c ≠ 1).
    """
    base = quantized_chain(nbits)
    config_a = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    config_b = LoraConfig(
        r=3,
        lora_alpha=6,
        use_rslora=True,
        use_dora=dora,
        target_modules=["2", "4"],
        init_lora_weights=False,
    )
    native = get_peft_model(copy.deepcopy(base), config_a)
    native.add_adapter("b", config_b)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    ours = copy.deepcopy(base)
    inject_adapter(ours, "default", target_modules=["0", "2"], r=4, lora_alpha=8)
    inject_adapter(
        ours, "b", target_modules=["2", "4"], r=3, lora_alpha=6, use_rslora=True, use_dora=dora
    )
    state = {
        k.removeprefix(PEFT_PREFIX): v for k, v in native.state_dict().items() if ".lora_" in k
    }
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lora_" in k]
    return native.eval(), ours.eval()


def native_layer(native, path):
    return native.base_model.model.get_submodule(path)


def chain_reference(model, x, active):
    """The chain's output in float64 (helpers.dense_reference per layer, ReLU between)."""
    h = x.double()
    for i, path in enumerate(PATHS):
        shim = model.get_submodule(path)
        params = [shim.adapter_params(n) for n in active if n in shim.lora_A]
        h = dense_reference(shim._unmerged_base(), params, h)
        if i < len(PATHS) - 1:
            h = torch.relu(h)
    return h


def grad_flags(model, prefix=""):
    return {
        k.removeprefix(prefix): p.requires_grad
        for k, p in model.named_parameters()
        if ".lora_" in k
    }


def quant_state(layer):
    return [layer.W_q, layer.meta["scale"], layer.meta["zero"], layer.bias]


def snapshot(model):
    """Every tensor the model holds (HQQ layers' codes, scales, zeros, biases, the
    layers kept by merged shims) and its structure, for bitwise comparison."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {}
    for path, m in model.named_modules():
        if isinstance(m, HqqLoraLinear):
            layers[path + "<kept>"] = m._unmerged_base()
        if isinstance(m, HQQLinear):
            layers[path] = m
    for path, layer in layers.items():
        for i, t in enumerate(quant_state(layer)):
            tensors[f"{path}.{i}"] = None if t is None else t.clone()
    structure = [
        (
            path,
            type(m),
            getattr(m, "active_adapters", None),
            list(getattr(m, "merged_adapters", [])),
            getattr(m, "disable_adapters", None),
            m.training,
        )
        for path, m in model.named_modules()
    ]
    return tensors, structure


def assert_same_snapshot(a, b):
    tensors_a, structure_a = a
    tensors_b, structure_b = b
    assert structure_a == structure_b
    assert tensors_a.keys() == tensors_b.keys()
    for k, t in tensors_a.items():
        u = tensors_b[k]
        if t is None or u is None:
            assert t is None and u is None, k
        else:
            torch.testing.assert_close(u, t, rtol=0, atol=0, equal_nan=True, msg=k)


def storages(model):
    """data_ptrs of every tensor reachable from the model's modules."""
    ptrs = set()
    for m in model.modules():
        for value in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            ptrs.add(value.untyped_storage().data_ptr())
        if isinstance(m, HQQLinear):
            for t in quant_state(m):
                if t is not None:
                    ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def codes_agree(W, V, nbits):
    """Identical dense weights requantize to identical codes; allow the odd rounding tie."""
    step = (W.float().max() - W.float().min()).item() / 2**nbits
    mismatch = (W.float() - V.float()).abs() > 1e-3 * step
    return mismatch.float().mean().item() < 0.01


def merged_dense(base, adapters):
    """DESIGN's merge in float64: W ← W + ΔW (LoRA), W ← c ⊙ (W + ΔW) (DoRA, c from the base)."""
    W0 = dequantize(base).double()
    W = W0.clone()
    for p in adapters:
        delta = p["scaling"].double() * p["lora_B"].double() @ p["lora_A"].double()
        if "magnitude" in p:
            c = p["magnitude"].double() / torch.linalg.norm(W0 + delta, dim=1)
            W = c[:, None] * (W + delta)
        else:
            W = W + delta
    return W


def hqq_requantized(base, weight):
    """HQQ's own quantizer on `weight` with `base`'s settings (independent of hqqlora)."""
    config = {**copy.deepcopy(base.quant_config), "offload_meta": base.offload_meta}
    layer = HQQLinear(None, config, compute_dtype=base.compute_dtype, device=base.device)
    config.pop("offload_meta")
    layer.quantize(weight.to(base.compute_dtype), **config)
    return layer


X = torch.randn(5, 64, generator=torch.Generator().manual_seed(11))


# -- set_adapter ----------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_set_adapter_matches_peft_and_the_dense_reference(dora):
    native, ours = pair(dora)
    for names in ("default", "b", ["default", "b"], ["b", "default"]):
        native.base_model.set_adapter(names)
        assert set_adapter(ours, names) is None
        for path in PATHS:
            assert ours.get_submodule(path).active_adapters == (
                native_layer(native, path).active_adapters
            )
        assert grad_flags(ours) == grad_flags(native, PEFT_PREFIX)
        with torch.no_grad():
            y = ours(X)
            assert_close_rel(y, native(X), torch.float32, factor=4)
            active = [names] if isinstance(names, str) else names
            assert_close_rel(y, chain_reference(ours, X, active), torch.float32, factor=10)


def test_set_adapter_unmerges_refuses_unknown_names_and_freezes_in_inference_mode():
    _, ours = pair()
    shim = ours.get_submodule("2")
    original = shim.base_layer
    shim.merge()
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        set_adapter(ours, ["b"])
    assert not shim.merged and shim.base_layer is original  # the exact original back
    assert shim.active_adapters == ["b"]
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"among \['b', 'default'\], got unknown \['zz'\]"):
        set_adapter(ours, ["default", "zz"])
    with pytest.raises(TypeError, match="str or a list of str"):
        set_adapter(ours, [1])
    with pytest.raises(ValueError, match="HqqLoraLinear layers"):
        set_adapter(quantized_chain(), "default")
    assert_same_snapshot(before, snapshot(ours))
    set_adapter(ours, "default", inference_mode=True)
    assert not any(grad_flags(ours).values())


# -- disable_adapter ------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_disable_adapter_matches_peft_and_restores_on_exit(dora):
    native, ours = pair(dora)
    native.base_model.set_adapter(["default", "b"])
    set_adapter(ours, ["default", "b"])
    ours.get_submodule("4").enable_adapters(False)  # disabled before: stays disabled
    ours.get_submodule("0").lora_A["default"].weight.requires_grad_(False)  # a custom flag
    flags = grad_flags(ours)
    with torch.no_grad():
        y_before = ours(X)
        with native.disable_adapter():
            y_native = native(X)
        with disable_adapter(ours) as inside:
            assert inside is ours
            y_off = ours(X)
        assert_close_rel(y_off, y_native, torch.float32)
        assert_close_rel(y_off, chain_reference(ours, X, []), torch.float32, factor=10)
        assert torch.equal(ours(X), y_before)
    assert grad_flags(ours) == flags
    assert ours.get_submodule("4").disable_adapters
    assert not ours.get_submodule("2").disable_adapters
    with pytest.raises(RuntimeError, match="inside"), disable_adapter(ours):
        raise RuntimeError("inside")
    with torch.no_grad():
        assert torch.equal(ours(X), y_before)
    assert grad_flags(ours) == flags


def test_disable_adapter_keeps_a_merged_model_merged():
    native, ours = pair(nbits=8)
    native.base_model.set_adapter(["default", "b"])
    set_adapter(ours, ["default", "b"])
    with torch.no_grad():
        with disable_adapter(ours):
            y_base = ours(X)
        for path in PATHS:
            ours.get_submodule(path).merge()
        y_merged = ours(X)
        with disable_adapter(ours):
            y_off = ours(X)
        assert torch.equal(y_off, y_base)  # exact: the kept pre-merge layers
        assert all(ours.get_submodule(p).merged for p in PATHS)  # still merged ...
        assert torch.equal(ours(X), y_merged)  # ... so the block changed nothing
        # PEFT's layers unmerge (requantizing) inside the block and stay unmerged.
        native.merge_adapter()
        with native.disable_adapter():
            native(X)
        assert not native_layer(native, "2").merged


# -- delete_adapter -------------------------------------------------------------------


def lora_keys(model, prefix=""):
    return sorted(k.removeprefix(prefix) for k in model.state_dict() if ".lora_" in k)


@pytest.mark.parametrize("dora", [False, True])
def test_delete_adapter_matches_peft(dora):
    native, ours = pair(dora)
    native.base_model.set_adapter(["default", "b"])
    set_adapter(ours, ["default", "b"])
    native.delete_adapter("b")
    delete_adapter(ours, "b")
    assert lora_keys(ours) == lora_keys(native, PEFT_PREFIX)
    for path in PATHS:
        shim, ref = ours.get_submodule(path), native_layer(native, path)
        assert shim.active_adapters == ref.active_adapters
        assert shim.r == ref.r and shim.scaling == ref.scaling and shim.use_dora == ref.use_dora
    with torch.no_grad():
        assert_close_rel(ours(X), native(X), torch.float32, factor=4)


def test_deleting_the_only_active_adapter_picks_the_next_as_peft_does():
    native, ours = pair()
    config_c = LoraConfig(r=2, lora_alpha=4, target_modules=["2"], init_lora_weights=False)
    native.add_adapter("c", config_c)
    inject_adapter(ours, "c", target_modules=["2"], r=2, lora_alpha=4)
    native.base_model.set_adapter("b")
    set_adapter(ours, "b")
    for delete in (native.delete_adapter, lambda name: delete_adapter(ours, name)):
        with pytest.warns(UserWarning) as record:
            delete("b")
        # layer 2 keeps "c" and "default": the first by name; layer 0 only "default"
        assert {str(w.message) for w in record} == {
            "Adapter b was active which is now deleted. Setting active adapter to c.",
            "Adapter b was active which is now deleted. Setting active adapter to default.",
        }
    for path in PATHS:
        assert ours.get_submodule(path).active_adapters == (
            native_layer(native, path).active_adapters
        )
    assert ours.get_submodule("2").active_adapters == ["c"]
    assert grad_flags(ours) == grad_flags(native, PEFT_PREFIX)


def test_delete_adapter_errors_change_nothing():
    _, ours = pair()
    ours.get_submodule("2").merge(adapter_names=["b"])
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"unmerged to delete it, got it merged in \['2'\]"):
        delete_adapter(ours, "b")
    with pytest.raises(ValueError, match=r"got unknown \['zz'\]"):
        delete_adapter(ours, "zz")
    with pytest.raises(TypeError, match="adapter_name"):
        delete_adapter(ours, ["b"])
    with pytest.raises(ValueError, match="merged"):
        ours.get_submodule("2").delete_adapter("b")  # the layer refuses too
    assert_same_snapshot(before, snapshot(ours))


# -- merge_and_unload -----------------------------------------------------------------


@pytest.mark.parametrize("nbits", [4, 8])
@pytest.mark.parametrize("names", [None, ["b"]])
def test_merge_and_unload_matches_peft_and_keeps_the_bias(nbits, names):
    native, ours = pair(nbits=nbits)
    native.base_model.set_adapter("default")
    set_adapter(ours, "default")
    originals = {p: ours.get_submodule(p).base_layer for p in PATHS}
    before = snapshot(ours)
    merged = merge_and_unload(ours, adapter_names=names)
    reference = native.merge_and_unload(adapter_names=names)
    assert_same_snapshot(before, snapshot(ours))  # pure: the input is as it was
    for path in PATHS:
        layer, ref = merged.get_submodule(path), reference.get_submodule(path)
        assert type(layer) is type(originals[path]) and isinstance(layer, HQQLinear)
        assert not layer.training  # as the shim it replaces (eval)
        assert codes_agree(dequantize(layer), dequantize(ref), nbits)
        assert torch.equal(layer.bias, originals[path].bias)  # kept
    # PEFT drops the bias of every layer it merged ("default" on 0 and 2; "b" on 2 and 4).
    merged_by_peft = ("0", "2") if names is None else ("2", "4")
    assert all(reference.get_submodule(p).bias is None for p in merged_by_peft)
    untouched = "4" if names is None else "0"  # no adapter to merge: unloaded as it was
    for t, t0 in zip(
        quant_state(merged.get_submodule(untouched)), quant_state(originals[untouched]), strict=True
    ):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("names", [None, ["b"]])
def test_merge_and_unload_requantizes_each_layer_once(monkeypatch, dora, names):
    _, ours = pair(dora, nbits=4)
    set_adapter(ours, ["default", "b"])
    ours.get_submodule("2").merge(adapter_names=["default"])  # an earlier merge is redone
    calls = []
    quantize_like = hqqlora._merge.quantize_like
    monkeypatch.setattr(
        hqqlora._merge, "quantize_like", lambda *a, **k: calls.append(1) or quantize_like(*a, **k)
    )
    merged = merge_and_unload(ours, adapter_names=names)
    # layer 2 holds "default" (merged) and "b": one requantization; with names=["b"],
    # layer 0 ("default" only, unmerged) is unloaded without any
    expected_names = {
        "0": ["default"] if names is None else [],
        "2": ["default", "b"],
        "4": ["b"],
    }
    assert len(calls) == sum(bool(n) for n in expected_names.values())
    for path, adapter_names in expected_names.items():
        shim = ours.get_submodule(path)
        params = [shim.adapter_params(n) for n in adapter_names]
        weight = merged_dense(shim._unmerged_base(), params)
        expected = hqq_requantized(shim._unmerged_base(), weight) if params else shim.base_layer
        assert codes_agree(dequantize(merged.get_submodule(path)), dequantize(expected), 4)


def group_constant_adapter(layer, r, *, dora=False, seed=0):
    """A full-shape adapter whose ΔW is constant within each quantization group."""
    p = random_adapter(layer, r, dora=dora, seed=seed, scaling=0.5)
    group = hqqlora.quant_layout(layer).group_size
    p["lora_A"] = p["lora_A"][:, ::group].repeat_interleave(group, dim=1)
    return p


def chain_merged_reference(model, adapters, x):
    h = x.double()
    for i, path in enumerate(PATHS):
        layer = model.get_submodule(path)
        W = merged_dense(layer, [a[path] for a in adapters if path in a])
        h = h @ W.T + layer.bias.double()
        if i < len(PATHS) - 1:
            h = torch.relu(h)
    return h


def test_merge_and_unload_of_adapter_dicts_is_lossless_with_zero_point():
    model = quantized_chain(nbits=2)
    layers = {p: model.get_submodule(p) for p in PATHS}
    first = {
        p: group_constant_adapter(layer, 4, seed=i) for i, (p, layer) in enumerate(layers.items())
    }
    second = {"2": group_constant_adapter(layers["2"], 2, dora=True, seed=9)}
    adapters = [first, second]  # layer 2: LoRA then DoRA, one requantization
    before = snapshot(model)
    merged, reports = merge_and_unload(model, adapters, method="zero_point", return_reports=True)
    assert_same_snapshot(before, snapshot(model))
    assert sorted(reports) == sorted(PATHS)
    with torch.no_grad():
        y = merged(X)
    # zero_point is exact up to the float32 scales and zeros (the adapters are 70% of y)
    assert_close_rel(y, chain_merged_reference(model, adapters, X), torch.float32, factor=2)
    for path, report in reports.items():  # merge_report's definitions, in float64
        W = dequantize(layers[path]).double()
        delta = merged_dense(layers[path], [a[path] for a in adapters if path in a]) - W
        arrived = dequantize(merged.get_submodule(path)).double() - W
        captured = float((arrived * delta).sum() / (delta * delta).sum())
        assert report["captured"] == pytest.approx(captured, rel=1e-9)
        assert report["captured"] == pytest.approx(1.0, abs=1e-5)
        assert report["rel_error"] < 1e-5
    in_place = merge_and_unload(model, adapters, method="zero_point", inplace=True)
    assert in_place is model and isinstance(model[2], HQQLinear)
    with torch.no_grad():
        assert torch.equal(model(X), y)


def test_a_named_shim_merges_the_given_adapter_and_ignores_its_own():
    _, ours = pair()
    shim = ours.get_submodule("2")
    shim.merge()  # its own adapter is inside shim.base_layer
    given = {"2": group_constant_adapter(shim.base_layer, 4, seed=5)}
    merged = merge_and_unload(ours, given, method="zero_point", adapter_names=[])
    W = merged_dense(shim._unmerged_base(), [given["2"]])
    torch.testing.assert_close(dequantize(merged[2]).double(), W, rtol=0, atol=1e-5)
    for i in (0, 4):  # adapter_names=[]: the other shims are unloaded as they were
        unloaded, original = quant_state(merged[i]), quant_state(ours[i].base_layer)
        for t, t0 in zip(unloaded, original, strict=True):
            assert torch.equal(t, t0)


def test_merge_and_unload_returns_a_model_sharing_nothing_and_copies_only_what_stays():
    _, ours = pair()
    ours.append(nn.ReLU())
    # A plain HQQ layer nothing targets, built by HQQ itself: its bias is a non-leaf
    # clone that requires grad, which deepcopy refuses.
    config = BaseQuantizeConfig(nbits=4, group_size=16)
    extra = HQQLinear(nn.Linear(16, 16), config, compute_dtype=torch.float32, device="cpu")
    assert not extra.bias.is_leaf
    ours.append(extra)
    set_adapter(ours, "default")
    ours[2].merge()
    ours[4].enable_adapters(False)
    replaced = [ours[0].base_layer, ours[2]._unmerged_base(), ours[2].base_layer]

    def refuse(memo):
        raise AssertionError("a layer that the merge replaces was deep-copied")

    for layer in replaced:
        layer.__deepcopy__ = refuse
    try:
        before = snapshot(ours)
        merged = merge_and_unload(ours)
        assert_same_snapshot(before, snapshot(ours))
    finally:
        for layer in replaced:
            del layer.__deepcopy__
    assert not storages(merged) & storages(ours)
    assert isinstance(merged[6], HQQLinear) and merged[6] is not ours[6]
    with torch.no_grad():
        y = ours(X)
        merged[6].W_q.zero_()  # an in-place change on the new model ...
        merged[4].W_q.zero_()  # (layer 4 had no active adapter: unloaded, a copy)
        assert torch.equal(ours(X), y)  # ... leaves the input alone
    assert ours[6].W_q.any() and ours[4].base_layer.W_q.any()


def test_merge_and_unload_errors_change_nothing():
    native, ours = pair()
    with torch.no_grad():
        ours[4].lora_B["b"].weight[0, 0] = float("nan")
    set_adapter(ours, ["default", "b"])
    before = snapshot(ours)
    with pytest.raises(ValueError, match="finite"):
        merge_and_unload(ours, inplace=True, safe_merge=True)
    with pytest.raises(ValueError, match="method"):
        merge_and_unload(ours, method="exact")
    with pytest.raises(ValueError, match=r"got unknown \['zz'\]"):
        merge_and_unload(ours, adapter_names=["zz"])
    with pytest.raises(ValueError, match="unknown paths"):
        merge_and_unload(ours, {"9": random_adapter(ours[0].base_layer)})
    with pytest.raises(TypeError, match="list of such dicts"):
        merge_and_unload(ours, "default")
    with pytest.raises(TypeError, match="inplace"):
        merge_and_unload(ours, inplace="yes")
    assert_same_snapshot(before, snapshot(ours))
    with pytest.raises(ValueError, match="got neither"):
        merge_and_unload(quantized_chain())
    with pytest.raises(ValueError, match="peft_config"):
        merge_and_unload(native)
    for verb in (set_adapter, delete_adapter):
        with pytest.raises(ValueError, match="peft_config"):
            verb(native, "default")
    with pytest.raises(ValueError, match="peft_config"), disable_adapter(native):
        pass
    from peft.tuners.lora.hqq import HqqLoraLinear as PeftHqq

    foreign = quantized_chain()
    foreign[0] = PeftHqq(foreign[0], "x", config=LoraConfig(r=2, lora_alpha=4), r=2)
    with pytest.raises(ValueError, match=r"another library's shims at \['0'\]"):
        merge_and_unload(foreign, {"2": random_adapter(foreign[2])})


def test_a_layer_under_two_paths_is_replaced_under_both():
    layer = quantized_chain()[0]
    shim = HqqLoraLinear(layer, "a", r=4, lora_alpha=8, init_lora_weights=False)
    model = nn.Module()
    model.first, model.second = shim, shim
    for inplace in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 4-bit merge keeps little of the update
            merged = merge_and_unload(model, inplace=inplace)
        assert isinstance(merged.first, HQQLinear) and merged.first is merged.second
    assert merged is model
    plain = nn.Module()  # a plain layer under two paths, named under both: merged once
    plain.first = plain.second = layer
    p = random_adapter(layer, 4)
    merged = merge_and_unload(plain, {"first": p, "second": p})
    expected = hqq_requantized(layer, merged_dense(layer, [p]))
    assert merged.first is merged.second
    assert codes_agree(dequantize(merged.first), dequantize(expected), 4)


def test_merge_and_unload_of_a_shim_itself():
    layer = quantized_chain()[0]
    shim = HqqLoraLinear(layer, "a", r=4, lora_alpha=8, init_lora_weights=False)
    p = shim.adapter_params("a")
    expected = merged_dense(layer, [p])
    for inplace in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 4-bit merge keeps little of the update
            merged = merge_and_unload(shim, inplace=inplace)
        assert isinstance(merged, HQQLinear) and torch.equal(merged.bias, layer.bias)
        assert codes_agree(dequantize(merged), dequantize(hqq_requantized(layer, expected)), 4)
    assert shim.base_layer is layer and not shim.merged  # the shim itself is left alone
