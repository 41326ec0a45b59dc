"""Every adapter config field is checked, on load and on save, with a ValueError naming it.

No PEFT needed: configs and tensors are written by hand, expected scalings computed by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from hqqlora import load_adapter, save_adapter

# What PEFT 0.21's save_pretrained writes for LoraConfig(r=4, lora_alpha=8, target_modules=[...]).
PEFT_CONFIG = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": {"base_model_class": "Tiny", "parent_library": "tests.test_model"},
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 4,
    "rank_pattern": {},
    "revision": None,
    "target_modules": ["fc3", "fc2", "fc1"],
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}


def lora(r, in_features=32, out_features=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "lora_A": torch.randn(r, in_features, generator=gen),
        "lora_B": torch.randn(out_features, r, generator=gen),
    }


def write_folder(folder, config, modules):
    """A PEFT-format folder written by hand: `modules` is path -> {lora_A, lora_B[, magnitude]}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "magnitude": "lora_magnitude_vector",
    }
    tensors = {
        f"base_model.model.{path}.{names[leaf]}": value
        for path, leaves in modules.items()
        for leaf, value in leaves.items()
    }
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def scalings(folder):
    adapters, _ = load_adapter(folder)
    return {path: float(a["scaling"]) for path, a in adapters.items()}


def test_peft_default_config_loads(tmp_path):
    folder = write_folder(tmp_path, PEFT_CONFIG, {"fc1": lora(4)})
    assert scalings(folder) == {"fc1": 2.0}


@pytest.mark.parametrize(("rslora", "expected"), [(False, 2.0), (True, 4.0)])
def test_json_booleans_decide_rslora(tmp_path, rslora, expected):
    folder = write_folder(tmp_path, {**PEFT_CONFIG, "use_rslora": rslora}, {"fc1": lora(4)})
    assert scalings(folder) == {"fc1": expected}  # 8 / 4, or 8 / sqrt(4)


BAD_FIELDS = [
    ("r", 0),
    ("r", -4),
    ("r", 4.0),
    ("r", True),
    ("r", "4"),
    ("lora_alpha", float("nan")),
    ("lora_alpha", float("inf")),
    ("lora_alpha", 0),
    ("lora_alpha", -8),
    ("lora_alpha", True),
    ("lora_alpha", "8"),
    ("use_rslora", "false"),
    ("use_rslora", 0),
    ("use_rslora", None),
    ("use_dora", "false"),
    ("fan_in_fan_out", "false"),
    ("fan_in_fan_out", True),
    ("lora_bias", "false"),
    ("lora_bias", True),
    ("inference_mode", "true"),
    ("lora_dropout", 1.0),
    ("lora_dropout", -0.1),
    ("lora_dropout", "0.1"),
    ("lora_dropout", True),
    ("rank_pattern", ["fc1"]),
    ("rank_pattern", {"fc1": 0}),
    ("rank_pattern", {"fc1": 4.0}),
    ("rank_pattern", {"fc1": True}),
    ("alpha_pattern", {"fc1": float("nan")}),
    ("alpha_pattern", {"fc1": float("-inf")}),
    ("alpha_pattern", {"fc1": 0}),
    ("alpha_pattern", {"fc1": -8}),
    ("alpha_pattern", {"fc1": "8"}),
    ("alpha_pattern", {"fc1": False}),
    ("target_modules", 3),
    ("target_modules", ["fc1", 2]),
    ("target_modules", {"fc1": 1}),
    ("exclude_modules", 3),
    ("layers_to_transform", "0"),
    ("layers_pattern", [1]),
    ("task_type", 3),
    ("auto_mapping", "Tiny"),
    ("qalora_group_size", "16"),
    ("peft_type", "IA3"),
    ("peft_type", None),
    # Fields that change what PEFT builds and hqqlora cannot honour.
    ("bias", "all"),
    ("bias", "lora_only"),
    ("modules_to_save", ["classifier"]),
    ("layer_replication", [[0, 1]]),
    ("trainable_token_indices", [0, 1]),
    ("target_parameters", ["experts.weight"]),
    ("alora_invocation_tokens", [1, 2]),
    ("use_qalora", True),
    ("use_bdlora", {"lora_a_is_blockdiagonal": True}),
    ("kasa_config", {}),
    ("arrow_config", {"top_k": 2}),
    ("megatron_config", {"tp": 2}),
    ("ensure_weight_tying", True),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "made_up"),
    ("init_lora_weights", 1),
    # A field of a newer PEFT, switched on: hqqlora cannot know what it changes.
    ("use_new_variant", True),
    ("new_variant_config", {"k": 1}),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_load_refuses_bad_field(tmp_path, field, value):
    folder = write_folder(tmp_path, {**PEFT_CONFIG, field: value}, {"fc1": lora(4)})
    name = "peft_type" if field == "peft_type" else f"`{field}"
    with pytest.raises(ValueError, match=r"Expected .*" + name) as info:
        load_adapter(folder)
    assert "got" in str(info.value)


