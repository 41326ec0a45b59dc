"""HqqLoraLinear / dispatch_hqq: PEFT parity, state dicts both ways, exact unmerge."""

from __future__ import annotations

import pytest
import torch
from helpers import BITS, DTYPES, RTOL, assert_close_rel, dense_reference, make_layer
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.lora.hqq import HqqLoraLinear as PeftHqq

from hqqlora import HqqLoraLinear, base_forward, dequantize, dispatch_hqq

BASE = "__base__"
CASES = [
    (4, torch.float32, True),
    (2, torch.bfloat16, False),
    (8, torch.float16, True),
    (3, torch.float32, False),
    (1, torch.float32, True),
]


def _peft(layer, dora=False, rb=3):
    peft = PeftHqq(
        layer,
        "a",
        config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora),
        r=4,
        lora_alpha=8,
    )
    config_b = LoraConfig(
        r=rb, lora_alpha=6, init_lora_weights=False, use_dora=dora, use_rslora=True
    )
    peft.update_layer("b", rb, lora_alpha=6, config=config_b)
    return peft.eval()


def _ours(layer, dora=False, rb=3):
    ours = HqqLoraLinear(layer, "a", r=4, lora_alpha=8, use_dora=dora, init_lora_weights=False)
    ours.update_layer("b", rb, 6, use_dora=dora, use_rslora=True, init_lora_weights=False)
    return ours.eval()


def _quant_state(layer):
    return (layer.W_q, layer.meta["scale"], layer.meta["zero"], layer.bias)


def _same_tensor_or_none(a, b):
    return (a is None and b is None) or torch.equal(a, b)


# -- state dicts and outputs vs PEFT -------------------------------------------------


@pytest.mark.parametrize(("nbits", "dtype", "bias"), CASES)
@pytest.mark.parametrize("dora", [False, True])
def test_peft_state_dict_loads_into_ours(nbits, dtype, bias, dora):
    peft = _peft(make_layer(nbits=nbits, dtype=dtype, bias=bias), dora)
    ours = _ours(make_layer(nbits=nbits, dtype=dtype, bias=bias, seed=5), dora)
    state = peft.state_dict()
    assert sorted(state) == sorted(ours.state_dict())
    ours.load_state_dict(state)
    assert ours.scaling == peft.scaling and ours.r == peft.r
    x = torch.randn(5, 3, 64).to(dtype)
    with torch.no_grad():
        for active in ("a", "b", ["a", "b"]):
            peft.set_adapter(active)
            ours.set_adapter(active)
            assert ours.active_adapters == peft.active_adapters
            assert_close_rel(ours(x), peft(x), dtype)


@pytest.mark.parametrize(("nbits", "dtype", "bias"), CASES[:3])
@pytest.mark.parametrize("dora", [False, True])
def test_our_state_dict_loads_into_peft(nbits, dtype, bias, dora):
    ours = _ours(make_layer(nbits=nbits, dtype=dtype, bias=bias), dora)
    peft = _peft(make_layer(nbits=nbits, dtype=dtype, bias=bias, seed=5), dora)
    peft.load_state_dict(ours.state_dict())
    x = torch.randn(4, 64).to(dtype)
    with torch.no_grad():
        assert_close_rel(ours(x), peft(x), dtype)
        assert torch.equal(dequantize(peft.base_layer), dequantize(ours.base_layer))


