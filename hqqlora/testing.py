"""Hypothesis strategies for property-testing code built on hqqlora.

Needs ``hypothesis`` (the ``test`` extra); ``import hqqlora`` does not import this
module. Every strategy draws integer seeds and builds its tensors with a
``torch.Generator``, so examples shrink and replay deterministically.

Arguments of the form ``values`` accept a single value, a sequence of values to
sample from, or a hypothesis strategy.

Example (a complete property test of a merge/unmerge round trip)::

    from hypothesis import given, settings, strategies as st
    import hqqlora
    from hqqlora.testing import adapters, quantized_layers

    @settings(deadline=None)  # quantizing takes longer than hypothesis' 200 ms default
    @given(st.data())
    def test_merge_unmerge_round_trip(data):
        layer = data.draw(quantized_layers(nbits=(4, 8)))
        params = data.draw(adapters(layer))
        restored = hqqlora.unmerge(hqqlora.merge(layer, params), params)
        W, W2 = hqqlora.dequantize(layer).float(), hqqlora.dequantize(restored).float()
        assert (W2 - W).norm() <= 0.2 * W.norm()  # requantization is lossy, but bounded
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from hqqlora._base import HQQLinear, check_hqq_layer, quant_layout
from hqqlora._dora import dora_weight_norm

__all__ = ["BASE", "adapter_banks", "adapter_names", "adapters", "quantized_layers"]

BASE = "__base__"
"""The name that means "no adapter" in a mixed batch."""

_SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _strategy(values: object, name: str) -> SearchStrategy[Any]:
    """A strategy from a strategy, a sequence to sample from, or a single value."""
    if isinstance(values, SearchStrategy):
        return values
    if isinstance(values, Sequence) and not isinstance(values, str):
        if not values:
            raise ValueError(
                f"Expected `{name}` to hold at least one value, got an empty sequence."
            )
        return st.sampled_from(tuple(values))
    return st.just(values)


def quantized_layers(
    *,
    in_features: object = (16, 32, 64),
    out_features: object = (16, 32, 48),
    nbits: object = (1, 2, 3, 4, 8),
    group_sizes: object = (16, 32),
    axes: object = (0, 1),
    dtypes: object = (torch.float32, torch.bfloat16, torch.float16),
    bias: object = (True, False),
) -> SearchStrategy[HQQLinear]:
    """Small ``HQQLinear`` layers on the CPU, freshly quantized from a seeded weight.

    The weight is ``N(0, 1/in)``, the bias ``N(0, 0.01)``. Only combinations whose
    weight size ``out·in`` is a multiple of the group size are drawn (HQQ groups the
    flattened weight); the defaults are all multiples of 16.

    Args:
        in_features: layer input sizes.
        out_features: layer output sizes.
        nbits: bits per code, among HQQ's 1, 2, 3, 4, 8.
        group_sizes: quantization group sizes.
        axes: HQQ grouping axes, 0 or 1.
        dtypes: compute dtypes.
        bias: whether the layer has a bias.

    Returns:
        A strategy of ``HQQLinear`` (quantized with HQQ's defaults, ``device="cpu"``).

    Raises:
        ValueError: an option given as an empty sequence.
    """
    options = {
        name: _strategy(value, name)
        for name, value in [
            ("in_features", in_features),
            ("out_features", out_features),
            ("nbits", nbits),
            ("group_sizes", group_sizes),
            ("axes", axes),
            ("dtypes", dtypes),
            ("bias", bias),
        ]
    }
    return _quantized_layers(**options)


@st.composite
def _quantized_layers(
    draw: st.DrawFn,
    *,
    in_features: SearchStrategy[int],
    out_features: SearchStrategy[int],
    nbits: SearchStrategy[int],
    group_sizes: SearchStrategy[int],
    axes: SearchStrategy[int],
    dtypes: SearchStrategy[torch.dtype],
    bias: SearchStrategy[bool],
) -> HQQLinear:
    from hqq.core.quantize import BaseQuantizeConfig

    n_in = draw(in_features)
    n_out = draw(out_features)
    group_size = draw(group_sizes)
    assume((n_in * n_out) % group_size == 0)
    bits = draw(nbits)
    axis = draw(axes)
    dtype = draw(dtypes)
    with_bias = draw(bias)
    gen = torch.Generator().manual_seed(draw(_SEEDS))
    linear = torch.nn.Linear(n_in, n_out, bias=with_bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in**0.5)
        if with_bias:
            linear.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)
    return HQQLinear(linear, config, compute_dtype=dtype, device="cpu")


def adapters(
    layer: HQQLinear,
    *,
    ranks: object = (1, 2, 4, 8),
    dora: object = False,
    dtypes: object = None,
    scalings: object = (0.5, 1.0, 2.0),
) -> SearchStrategy[dict[str, torch.Tensor]]:
    """Adapter dicts that fit ``layer``, with random ``lora_A`` and ``lora_B`` (never a no-op).

    ``lora_A ~ N(0, 1/in)`` of shape ``(r, in)``, ``lora_B ~ N(0, 0.01)`` of shape
    ``(out, r)``, ``scaling`` a float32 0-d tensor. A DoRA adapter gets
    ``magnitude = dora_weight_norm(layer, params) · U(0.8, 1.2)``: positive and near
    the norms, as after some training.

    Args:
        layer: the ``HQQLinear`` the adapters are for, weight of shape ``(out, in)``.
        ranks: ranks ``r``.
        dora: whether to add a ``magnitude`` (``True``, ``False`` or ``(False, True)``).
        dtypes: adapter dtypes; ``None`` means the layer's compute dtype.
        scalings: values of ``scaling``.

    Returns:
        A strategy of adapter dicts.

    Raises:
        TypeError: ``layer`` is not an ``HQQLinear``.
        ValueError: an option given as an empty sequence.
    """
    check_hqq_layer(layer, "layer")
    layout = quant_layout(layer)
    return _adapters(
        layer,
        layout.shape,
        ranks=_strategy(ranks, "ranks"),
        dora=_strategy(dora, "dora"),
        dtypes=_strategy(layout.compute_dtype if dtypes is None else dtypes, "dtypes"),
        scalings=_strategy(scalings, "scalings"),
    )


@st.composite
def _adapters(
    draw: st.DrawFn,
    layer: HQQLinear,
    shape: tuple[int, int],
    *,
    ranks: SearchStrategy[int],
    dora: SearchStrategy[bool],
    dtypes: SearchStrategy[torch.dtype],
    scalings: SearchStrategy[float],
) -> dict[str, torch.Tensor]:
    n_out, n_in = shape
    r = draw(ranks)
    dtype = draw(dtypes)
    s = draw(scalings)
    with_dora = draw(dora)
    gen = torch.Generator().manual_seed(draw(_SEEDS))
    params = {
        "lora_A": (torch.randn(r, n_in, generator=gen) / n_in**0.5).to(dtype),
        "lora_B": (torch.randn(n_out, r, generator=gen) * 0.1).to(dtype),
        "scaling": torch.tensor(float(s)),
    }
    if with_dora:
        jitter = 0.8 + 0.4 * torch.rand(n_out, generator=gen)
        params["magnitude"] = (dora_weight_norm(layer, params).float() * jitter).to(dtype)
    return params


def adapter_banks(
    layer: HQQLinear,
    *,
    min_size: int = 1,
    max_size: int = 4,
    **adapter_options: object,
) -> SearchStrategy[dict[str, dict[str, torch.Tensor]]]:
    """Dicts ``name -> adapter`` for ``layer``, named ``"adapter_0"``, ``"adapter_1"``, ...

    Args:
        layer: the ``HQQLinear`` the adapters are for.
        min_size: the fewest adapters.
        max_size: the most adapters.
        **adapter_options: passed to :func:`adapters` (``ranks``, ``dora``, ``dtypes``,
            ``scalings``), each adapter drawn on its own.

    Returns:
        A strategy of adapter banks, as :func:`hqqlora.mixed_batch` takes them.

    Raises:
        ValueError: sizes out of order or below 1; bad adapter options.
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"Expected 1 <= min_size <= max_size, got {min_size} and {max_size}.")
    one = adapters(layer, **adapter_options)
    return st.integers(min_value=min_size, max_value=max_size).flatmap(
        lambda size: st.fixed_dictionaries({f"adapter_{i}": one for i in range(size)})
    )


def adapter_names(
    bank: Mapping[str, object], batch_size: int | SearchStrategy[int], *, base: bool = True
) -> SearchStrategy[list[str]]:
    """Lists of ``batch_size`` names from ``bank`` (and ``"__base__"``), one per batch row.

    Args:
        bank: a dict ``name -> adapter``.
        batch_size: the list length (an int or a strategy of ints).
        base: whether ``"__base__"`` (no adapter) may appear.

    Returns:
        A strategy of lists of names, for ``mixed_batch(x, bank, names)``.
    """
    if not bank:
        raise ValueError("Expected a non-empty adapter `bank`, got an empty one.")
    choices = [*bank, BASE] if base else list(bank)
    sizes = _strategy(batch_size, "batch_size")
    return sizes.flatmap(lambda n: st.lists(st.sampled_from(choices), min_size=n, max_size=n))