@pytest.mark.parametrize("field", ["r", "lora_alpha"])
def test_load_refuses_missing_field(tmp_path, field):
    config = {k: v for k, v in PEFT_CONFIG.items() if k != field}
    with pytest.raises(ValueError, match=f"Expected `{field}`"):
        load_adapter(write_folder(tmp_path, config, {"fc1": lora(4)}))


def test_load_ignores_unknown_fields_that_are_off(tmp_path):
    config = {**PEFT_CONFIG, "new_size": 16, "new_name": "x", "new_flag": False, "new_config": None}
    assert scalings(write_folder(tmp_path, config, {"fc1": lora(4)})) == {"fc1": 2.0}


def test_load_accepts_adapter_only_inits_and_empty_lists(tmp_path):
    for init in (False, "gaussian", "eva", "orthogonal"):
        config = {**PEFT_CONFIG, "init_lora_weights": init, "modules_to_save": []}
        folder = write_folder(tmp_path / str(init), config, {"fc1": lora(4)})
        assert scalings(folder) == {"fc1": 2.0}


def test_rank_zero_config_is_a_value_error(tmp_path):
    """`r: 0` with a rank-0 tensor used to divide by zero."""
    zero = {"lora_A": torch.zeros(0, 32), "lora_B": torch.zeros(48, 0)}
    for config in ({**PEFT_CONFIG, "r": 0}, {**PEFT_CONFIG, "rank_pattern": {"fc1": 0}}):
        folder = write_folder(tmp_path, config, {"fc1": zero})
        with pytest.raises(ValueError, match="positive int, got 0"):
            load_adapter(folder)


def test_load_refuses_duplicate_and_empty_paths(tmp_path):
    modules = {"fc1": {**lora(4), "magnitude": torch.ones(48)}}
    folder = write_folder(tmp_path / "dup", {**PEFT_CONFIG, "use_dora": True}, modules)
    tensors = {
        "base_model.model.fc1.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.fc1.lora_B.weight": torch.zeros(48, 4),
        "base_model.model.fc1.lora_magnitude_vector": torch.ones(48),
        "base_model.model.fc1.lora_magnitude_vector.weight": torch.full((48,), 2.0),
    }
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="two for"):
        load_adapter(folder)
    folder = write_folder(tmp_path / "empty", PEFT_CONFIG, {"": lora(4)})
    with pytest.raises(ValueError, match="unsupported"):
        load_adapter(folder)


def test_load_refuses_a_file_that_is_not_safetensors(tmp_path):
    folder = write_folder(tmp_path, PEFT_CONFIG, {"fc1": lora(4)})
    (folder / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="valid safetensors"):
        load_adapter(folder)


# save_adapter's own arguments


def adapters_for_save():
    return {"fc1": {**lora(4), "scaling": torch.tensor(2.0)}}