@pytest.mark.parametrize(("nbits", "dtype", "bias"), CASES)
def test_mixed_batch_forward_matches_peft(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = _peft(layer, rb=6)
    ours = _ours(layer, rb=6)
    ours.load_state_dict(peft.state_dict())
    names = ["b", BASE, "a", "b", "a"]
    x = torch.randn(5, 2, 64).to(dtype)
    with torch.no_grad():
        assert_close_rel(
            ours(x, adapter_names=names), peft(x, adapter_names=names), dtype, factor=2
        )
        # a name this layer does not hold acts as "__base__", as in PEFT
        odd = ["zz", "a", "zz", "b", BASE]
        assert_close_rel(ours(x, adapter_names=odd), peft(x, adapter_names=odd), dtype, factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_with_dora_equals_per_row(dtype):
    layer = make_layer(dtype=dtype)
    ours = _ours(layer, dora=True, rb=6)
    ours.update_layer("c", 2, 4, init_lora_weights=False)  # LoRA next to DoRA
    names = ["b", "c", BASE, "a"]
    x = torch.randn(4, 64).to(dtype)
    with torch.no_grad():
        y = ours(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == BASE:
                expected = base_forward(layer, x[i : i + 1])
            else:
                ours.set_adapter(name)
                expected = ours(x[i : i + 1])
            assert_close_rel(y[i : i + 1], expected, dtype, factor=2)


# -- merge / unmerge -----------------------------------------------------------------


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_is_bitwise_exact(nbits, dtype, dora):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=True)
    before = [t.clone() for t in _quant_state(layer)]
    ours = _ours(layer, dora)
    ours.set_adapter(["a", "b"])
    x = torch.randn(4, 64).to(dtype)
    with torch.no_grad():
        y0 = ours(x)
        base0 = base_forward(layer, x)
        ours.merge()
        assert ours.merged and ours.merged_adapters == ["a", "b"]
        assert torch.equal(ours.base_layer.bias, layer.bias)  # the bias survives the merge
        merged_out = ours(x)
        ours.unmerge()
        assert not ours.merged and ours.base_layer is layer
        for t, t0 in zip(_quant_state(ours.base_layer), before, strict=True):
            assert torch.equal(t, t0)
        assert torch.equal(ours(x), y0)
        ours.enable_adapters(False)
        assert torch.equal(ours(x), base0)
    if nbits == 8 and dtype == torch.float32:
        # at 8 bits the merged layer is close to the adapted one
        assert_close_rel(merged_out, y0, torch.bfloat16)


@pytest.mark.parametrize(
    ("nbits", "dtype", "bias"),
    [(4, torch.float32, True), (8, torch.float32, False), (2, torch.float16, True)],
)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_matches_peft(nbits, dtype, bias, dora):
    torch.manual_seed(0)
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = _peft(layer, dora)
    ours = _ours(layer, dora)
    ours.load_state_dict(peft.state_dict())
    peft.merge(adapter_names=["a"])
    ours.merge(adapter_names=["a"])
    W_peft, W_ours = dequantize(peft.base_layer), dequantize(ours.base_layer)
    # identical dense weights requantize to identical codes; allow the odd rounding tie
    step = (W_ours.float().max() - W_ours.float().min()).item() / 2**nbits
    mismatch = (W_peft.float() - W_ours.float()).abs() > 1e-3 * step
    # PEFT rounds a DoRA-merged weight to the compute dtype before quantizing; we do not.
    assert mismatch.float().mean().item() < (0.01 if dtype == torch.float32 else 0.05)
    assert peft.merged_adapters == ours.merged_adapters == ["a"]


def test_sequential_merges_requantize_from_the_kept_original():
    layer = make_layer(nbits=8)
    ours = _ours(layer, dora=True)
    both = _ours(layer, dora=True)
    lora_state = {k: v for k, v in ours.state_dict().items() if not k.startswith("base_layer")}
    both.load_state_dict(lora_state, strict=False)
    ours.merge(adapter_names=["a"])
    ours.merge(adapter_names=["b"])
    both.merge(adapter_names=["a", "b"])
    assert torch.equal(ours.base_layer.W_q, both.base_layer.W_q)
    x = torch.randn(3, 64)
    params = [ours.adapter_params("a"), ours.adapter_params("b")]
    with torch.no_grad():
        assert_close_rel(ours(x), dense_reference(layer, params, x), torch.bfloat16, factor=2)
    ours.unmerge()
    assert ours.base_layer is layer


def test_merge_safe_merge_and_warnings():
    layer = make_layer()
    ours = _ours(layer)
    with torch.no_grad():
        ours.lora_B["a"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ours.merge(safe_merge=True)
    assert not ours.merged and ours.base_layer is layer
    with pytest.warns(UserWarning, match="Already unmerged"):
        ours.unmerge()
    ours.merge(adapter_names=["b"])
    with pytest.warns(UserWarning, match="Already following adapters were merged b"):
        ours.merge(adapter_names=["b"])
    assert ours.merged_adapters == ["b"]


# -- module behaviour ----------------------------------------------------------------


def test_module_interface():
    layer = make_layer()
    ours = HqqLoraLinear(layer, "a", r=4, lora_alpha=8)
    assert repr(ours).startswith("lora.")
    assert (ours.in_features, ours.out_features) == (64, 48)
    assert ours.r == {"a": 4} and ours.lora_alpha == {"a": 8} and ours.scaling == {"a": 2.0}
    assert ours.active_adapter == "a" and ours.active_adapters == ["a"]
    assert not ours.disable_adapters and not ours.merged
    assert ours.resolve_lora_variant(use_dora=True) == "dora"
    assert ours.resolve_lora_variant(use_dora=False) is None
    # default init: zero B, so the output is the base's
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), base_forward(layer, x))
    assert torch.equal(ours.get_delta_weight("a"), torch.zeros(48, 64))
    ours.update_layer("b", 2, 4, use_dora=True)
    assert ours.active_adapters == ["a"]
    assert not ours.lora_A["b"].weight.requires_grad and ours.lora_A["a"].weight.requires_grad
    ours.set_adapter("b")
    assert ours.lora_magnitude_vector["b"].weight.requires_grad
    assert not ours.lora_A["a"].weight.requires_grad
    ours.enable_adapters(False)
    assert ours.disable_adapters and not ours.lora_A["b"].weight.requires_grad
    ours.enable_adapters(True)
    assert ours.lora_A["b"].weight.requires_grad
    assert set(ours.adapter_params("b")) == {"lora_A", "lora_B", "scaling", "magnitude"}
    assert ours.adapter_params("b")["lora_A"] is ours.lora_A["b"].weight


def test_gradients_reach_the_parameters():
    ours = HqqLoraLinear(
        make_layer(), "a", r=4, lora_alpha=8, use_dora=True, init_lora_weights=False
    )
    ours(torch.randn(3, 64)).square().sum().backward()
    for module in (ours.lora_A["a"], ours.lora_B["a"], ours.lora_magnitude_vector["a"]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_dropout_follows_training_mode():
    ours = HqqLoraLinear(
        make_layer(), "a", r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False
    )
    x = torch.randn(8, 64)
    with torch.no_grad():
        y_eval = ours.eval()(x)
        assert torch.equal(y_eval, ours(x))
        torch.manual_seed(0)
        y_train = ours.train()(x)
        assert not torch.allclose(y_train, y_eval)
        torch.manual_seed(0)
        assert torch.equal(ours(x), y_train)
        with pytest.raises(ValueError, match="eval mode"):
            ours(x, adapter_names=["a"] * 8)


def test_dispatch_hqq():
    layer = make_layer()
    shim = dispatch_hqq(layer, "a", r=4, lora_alpha=8)
    assert isinstance(shim, HqqLoraLinear) and shim.base_layer is layer
    again = dispatch_hqq(shim, "b", r=2, lora_alpha=2)
    assert isinstance(again, HqqLoraLinear) and again.base_layer is layer
    from_config = dispatch_hqq(
        layer, "c", config=LoraConfig(r=2, lora_alpha=4, use_dora=True), r=2, lora_alpha=4
    )
    assert from_config.use_dora == {"c": True} and "c" in from_config.lora_magnitude_vector
    assert dispatch_hqq(torch.nn.Linear(4, 4), "a", r=2) is None


def test_errors_change_nothing():
    layer = make_layer()
    with pytest.raises(ValueError, match="lora_bias=False"):
        HqqLoraLinear(layer, "a", r=4, lora_bias=True)
    with pytest.raises(ValueError, match="positive int"):
        HqqLoraLinear(layer, "a", r=0)
    with pytest.raises(TypeError, match="HQQLinear"):
        HqqLoraLinear(torch.nn.Linear(4, 4), "a", r=2)
    ours = _ours(layer)
    state = {k: v.clone() for k, v in ours.state_dict().items() if k.startswith("lora")}
    with pytest.raises(ValueError, match="positive int"):
        ours.update_layer("c", -1, 4)
    with pytest.raises(ValueError, match="lora_bias=False"):
        ours.update_layer("c", 2, 4, lora_bias=True)
    assert list(ours.lora_A) == ["a", "b"]
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"one adapter name per row of x \(3\)"):
        ours(x, adapter_names=["a"])
    with pytest.raises(ValueError, match=r"among \['a', 'b'\], got 'zz'"):
        ours.adapter_params("zz")
    ours.merge()
    with pytest.raises(ValueError, match="merged"):
        ours(x, adapter_names=["a"] * 3)
    for k, v in state.items():
        assert torch.equal(ours.state_dict()[k], v)


@pytest.mark.filterwarnings("ignore:merge kept only")
@given(
    nbits=st.sampled_from([2, 4, 8]),
    dtype=st.sampled_from(DTYPES),
    dora=st.booleans(),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    names=st.lists(st.integers(-1, 2), min_size=1, max_size=5),
)
def test_shim_mixed_batch_and_unmerge_property(nbits, dtype, dora, ranks, names):
    layer = make_layer(32, 16, nbits=nbits, dtype=dtype)
    ours = HqqLoraLinear(
        layer, "n0", r=ranks[0], lora_alpha=4, use_dora=dora, init_lora_weights=False
    )
    for k, r in enumerate(ranks[1:], start=1):
        ours.update_layer(f"n{k}", r, 4, use_dora=dora and k % 2 == 0, init_lora_weights=False)
    row_names = [BASE if k < 0 or k >= len(ranks) else f"n{k}" for k in names]
    x = torch.randn(len(row_names), 32).to(dtype)
    with torch.no_grad():
        y = ours.eval()(x, adapter_names=row_names)
        for i, name in enumerate(row_names):
            ours.set_adapter(name)
            assert_close_rel(y[i : i + 1], ours(x[i : i + 1]), dtype, factor=2)
        ours.set_adapter(list(ours.lora_A))
        y0 = ours(x)
        ours.merge()
        ours.unmerge()
        assert torch.equal(ours(x), y0) and ours.base_layer is layer


# -- several active adapters with DoRA follow PEFT's forward (issue 10, item 4) ---------


def _perturb_magnitudes(module, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.lora_magnitude_vector.values():
            m.weight.mul_(1 + 0.3 * (torch.rand(m.weight.shape, generator=gen) - 0.5))


@pytest.mark.parametrize(("nbits", "dtype", "bias"), CASES[:3])
def test_lora_then_dora_active_matches_peft_and_reference(nbits, dtype, bias):
    layer = make_layer(nbits=nbits, dtype=dtype, bias=bias)
    peft = PeftHqq(
        layer, "a", config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), r=4, lora_alpha=8
    )
    peft.update_layer(
        "b",
        3,
        lora_alpha=6,
        config=LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, use_dora=True),
    )
    _perturb_magnitudes(peft)  # c ≠ 1, so every (c - 1) term counts
    peft.eval()
    ours = HqqLoraLinear(layer, "a", r=4, lora_alpha=8)
    ours.update_layer("b", 3, 6, use_dora=True)
    ours.load_state_dict(peft.state_dict())
    ours.eval()
    x = torch.randn(6, 64).to(dtype)
    with torch.no_grad():
        for active in (["a", "b"], ["b", "a"]):
            peft.set_adapter(active)
            ours.set_adapter(active)
            y_peft, y_ours = peft(x), ours(x)
            params = [ours.adapter_params(n) for n in active]
            ref = dense_reference(layer, params, x)
            # compare the adapters' contribution, not the whole output
            term = ref - dense_reference(layer, [], x)
            tol = 20 * RTOL[dtype] * term.abs().max().item()
            assert (y_ours.double() - ref).abs().max().item() <= tol
            assert (y_peft.double() - ref).abs().max().item() <= tol


