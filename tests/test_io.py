"""PEFT-format adapter files: both ways with PEFT, round trips, bad input, pickle refusal.

Only the tests that take the `peft` fixture need PEFT; the others run without it.
More in test_io_atomic.py (killed saves), test_io_config.py (config fields) and
test_io_patterns.py (rank_pattern / alpha_pattern).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import load_file

from hqqlora import functional_call, load_adapter, save_adapter
from tests.helpers import assert_close_rel
from tests.test_model import PATHS, make_adapters, make_model


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def peft_model(peft, config, seed=0):
    model = peft.get_peft_model(make_model(seed=seed), config)
    assert type(model.base_model.model.fc1).__name__ == "HqqLoraLinear"
    return model.eval()


@pytest.mark.parametrize(
    ("dora", "rslora"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_peft_save_pretrained_then_load_adapter(tmp_path, peft, dora, rslora):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["fc1", "fc2", "fc3"],
        use_dora=dora,
        use_rslora=rslora,
        init_lora_weights=False,
    )
    model = peft_model(peft, config)
    if dora:  # move the magnitudes off their initial norms, so DoRA matters
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                    m.lora_magnitude_vector["default"].weight.mul_(1.1)
    model.save_pretrained(tmp_path)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = model(x)

    plain = make_model()
    adapters, loaded_config = load_adapter(tmp_path, model=plain)
    assert sorted(adapters) == sorted(PATHS)
    assert loaded_config["use_dora"] is dora and loaded_config["use_rslora"] is rslora
    assert all(("magnitude" in a) is dora for a in adapters.values())
    scaling = 6 / 2 if rslora else 6 / 4
    assert all(float(a["scaling"]) == scaling for a in adapters.values())
    assert_close_rel(functional_call(plain, adapters, (x,)), expected, torch.float32, factor=10)


@pytest.mark.parametrize(("dora", "rslora"), [(False, False), (True, True)])
def test_save_adapter_then_peft_from_pretrained(tmp_path, peft, dora, rslora):
    model = make_model()
    adapters = make_adapters(model, dora=dora)
    # Different ranks and scalings per module go through rank_pattern / alpha_pattern.
    adapters["fc3"] = make_adapters(model, dora=dora, r=2, seed=7)["fc3"]
    adapters["fc1"] = {**adapters["fc1"], "scaling": torch.tensor(0.75)}
    save_adapter(tmp_path, adapters, r=4, lora_alpha=8, use_rslora=rslora, use_dora=dora)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"^fc3": 2}
    expected = ["^block\\.fc2", "^fc1", "^fc3"] if rslora else ["^fc1", "^fc3"]
    assert sorted(config["alpha_pattern"]) == expected

    x = torch.randn(5, 32)
    loaded = peft.PeftModel.from_pretrained(make_model(), tmp_path).eval()
    assert type(loaded.base_model.model.fc3).__name__ == "HqqLoraLinear"
    assert loaded.base_model.model.fc3.r["default"] == 2
    with torch.no_grad():
        got = loaded(x)
    assert_close_rel(got, functional_call(model, adapters, (x,)), torch.float32, factor=10)


def test_save_adapter_keys_match_peft(tmp_path, peft):
    model = make_model()
    adapters = make_adapters(model, dora=True)
    save_adapter(tmp_path / "ours", adapters, r=4, lora_alpha=8, use_dora=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"], use_dora=True)
    peft_model(peft, config).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_round_trip_is_exact(tmp_path):
    model = make_model()
    adapters = make_adapters(model, dora=True)
    save_adapter(
        tmp_path, adapters, r=4, lora_alpha=8, use_dora=True, target_modules=["fc1", "fc2", "fc3"]
    )
    loaded, config = load_adapter(tmp_path, model=model)
    assert config["target_modules"] == ["fc1", "fc2", "fc3"]
    for path, params in adapters.items():
        assert set(loaded[path]) == set(params)
        for key, value in params.items():
            assert torch.equal(loaded[path][key], value), (path, key)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_adapter_leaves_inputs_alone(tmp_path):
    model = make_model()
    adapters = make_adapters(model)
    before = {p: {k: v.clone() for k, v in a.items()} for p, a in adapters.items()}
    save_adapter(tmp_path, adapters, r=4, lora_alpha=8)
    assert all(torch.equal(adapters[p][k], v) for p, a in before.items() for k, v in a.items())


# bad input


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        load_adapter(tmp_path)
    save_adapter(tmp_path, make_adapters(make_model()), r=4, lora_alpha=8)
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(tmp_path)


class Payload:
    """Unpickling this creates `marker`: what a hostile adapter_model.bin would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(path, marker, how):
    if how == "pickle":
        path.write_bytes(pickle.dumps({"base_model.model.fc1.lora_A.weight": Payload(marker)}))
    else:  # torch.save's zip format, what PEFT's .bin files are
        torch.save({"base_model.model.fc1.lora_A.weight": Payload(marker)}, path)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_payload_really_runs_when_unpickled(tmp_path, how):
    """The planted files below are live: unpickling one creates its marker."""
    plant(tmp_path / "payload", tmp_path / "marker", how)
    if how == "pickle":
        pickle.loads((tmp_path / "payload").read_bytes())
    else:
        torch.load(tmp_path / "payload", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth"])
def test_load_never_unpickles(tmp_path, name, how):
    marker = tmp_path / "marker"
    alone = tmp_path / "alone"
    alone.mkdir()
    plant(alone / name, marker, how)
    (alone / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_adapter(alone)
    assert not marker.exists()

    beside = tmp_path / "beside"  # a safetensors file beside it: the pickle is ignored
    adapters = make_adapters(make_model())
    save_adapter(beside, adapters, r=4, lora_alpha=8)
    plant(beside / name, marker, how)
    loaded, _ = load_adapter(beside)
    assert all(torch.equal(loaded[p]["lora_A"], a["lora_A"]) for p, a in adapters.items())
    assert not marker.exists()

    disguised = tmp_path / "disguised"  # a pickle under the safetensors name
    save_adapter(disguised, adapters, r=4, lora_alpha=8)
    plant(disguised / "adapter_model.safetensors", marker, how)
    with pytest.raises(ValueError, match="valid safetensors"):
        load_adapter(disguised)
    assert not marker.exists()


def test_load_shape_mismatch(tmp_path):
    adapters = make_adapters(make_model())
    save_adapter(tmp_path, adapters, r=4, lora_alpha=8)
    other = make_model()
    other.fc1, other.fc3 = other.fc3, other.fc1
    with pytest.raises(ValueError, match=r"adapters\['fc1'\]\['lora_A'\]` of shape \(r, 48\)"):
        load_adapter(tmp_path, model=other)
    with pytest.raises(ValueError, match=r"unknown \['fc1'\]"):
        load_adapter(tmp_path, model=make_model(skip="fc1"))


def test_load_bad_config_and_tensors(tmp_path):
    save_adapter(tmp_path, make_adapters(make_model()), r=4, lora_alpha=8)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="Expected rank 8"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(tmp_path)


def test_save_bad_input(tmp_path):
    model = make_model()
    lora, dora = make_adapters(model), make_adapters(model, dora=True)
    with pytest.raises(ValueError, match="magnitude"):
        save_adapter(tmp_path, lora, r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(ValueError, match="no `magnitude`"):
        save_adapter(tmp_path, dora, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"missing \['block\.fc2', 'fc3'\]"):
        save_adapter(tmp_path, lora, r=4, lora_alpha=8, target_modules=["fc1"])
    with pytest.raises(ValueError, match="non-empty"):
        save_adapter(tmp_path, {}, r=4, lora_alpha=8)
    assert os.listdir(tmp_path) == []


def test_interrupted_save_keeps_old_files(tmp_path, monkeypatch):
    import hqqlora._io

    model = make_model()
    save_adapter(tmp_path, make_adapters(model), r=4, lora_alpha=8)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(hqqlora._io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(tmp_path, make_adapters(model, seed=9), r=4, lora_alpha=8)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
