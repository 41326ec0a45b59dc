"""``HqqLoraLinear``: a PEFT-compatible ``nn.Module`` over the functional core.

The module holds the quantized base and the adapters' ``nn.Parameter``s under
PEFT's names (``base_layer.*``, ``lora_A.<name>.weight``, ``lora_B.<name>.weight``,
``lora_magnitude_vector.<name>.weight``), so state dicts load both ways. All the
maths is the core's: :func:`apply_lora`, :func:`mixed_batch`, :func:`merge`,
:func:`delta_weight`, :func:`init_lora`.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from hqqlora._bank import BASE
from hqqlora._base import HQQLinear, base_forward, check_hqq_layer, quant_layout
from hqqlora._lora import apply_lora
from hqqlora._merge import merge
from hqqlora._mixed import mixed_batch
from hqqlora._params import delta_weight, init_lora, lora_scaling
from hqqlora._route import adapter_names_in_use, apply_routed, routed_params

__all__ = ["HqqLoraLinear", "dispatch_hqq"]

DORA = "dora"


class _Magnitude(nn.Module):
    """Holds DoRA's magnitude vector as ``weight``, like PEFT's ``DoraLinearLayer``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.fan_in_fan_out = False
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def _linear(weight: Tensor) -> nn.Linear:
    """An ``nn.Linear(bias=False)`` holding ``weight`` (built on meta: no wasted init)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(weight)
    return layer


_OPTION_DEFAULTS = {
    "lora_dropout": 0.0,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "inference_mode": False,
}


def _unsupported_variants(config: Any) -> list[str]:
    """The LoRA variants (other than DoRA) a dataclass config switches on."""
    if not dataclasses.is_dataclass(config):
        return []
    return [
        f.name
        for f in dataclasses.fields(config)
        if f.metadata.get("is_lora_variant") and f.name != "use_dora" and getattr(config, f.name)
    ]


def resolve_options(config: Any, **explicit: Any) -> dict[str, Any]:
    """The layer options from PEFT's ``config`` and the explicit arguments.

    An explicit argument left at ``None`` takes the config's value (PEFT's layers
    read these options from the config), or PEFT's default without a config. An
    explicit value that contradicts the config is refused rather than silently
    overriding or being overridden.

    Raises:
        ValueError: an explicit option that contradicts ``config``, or a ``config``
            asking for a LoRA variant this layer does not implement.
    """
    options = dict(_OPTION_DEFAULTS)
    given: dict[str, Any] = {}
    if isinstance(config, Mapping):  # a config as a dict (load_adapter's, PEFT's JSON)
        given = {k: config[k] for k in options if k in config}
    elif config is not None:
        if not hasattr(config, "use_dora") or not hasattr(config, "lora_dropout"):
            raise TypeError(
                f"Expected `config` to be a peft.LoraConfig (or a dict of its fields), got "
                f"{type(config).__name__}."
            )
        variants = _unsupported_variants(config)
        if variants:
            raise ValueError(
                f"Expected a LoRA or DoRA config, got one asking for unsupported variants {variants}."
            )
        given = {k: getattr(config, k) for k in options if hasattr(config, k)}
    options.update(given)
    for key, value in explicit.items():
        if value is None:
            continue
        if key in given and value != given[key]:
            raise ValueError(
                f"Expected `{key}` to agree with `config.{key}` ({options[key]!r}), got {value!r}."
            )
        options[key] = value
    return options


class HqqLoraLinear(nn.Module):
    """LoRA/DoRA adapters on an ``HQQLinear``, with PEFT's ``HqqLoraLinear`` interface.

    For the active adapters, ``forward`` computes (see :func:`apply_lora`)::

        y = base(x) + scaling · dropout(x) @ Aᵀ @ Bᵀ          (LoRA)
        y = c ⊙ (x @ Wᵀ + scaling · x @ Aᵀ @ Bᵀ) + bias        (DoRA, c = magnitude / n)

    ``forward(x, adapter_names=[...])`` gives each row of ``x`` its own adapter
    (:func:`mixed_batch`, DoRA included). ``merge`` folds adapters into a new
    quantized base with one requantization and keeps the original, so ``unmerge``
    restores it exactly; while adapters are disabled, ``forward`` is the base output
    of that kept original, and a merged layer stays merged (PEFT's layer unmerges).

    With :func:`hqqlora.use_in_peft`, PEFT builds a subclass of this layer that is
    also PEFT's ``LoraLayer``, so PEFT's model-level API drives it.

    Args:
        base_layer: the quantized layer; read, never written.
        adapter_name: name of the first adapter.
        r, lora_alpha: rank and alpha of the first adapter.
        lora_dropout, init_lora_weights, use_rslora, use_dora: as in PEFT's
            ``LoraConfig``; ``None`` takes ``config``'s value, or PEFT's default
            (0.0, True, False, False) without one.
        lora_bias: must be ``False``.
        config: a PEFT ``LoraConfig`` (what PEFT's ``dispatch`` passes): supplies the
            options above and ``inference_mode``, as PEFT's ``HqqLoraLinear`` reads
            them; an explicit option that contradicts it raises ``ValueError``.
        **kwargs: ignored, as PEFT's layers ignore the dispatch arguments they do not use.

    Raises:
        TypeError: ``base_layer`` is not an ``HQQLinear``.
        ValueError: ``lora_bias=True`` or ``r <= 0``.
    """

    # PEFT's names for the per-adapter containers (its ``BaseTunerLayer`` protocol).
    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "lora_dropout",
        "use_dora",
        "use_rslora",
        "lora_bias",
    )

    def __init__(
        self,
        base_layer: HQQLinear,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float | None = None,
        init_lora_weights: bool | str | None = None,
        use_rslora: bool | None = None,
        use_dora: bool | None = None,
        lora_bias: bool | None = None,
        *,
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        options = resolve_options(
            config,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            use_dora=use_dora,
            lora_bias=lora_bias,
        )
        if options["lora_bias"]:
            raise ValueError(
                f"Expected lora_bias=False ({type(self).__name__} has no LoRA bias), got True."
            )
        check_hqq_layer(base_layer, "base_layer")
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = quant_layout(base_layer).shape
        self.fan_in_fan_out = False
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_variant: dict[str, str] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = [adapter_name]
        # The pre-merge layer, kept out of the module tree (and the state dict).
        self._kept_base: tuple[HQQLinear, ...] = ()
        self.update_layer(adapter_name, r, lora_alpha, config=config, **options)

    # -- adapters -------------------------------------------------------------------

    def get_base_layer(self) -> HQQLinear:
        """The quantized layer in use (the merged one while merged)."""
        return self.base_layer

    def resolve_lora_variant(self, *, use_dora: bool = False, **kwargs: Any) -> str | None:
        """``"dora"`` for a DoRA adapter, ``None`` for plain LoRA."""
        return DORA if use_dora else None

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float | None = None,
        init_lora_weights: bool | str | None = None,
        use_rslora: bool | None = None,
        use_dora: bool | None = None,
        lora_bias: bool | None = None,
        *,
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        """Adds (or replaces) adapter ``adapter_name``, initialized by :func:`init_lora`.

        DoRA's magnitude is computed from the current base layer, as in PEFT. With
        ``config`` (a PEFT ``LoraConfig``), its ``lora_dropout``, ``init_lora_weights``,
        ``use_rslora``, ``use_dora``, ``lora_bias`` and ``inference_mode`` apply, as in
        PEFT's layers; ``r`` and ``lora_alpha`` are the arguments (PEFT passes each
        module's entry of ``rank_pattern``/``alpha_pattern``).

        Raises:
            ValueError: ``r <= 0``, ``lora_bias=True``, ``lora_dropout`` outside
                ``[0, 1)``, the reserved name ``"__base__"``, an option that
                contradicts ``config``, or a ``config`` asking for a LoRA variant
                other than DoRA.
        """
        options = resolve_options(
            config,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            use_dora=use_dora,
            lora_bias=lora_bias,
        )
        lora_dropout, init_lora_weights = options["lora_dropout"], options["init_lora_weights"]
        use_rslora, use_dora = options["use_rslora"], options["use_dora"]
        if options["lora_bias"]:
            raise ValueError(
                f"Expected lora_bias=False ({type(self).__name__} has no LoRA bias), got True."
            )
        if not isinstance(adapter_name, str) or adapter_name == BASE:
            raise ValueError(f"Expected an adapter name other than {BASE!r}, got {adapter_name!r}.")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"Expected `lora_dropout` in [0, 1), got {lora_dropout!r}.")
        params = init_lora(
            self.base_layer,
            r,
            lora_alpha,
            use_rslora=use_rslora,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
        )
        self.lora_A[adapter_name] = _linear(params["lora_A"])
        self.lora_B[adapter_name] = _linear(params["lora_B"])
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = _Magnitude(params["magnitude"])
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        variant = self.resolve_lora_variant(use_dora=use_dora)
        if variant is None:
            self.lora_variant.pop(adapter_name, None)
        else:
            self.lora_variant[adapter_name] = variant
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = use_rslora
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = False
        self.set_adapter(self.active_adapters, inference_mode=options["inference_mode"])

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(
                f"Expected an adapter among {list(self.lora_A)}, got {adapter_name!r}."
            )

    def adapter_params(self, adapter_name: str) -> dict[str, Tensor]:
        """The functional adapter dict built from this module's own Parameters.

        Gradients flow to the Parameters. ``scaling`` is a new 0-d tensor.

        Raises:
            ValueError: an unknown adapter name (the message lists the known ones).
        """
        self._check_adapter(adapter_name)
        A = cast(Tensor, self.lora_A[adapter_name].weight)
        params = {
            "lora_A": A,
            "lora_B": cast(Tensor, self.lora_B[adapter_name].weight),
            "scaling": torch.tensor(self.scaling[adapter_name], device=A.device),
        }
        if adapter_name in self.lora_magnitude_vector:
            params["magnitude"] = cast(Tensor, self.lora_magnitude_vector[adapter_name].weight)
        return params

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``ΔW = scaling · B @ A`` of one adapter, ``(out, in)``."""
        return delta_weight(self.adapter_params(adapter))

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return (
            self._active_adapter[0]
            if len(self._active_adapter) == 1
            else list(self._active_adapter)
        )

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Makes ``adapter_names`` the active adapters, trainable unless ``inference_mode``.

        Names this layer does not hold are kept (PEFT's rule, so that one call can
        serve a model whose adapters target different layers) and skipped in forward.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for layer_name in self.adapter_layer_names:
            for key, module in getattr(self, layer_name).items():
                module.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Turns the adapters on (trainable again) or off (frozen, base output only)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for layer_name in self.adapter_layer_names:
                getattr(self, layer_name).requires_grad_(False)
            self._disable_adapters = True

    def set_requires_grad(
        self, adapter_names: str | Sequence[str], requires_grad: bool = True
    ) -> None:
        """Turns gradients of the named adapters' Parameters on or off (PEFT's method)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for layer_name in self.adapter_layer_names:
            for key, module in getattr(self, layer_name).items():
                if key in names:
                    module.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes adapter ``adapter_name`` and all its settings, as PEFT's layers do.

        A name this layer does not hold is ignored (PEFT's rule, so that one call can
        serve a model whose adapters target different layers). If the adapter was
        active, the other active ones stay active; if none is left, the first
        remaining adapter by name becomes active, with a warning (PEFT's rule).

        Raises:
            ValueError: the adapter is merged into the base layer (unmerge first);
                nothing changes.
        """
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"Expected an unmerged adapter to delete, got {adapter_name!r}, which is merged: "
                "call unmerge() first."
            )
        for attr in (*self.adapter_layer_names, *self.other_param_names, "lora_variant"):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name not in self._active_adapter:
            return
        active = [n for n in self._active_adapter if n != adapter_name]
        if not active and self.lora_A:
            active = sorted(self.lora_A)[:1]
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                f"to {active[0]}.",
                stacklevel=2,
            )
        self.set_adapter(active)

    # -- merging --------------------------------------------------------------------

    def _unmerged_base(self) -> HQQLinear:
        """The quantized layer without merged adapters (the one kept by :meth:`merge`)."""
        return self._kept_base[0] if self._kept_base else self.base_layer

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Folds adapters (the active ones by default) into a new quantized base.

        The pre-merge layer is kept; every merge requantizes it once with all merged
        adapters in order (:func:`merge`), so DoRA norms come from the unmerged weight.

        Raises:
            ValueError: ``safe_merge`` and a non-finite merged weight; nothing changes.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(
                f"Already following adapters were merged {','.join(already)}. "
                f"You are now additionally merging {','.join(n for n in names if n not in already)}.",
                stacklevel=2,
            )
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        original = self._unmerged_base()
        merged_names = [*self.merged_adapters, *names]
        with torch.no_grad():
            params = [
                {k: v.detach() for k, v in self.adapter_params(n).items()} for n in merged_names
            ]
            new_base = merge(original, params, safe_merge=safe_merge)
        self._kept_base = (original,)
        self.base_layer = new_base
        self.merged_adapters = merged_names

    def unmerge(self) -> None:
        """Restores the pre-merge quantized layer exactly (the one kept by :meth:`merge`)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.base_layer = self._kept_base[0]
        self._kept_base = ()
        self.merged_adapters = []

    # -- forward --------------------------------------------------------------------

    def forward(
        self, x: Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Tensor:
        """The layer output; ``adapter_names`` gives row ``i`` adapter ``adapter_names[i]``.

        Names this layer does not hold act as ``"__base__"`` (PEFT's rule).

        Args:
            x: input of shape ``(..., in_features)`` (``(batch, ..., in)`` with ``adapter_names``).

        Raises:
            ValueError: ``adapter_names`` of the wrong length, or given while merged,
                or with dropout in training mode; active adapters with different
                dropout in training mode.
            TypeError: extra positional or keyword arguments.
        """
        if args or kwargs:
            raise TypeError(
                f"Expected only `x` and `adapter_names`, got extra arguments {args} {sorted(kwargs)}."
            )
        routed = routed_params(self)
        if routed is not None:  # functional_call names this shim: its adapter, not ours
            return apply_routed(self._unmerged_base(), routed, x)
        if adapter_names is None:
            adapter_names = adapter_names_in_use()  # model(..., adapter_names=[...])
        if self.disable_adapters:
            # The kept pre-merge layer: exact, and no state change inside forward
            # (PEFT unmerges here, so a merged model comes out of disable_adapter unmerged).
            return base_forward(self._unmerged_base(), x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged:
            return base_forward(self.base_layer, x)
        active = [n for n in self.active_adapters if n in self.lora_A]
        if not active:
            return base_forward(self.base_layer, x)
        dropouts = {self.lora_dropout[n] if self.training else 0.0 for n in active}
        if len(dropouts) > 1:
            raise ValueError(
                f"Expected one lora_dropout for all active adapters in training, got {sorted(dropouts)}."
            )
        params = [self.adapter_params(n) for n in active]
        return apply_lora(
            self.base_layer, params if len(params) > 1 else params[0], x, dropout=dropouts.pop()
        )

    def _mixed_batch_forward(self, x: Tensor, adapter_names: Sequence[str]) -> Tensor:
        if isinstance(adapter_names, str) or len(adapter_names) != len(x):
            got = adapter_names if isinstance(adapter_names, str) else f"{len(adapter_names)} names"
            raise ValueError(f"Expected one adapter name per row of x ({len(x)}), got {got}.")
        if self.merged:
            raise ValueError(
                "Expected no merged adapters with `adapter_names`, got merged "
                f"{self.merged_adapters}: call unmerge() first."
            )
        names = [n if n in self.lora_A else BASE for n in adapter_names]
        used = sorted(set(names) - {BASE})
        if self.training and any(self.lora_dropout[n] > 0 for n in used):
            raise ValueError(
                "Expected eval mode or lora_dropout=0 for mixed batches, got dropout in training."
            )
        params = {n: self.adapter_params(n) for n in used}
        if not params:
            return base_forward(self.base_layer, x)
        return mixed_batch(x, params, names, base=self.base_layer)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_hqq(target: nn.Module, adapter_name: str, **kwargs: Any) -> HqqLoraLinear | None:
    """An :class:`HqqLoraLinear` around ``target`` if it is (or wraps) an ``HQQLinear``, else ``None``.

    ``target`` may be an ``HQQLinear`` or a layer with ``get_base_layer()`` (a shim,
    PEFT's or ours). A PEFT ``config=LoraConfig(...)`` in ``kwargs`` supplies the
    options as in :class:`HqqLoraLinear`, and ``r``/``lora_alpha`` when not given;
    with one, the layer is the subclass PEFT recognises as its own ``LoraLayer``
    (what :func:`hqqlora.use_in_peft` registers), so that registering this function
    as PEFT's custom module works too.
    """
    base = cast(Any, target).get_base_layer() if hasattr(target, "get_base_layer") else target
    if not isinstance(base, HQQLinear):
        return None
    config = kwargs.get("config")
    layer_class = HqqLoraLinear
    if config is not None:
        kwargs.setdefault("r", getattr(config, "r", 0))
        kwargs.setdefault("lora_alpha", getattr(config, "lora_alpha", 1))
        peft = sys.modules.get("peft")  # a LoraConfig means PEFT is imported already
        if peft is not None and isinstance(config, peft.LoraConfig):
            from hqqlora._peft_layer import PeftHqqLoraLinear

            layer_class = PeftHqqLoraLinear
    return layer_class(base, adapter_name, **kwargs)