def test_several_dora_adapters_forward_agrees_with_merge():
    layer = make_layer(nbits=8, bias=True)
    ours = HqqLoraLinear(layer, "a", r=4, lora_alpha=8, init_lora_weights=False)
    ours.update_layer("b", 3, 6, use_dora=True, init_lora_weights=False)
    _perturb_magnitudes(ours)
    ours.set_adapter(["a", "b"])
    x = torch.randn(16, 64)
    with torch.no_grad():
        y = ours(x).double()
        base = base_forward(layer, x).double()
        ours.merge()
        y_merged = ours(x).double()
    # forward ≈ merge (up to ΔW_a's share of b's norm and 8-bit rounding), as PEFT's;
    # "each c from the base" is 18% apart on such a layer.
    assert (y - y_merged).norm() <= 0.05 * (y - base).norm()


# -- config= is honoured as PEFT does (issue 10, item 8) -------------------------------


@pytest.mark.filterwarnings("ignore:aLoRA is currently only supported")
def test_config_options_are_honoured():
    layer = make_layer()
    config = LoraConfig(use_dora=True, use_rslora=True, lora_dropout=0.1)
    ours = HqqLoraLinear(layer, "default", config=config, r=8, lora_alpha=16)
    peft = PeftHqq(layer, "default", config=config, r=8, lora_alpha=16)
    assert ours.use_dora == {"default": True} and "default" in ours.lora_magnitude_vector
    assert ours.scaling == peft.scaling == {"default": 16 / 8**0.5}
    assert ours.lora_dropout == {"default": 0.1} == {"default": peft.lora_dropout["default"].p}
    ours.update_layer("b", 4, 8, config=LoraConfig(lora_dropout=0.2, inference_mode=True))
    assert ours.use_dora["b"] is False and ours.scaling["b"] == 2.0
    assert ours.lora_dropout["b"] == 0.2
    ours.set_adapter("b")
    ours.update_layer("c", 2, 4, config=LoraConfig(inference_mode=True))
    assert not ours.lora_A["b"].weight.requires_grad  # inference_mode freezes, as PEFT
    shim = dispatch_hqq(layer, "d", config=LoraConfig(r=2, lora_alpha=4, use_rslora=True))
    assert shim.scaling == {"d": 4 / 2**0.5}
    with pytest.raises(ValueError, match=r"`use_dora` to agree with `config.use_dora` \(True\)"):
        HqqLoraLinear(layer, "x", config=config, use_dora=False, r=2)
    with pytest.raises(ValueError, match="lora_bias=False"):
        HqqLoraLinear(layer, "x", config=LoraConfig(lora_bias=True), r=2)
    with pytest.raises(ValueError, match="unsupported variants"):
        HqqLoraLinear(layer, "x", config=LoraConfig(alora_invocation_tokens=[1, 2]), r=2)
