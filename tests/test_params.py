import math

import pytest
import torch
from helpers import assert_close_rel, dense_reference, make_layer, random_adapter

import hqqlora


@pytest.fixture(scope="module")
def layer():
    return make_layer(in_features=128, out_features=64)


def test_default_init_is_kaiming_uniform_A_and_zero_B(layer):
    p = hqqlora.init_lora(layer, 8, 16, generator=torch.Generator().manual_seed(0))
    assert p["lora_A"].shape == (8, 128) and p["lora_B"].shape == (64, 8)
    assert p["lora_A"].dtype == p["lora_B"].dtype == torch.float32
    bound = 1 / math.sqrt(128)
    assert p["lora_A"].abs().max() <= bound and p["lora_A"].abs().max() > 0.9 * bound
    assert torch.count_nonzero(p["lora_B"]) == 0
    assert p["scaling"].ndim == 0 and p["scaling"].item() == 2.0
    assert "magnitude" not in p


def test_gaussian_init_std_is_one_over_r(layer):
    p = hqqlora.init_lora(
        layer, 4, init_lora_weights="gaussian", generator=torch.Generator().manual_seed(0)
    )
    assert abs(p["lora_A"].std().item() - 0.25) < 0.02
    assert torch.count_nonzero(p["lora_B"]) == 0


def test_false_init_makes_both_random(layer):
    p = hqqlora.init_lora(layer, 4, init_lora_weights=False)
    assert torch.count_nonzero(p["lora_B"]) == p["lora_B"].numel()


def test_rslora_scaling(layer):
    p = hqqlora.init_lora(layer, 16, 8, use_rslora=True)
    assert p["scaling"].item() == pytest.approx(8 / 4)


def test_generator_makes_init_reproducible(layer):
    p1 = hqqlora.init_lora(
        layer, 4, init_lora_weights=False, generator=torch.Generator().manual_seed(3)
    )
    p2 = hqqlora.init_lora(
        layer, 4, init_lora_weights=False, generator=torch.Generator().manual_seed(3)
    )
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_option(layer, dtype):
    p = hqqlora.init_lora(layer, 4, dtype=dtype)
    assert p["lora_A"].dtype == p["lora_B"].dtype == dtype


def test_dora_magnitude_is_row_norm_of_merged_weight(layer):
    p = hqqlora.init_lora(layer, 4, 8, use_dora=True, init_lora_weights=False)
    W = hqqlora.dequantize(layer).double()
    expected = torch.linalg.norm(W + 2.0 * p["lora_B"].double() @ p["lora_A"].double(), dim=1)
    torch.testing.assert_close(p["magnitude"].double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_bad_rank(layer, r):
    with pytest.raises(ValueError, match="Expected `r` to be a positive int"):
        hqqlora.init_lora(layer, r)


def test_bad_init_option(layer):
    with pytest.raises(ValueError, match="Expected `init_lora_weights`"):
        hqqlora.init_lora(layer, 4, init_lora_weights="pissa")


def test_delta_weight_formula(layer):
    p = random_adapter(layer, scaling=0.75)
    expected = (p["lora_B"].double() @ p["lora_A"].double()) * 0.75
    torch.testing.assert_close(hqqlora.delta_weight(p).double(), expected, rtol=1e-6, atol=1e-9)


def test_trainable_params_drops_scaling(layer):
    p = random_adapter(layer, dora=True)
    assert set(hqqlora.trainable_params(p)) == {"lora_A", "lora_B", "magnitude"}
    nested = hqqlora.trainable_params({"a": p, "b": p})
    assert set(nested) == {"a", "b"} and "scaling" not in nested["a"]


def _broken(p, **changes):
    q = dict(p)
    for k, v in changes.items():
        if v is None:
            del q[k]
        else:
            q[k] = v
    return q


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"lora_A": None}, ValueError, "missing \\['lora_A'\\]"),
        ({"extra": torch.zeros(1)}, ValueError, "unknown \\['extra'\\]"),
        (
            {"scaling": 2.0},
            TypeError,
            "Expected `params\\['scaling'\\]` to be a torch.Tensor, got float",
        ),
        ({"lora_A": torch.zeros(4, 64, dtype=torch.int64)}, TypeError, "floating point"),
        ({"lora_A": torch.zeros(3, 128)}, ValueError, "share r"),
        ({"lora_A": torch.zeros(4, 100)}, ValueError, "lora_A'\\]` of shape \\(r, 128\\)"),
        ({"lora_B": torch.zeros(60, 4)}, ValueError, "lora_B'\\]` of shape \\(64, r\\)"),
        ({"lora_B": torch.zeros(64, 4, dtype=torch.float16)}, TypeError, "one dtype"),
        ({"scaling": torch.ones(1)}, ValueError, "0-d"),
        ({"magnitude": torch.ones(63)}, ValueError, "magnitude'\\]` of shape \\(64,\\)"),
    ],
)
def test_bad_params_are_rejected_and_nothing_changes(layer, change, error, match):
    p = _broken(random_adapter(layer), **change)
    snapshot = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    x = torch.randn(2, 128)
    for call in (
        lambda: hqqlora.apply_lora(layer, p, x),
        lambda: hqqlora.merge(layer, p),
    ):
        with pytest.raises(error, match=match):
            call()
    assert set(p) == set(snapshot)
    for k, v in p.items():
        assert torch.equal(v, snapshot[k]) if isinstance(v, torch.Tensor) else v == snapshot[k]


