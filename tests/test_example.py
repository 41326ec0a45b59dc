"""The MiniLM example's helpers for --compare (the example itself runs in CI with --quick)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import hqqlora
from tests.helpers import make_layer

pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location(
    "minilm_recovery", Path(__file__).parents[1] / "examples" / "minilm_recovery.py"
)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def test_group_constant_adapters_train_through_functional_call():
    layer = make_layer(64, 48, group_size=16)
    model = torch.nn.Sequential(layer)
    params = hqqlora.init_lora(layer, 4, 8, group_constant=True, init_lora_weights=False)
    assert params["lora_A"].shape == (4, 4)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))

    def loss(trainable, apply):
        return apply({**params, **trainable}).square().sum()

    trainable = hqqlora.trainable_params(params)
    ref = torch.func.grad(loss)(trainable, lambda p: hqqlora.apply_lora(layer, p, x))
    grads = torch.func.grad(loss)(
        trainable, lambda p: hqqlora.functional_call(model, {"0": p}, (x,))
    )
    assert grads["lora_A"].shape == (4, 4)  # the compact lora_A: the update stays group-constant
    torch.testing.assert_close(grads, ref, rtol=1e-4, atol=1e-5)


def test_summarize_without_column_is_the_default_row():
    values = torch.tensor([0.99, 0.995])
    row = example.summarize("HQQ", values, 0.99, recovery=True)
    assert row == f"| {'HQQ':<34} | 0.99250 | 0.99000 | {'25.0%':>11} |"
    assert example.summarize("HQQ", values, 0.99, recovery=True, column=True, captured=0.5) == (
        row + "   0.5000 |"
    )