BAD_SAVE_ARGS = [
    ("r", 0),
    ("r", -1),
    ("r", 4.0),
    ("r", True),
    ("lora_alpha", float("nan")),
    ("lora_alpha", float("inf")),
    ("lora_alpha", 0),
    ("lora_alpha", -8),
    ("lora_alpha", True),
    ("lora_alpha", "8"),
    ("lora_dropout", 1.0),
    ("lora_dropout", -0.5),
    ("lora_dropout", True),
    ("use_rslora", "false"),
    ("use_dora", 1),
    ("task_type", 3),
    ("base_model_name_or_path", ["model"]),
]


@pytest.mark.parametrize(("field", "value"), BAD_SAVE_ARGS)
def test_save_refuses_bad_argument(tmp_path, field, value):
    kwargs = {"r": 4, "lora_alpha": 8, field: value}
    with pytest.raises(ValueError, match=f"Expected `{field}` to be .*, got"):
        save_adapter(tmp_path / "out", adapters_for_save(), **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), 0.0, -2.0])
def test_save_refuses_scaling_peft_cannot_store(tmp_path, scaling):
    adapters = {"fc1": {**lora(4), "scaling": torch.tensor(scaling)}}
    with pytest.raises(
        ValueError, match=r"Expected `adapters\['fc1'\]\['scaling'\]` finite and > 0"
    ):
        save_adapter(tmp_path / "out", adapters, r=4, lora_alpha=8)
    assert not (tmp_path / "out").exists()


def test_save_refuses_rank_zero(tmp_path):
    """A rank-0 adapter used to save and then fail to load."""
    adapters = {
        "fc1": {
            "lora_A": torch.zeros(0, 32),
            "lora_B": torch.zeros(48, 0),
            "scaling": torch.tensor(1.0),
        }
    }
    with pytest.raises(ValueError, match=r"adapters\['fc1'\]` of rank r >= 1"):
        save_adapter(tmp_path / "out", adapters, r=4, lora_alpha=8)
    assert not (tmp_path / "out").exists()


def test_save_refuses_empty_path(tmp_path):
    with pytest.raises(ValueError, match="non-empty strings"):
        save_adapter(tmp_path / "out", {"": adapters_for_save()["fc1"]}, r=4, lora_alpha=8)


def test_saved_config_passes_load_checks_at_every_scaling(tmp_path):
    """alpha_pattern entries recovered from scalings are finite and > 0, and reload exactly."""
    adapters = {
        f"m{i}": {**lora(r), "scaling": torch.tensor(s)}
        for i, (r, s) in enumerate([(1, 1e-6), (3, 0.3), (8, 123.5), (4, 2.0)])
    }
    for rslora in (False, True):
        folder = save_adapter(
            tmp_path / str(rslora), adapters, r=4, lora_alpha=8, use_rslora=rslora
        )
        got = scalings(folder)
        for path, a in adapters.items():
            assert math.isclose(got[path], float(a["scaling"]), rel_tol=1e-6), path


def test_pattern_keys_written_for_one_path_miss_its_suffixes(tmp_path):
    """`fc2`'s own rank and alpha must not reach `block.fc2`, which ends in `.fc2`."""
    adapters = {
        "fc2": {**lora(2), "scaling": torch.tensor(3.0)},
        "block.fc2": {**lora(4, seed=1), "scaling": torch.tensor(2.0)},
        "x.block.fc2": {**lora(4, seed=2), "scaling": torch.tensor(2.0)},
    }
    folder = save_adapter(tmp_path, adapters, r=4, lora_alpha=8)
    loaded, _ = load_adapter(folder)
    for path, a in adapters.items():
        assert all(torch.equal(loaded[path][k], v) for k, v in a.items()), path


def test_load_refuses_other_prefixes(tmp_path):
    folder = write_folder(tmp_path, PEFT_CONFIG, {"fc1": lora(4)})
    tensors = {"base_model.fc1.lora_A.weight": torch.zeros(4, 32)}
    tensors["base_model.fc1.lora_B.weight"] = torch.zeros(48, 4)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"unsupported \['base_model\.fc1\.lora_A\.weight'"):
        load_adapter(folder)