def test_params_must_be_a_dict(layer):
    with pytest.raises(TypeError, match="Expected `params` to be an adapter dict or a sequence"):
        hqqlora.apply_lora(layer, 3, torch.randn(1, 128))
    with pytest.raises(ValueError, match="at least one adapter"):
        hqqlora.apply_lora(layer, [], torch.randn(1, 128))


FLOAT8 = [
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
]


@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("key", ["lora_A", "magnitude", "scaling"])
def test_float8_leaves_are_refused_before_the_forward(layer, dtype, key):
    # float8 is floating point, but the forward cannot compute in it.
    p = random_adapter(layer, dora=True)
    p = {**p, key: p[key].to(dtype)}
    if key == "lora_A":
        p["lora_B"] = p["lora_B"].to(dtype)
    match = rf"Expected `params\['{key}'\]` in a dtype the forward computes in .* got {dtype}"
    with pytest.raises(TypeError, match=match):
        hqqlora.check_params(p)
    with pytest.raises(TypeError, match=match):
        hqqlora.apply_lora(layer, p, torch.randn(2, 128))


def test_float64_adapters_compute_in_float64(layer):
    p = {k: v.double() for k, v in random_adapter(layer, dora=True).items()}
    x = torch.randn(3, 128)
    y = hqqlora.apply_lora(layer, p, x)
    assert y.dtype == torch.float32  # the base output's dtype
    assert_close_rel(y, dense_reference(layer, p, x), torch.float32)


@pytest.mark.parametrize("key", ["lora_A", "lora_B", "scaling", "magnitude"])
def test_meta_tensors_are_refused(layer, key):
    p = random_adapter(layer, dora=True)
    p[key] = p[key].to("meta")
    with pytest.raises(
        ValueError, match=rf"`params\['{key}'\]` to hold data, got a tensor on the meta"
    ):
        hqqlora.check_params(p)
    with pytest.raises(ValueError, match="meta device"):
        hqqlora.apply_lora(layer, p, torch.randn(2, 128))
    with pytest.raises(ValueError, match="`x` to hold data, got a tensor on the meta device"):
        hqqlora.apply_lora(layer, random_adapter(layer), torch.randn(2, 128, device="meta"))


def test_rank_zero_is_refused(layer):
    p = {"lora_A": torch.zeros(0, 128), "lora_B": torch.zeros(64, 0), "scaling": torch.tensor(1.0)}
    match = r"Expected `params` of rank r >= 1, got lora_A of shape \(0, 128\)"
    for call in (
        lambda: hqqlora.check_params(p),
        lambda: hqqlora.apply_lora(layer, p, torch.randn(2, 128)),
        lambda: hqqlora.merge(layer, p),
    ):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_that_do_not_fit_are_refused(layer):
    # `layer` is on the CPU.
    p = random_adapter(layer, dora=True)
    on_cuda = {k: v.cuda() for k, v in p.items()}
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match=r"Expected `params` on the base layer's device cpu"):
        hqqlora.apply_lora(layer, on_cuda, x)
    with pytest.raises(ValueError, match=r"Expected the tensors of `params` on one device"):
        hqqlora.check_params({**p, "lora_B": p["lora_B"].cuda()})
    with pytest.raises(ValueError, match=r"Expected `x` on the base layer's device cpu"):
        hqqlora.apply_lora(layer, p, x.cuda())
    with pytest.raises(ValueError, match=r"`weight_norm\[0\]` on the base layer's device cpu"):
        hqqlora.apply_lora(layer, p, x, weight_norm=hqqlora.dora_weight_norm(layer, p).cuda())
    # A 0-d CPU scaling works with adapters on any device, as in torch.
    hqqlora.check_params({**on_cuda, "scaling": p["scaling"]})
