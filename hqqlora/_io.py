"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A model-level adapters dict ``{path: {"lora_A", "lora_B", "scaling", ["magnitude"]}}``
maps to PEFT's tensors as::

    base_model.model.<path>.lora_A.weight       (r, in)
    base_model.model.<path>.lora_B.weight       (out, r)
    base_model.model.<path>.lora_magnitude_vector  (out,)   DoRA only

``scaling`` is not stored: PEFT recomputes it from the config
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rslora, with per-module
``rank_pattern`` / ``alpha_pattern`` overrides). Only safetensors are read or
written, never pickle.

Every config field is checked, on saving and on loading, with a ``ValueError``
that names the field: a file that would load as something other than what PEFT
builds from it is refused, never loaded. Pattern keys are matched in bounded time
(:mod:`hqqlora._patterns`), and the pair of files is replaced in one atomic step
(:mod:`hqqlora._atomic`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hqqlora._atomic import replace_folder
from hqqlora._model import _check_targets, _matches, hqq_layers
from hqqlora._params import check_params, lora_scaling
from hqqlora._patterns import compile_pattern, pattern_value
from hqqlora._shard import full_tensors, write_on_rank0

__all__ = ["load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
_KEYS = {  # PEFT's key suffix -> our leaf name
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # older PEFT versions
}
# The per-file temporary names of earlier hqqlora versions, never carried into a new save.
_OLD_TEMPORARY = re.compile(rf"\.({re.escape(CONFIG_NAME)}|{re.escape(WEIGHTS_NAME)})\..*\.tmp")

# Config fields that change what PEFT builds and that hqqlora cannot honour: each
# must hold its PEFT default (a JSON null / false / "none" / empty list).
_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
    "ensure_weight_tying": False,
    "bias": "none",
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "velora_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
}
# init_lora_weights values whose init only draws the adapter (the file's tensors then
# replace it). Others (pissa, olora, corda, loftq, lora_ga, ...) also rewrite the base
# weight when PEFT builds the adapter, which hqqlora does not reproduce.
_ADAPTER_ONLY_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Fields that only steer which modules PEFT adapts (the file's tensors say which it did)
# or that only PEFT's training-time initialization reads, and metadata: type-checked.
_STR_OR_NONE = ("task_type", "peft_version", "base_model_name_or_path", "revision", "megatron_core")
_DICT_OR_NONE = (
    "auto_mapping",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
)
_KNOWN = {
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "inference_mode",
    "qalora_group_size",
    *_UNSUPPORTED,
    *_STR_OR_NONE,
    *_DICT_OR_NONE,
}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _refuse(field: str, expected: str, got: object, where: str = "") -> ValueError:
    return ValueError(f"Expected `{field}`{where} to be {expected}, got {got!r}.")


def _check_rank(value: object, field: str, where: str = "") -> int:
    if not _is_int(value) or value <= 0:
        raise _refuse(field, "a positive int", value, where)
    return value


def _check_alpha(value: object, field: str, where: str = "") -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise _refuse(field, "a finite number > 0", value, where)
    return value


def _check_dropout(value: object, where: str = "") -> float:
    if not _is_real(value) or not 0 <= value < 1:
        raise _refuse("lora_dropout", "a number in [0, 1)", value, where)
    return value


def _check_bool(value: object, field: str, where: str = "") -> bool:
    if not isinstance(value, bool):
        raise _refuse(field, "a JSON boolean (true or false)", value, where)
    return value


def save_adapter(
    path: str | os.PathLike[str],
    adapters: Mapping[str, Mapping[str, Tensor]],
    *,
    r: int,
    lora_alpha: float,
    target_modules: str | Sequence[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    base_model_name_or_path: str | None = None,
    lora_dropout: float = 0.0,
    task_type: str | None = None,
) -> Path:
    """Writes ``adapters`` to the folder ``path`` in PEFT's format, atomically.

    The result loads with ``peft.PeftModel.from_pretrained(model, path)`` and with
    :func:`load_adapter`. ``r`` and ``lora_alpha`` are the config's defaults; a
    module whose rank differs from ``r``, or whose ``scaling`` differs from
    ``lora_scaling(rank, lora_alpha, use_rslora)``, gets an exact entry in
    ``rank_pattern`` / ``alpha_pattern`` (key ``"^" + re.escape(path)``, alpha
    recovered as ``scaling·rank``, or ``scaling·√rank`` with rslora), so PEFT
    rebuilds every adapter as it is.

    On a model sharded by FSDP2 (adapters from :func:`~hqqlora.get_adapter` are
    then ``DTensor`` shards), this is a collective: call it on every rank. Each
    rank gathers the whole tensors, rank 0 alone writes the folder, and every rank
    returns once it is in place (or raises if rank 0's write failed), so one
    adapter is written, not one per rank.

    The pair of files is replaced as one: they are written and ``fsync``-ed in a
    fresh hidden sibling folder ``.<name>.hqqlora-<hex>``, which is then swapped
    with ``path`` by ``renameat2(RENAME_EXCHANGE)`` (see :mod:`hqqlora._atomic`). A
    save interrupted at any point, even by ``SIGKILL``, leaves the old adapter or
    the new one, whole; a hidden sibling it may leave is removed by the next save.
    Other files in the folder are carried over (as hard links). This needs write
    access to the parent folder; ``path`` may not be the working directory.

    Args:
        path: the folder (created if missing).
        adapters: module path → adapter dict, each of rank >= 1 with a finite
            ``scaling`` > 0 (PEFT stores it as an alpha).
        r: default rank in the config, a positive int.
        lora_alpha: default alpha in the config, a finite number > 0.
        target_modules: PEFT's ``target_modules``; by default the adapters' paths.
            Every adapter path must match it.
        use_rslora: scaling is ``lora_alpha / sqrt(r)``.
        use_dora: the adapters are DoRA adapters (all of them have ``magnitude``).
        base_model_name_or_path, task_type: strings (or ``None``) for the config.
        lora_dropout: a number in [0, 1), written to the config.

    Returns:
        The folder's ``Path``.

    Raises:
        ValueError: empty adapters, a config value out of range, an adapter of
            rank 0 or with a scaling PEFT cannot store, adapters without
            ``magnitude`` when ``use_dora`` (or with it when not), or paths
            ``target_modules`` misses. Nothing is written then.
        TypeError: ``adapters`` is not a dict of adapter dicts.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise (TypeError if not isinstance(adapters, Mapping) else ValueError)(
            f"Expected `adapters` to be a non-empty dict of module path -> adapter dict, got {adapters!r}."
        )
    adapters, sharded = full_tensors(adapters)  # every rank gathers FSDP2's shards
    _check_rank(r, "r")
    _check_alpha(lora_alpha, "lora_alpha")
    _check_dropout(lora_dropout)
    _check_bool(use_rslora, "use_rslora")
    _check_bool(use_dora, "use_dora")
    for field, value in (
        ("base_model_name_or_path", base_model_name_or_path),
        ("task_type", task_type),
    ):
        if value is not None and not isinstance(value, str):
            raise _refuse(field, "a str or None", value)
    for name, params in adapters.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Expected module paths to be non-empty strings, got {name!r}.")
        check_params(params, name=f"adapters[{name!r}]")
        scaling = float(params["scaling"])
        if not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(
                f"Expected `adapters[{name!r}]['scaling']` finite and > 0 (PEFT stores it as "
                f"lora_alpha), got {scaling}; fold a sign or zero into lora_B instead."
            )
    dora = sorted(p for p, a in adapters.items() if "magnitude" in a)
    if use_dora and len(dora) != len(adapters):
        missing = sorted(set(adapters) - set(dora))
        raise ValueError(
            f"Expected `magnitude` in every adapter with use_dora=True, got none in {missing}."
        )
    if not use_dora and dora:
        raise ValueError(f"Expected no `magnitude` with use_dora=False, got one in {dora}.")
    targets = sorted(adapters) if target_modules is None else _check_targets(target_modules)
    missed = sorted(p for p in adapters if not _matches(p, targets))
    if missed:
        raise ValueError(
            f"Expected `target_modules` to match every adapter path, got {targets!r}, missing {missed}."
        )

    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for name, params in sorted(adapters.items()):
        rank = int(params["lora_A"].shape[0])
        scaling = float(params["scaling"])
        alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
        if rank != r:
            rank_pattern[_pattern_key(name)] = rank
        if not math.isclose(alpha, lora_alpha, rel_tol=1e-6, abs_tol=1e-9):
            alpha_pattern[_pattern_key(name)] = _check_alpha(alpha, f"alpha of {name!r}")
        for suffix, leaf in (
            (".lora_A.weight", "lora_A"),
            (".lora_B.weight", "lora_B"),
            (".lora_magnitude_vector", "magnitude"),
        ):
            if leaf in params:
                tensors[PREFIX + name + suffix] = (
                    params[leaf].detach().to("cpu").contiguous().clone()
                )

    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": targets,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(folder / CONFIG_NAME, "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True, allow_nan=False)

    def replace() -> None:
        replace_folder(Path(path), write, carry=lambda name: not _OLD_TEMPORARY.fullmatch(name))

    if sharded:
        write_on_rank0(replace, "save_adapter")
    else:
        replace()
    return Path(path)


def _pattern_key(path: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", path); the
    # anchor makes the key match this exact path and no longer one ending in it.
    return "^" + re.escape(path)


class _Settings(NamedTuple):
    """What a checked config says about building each adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, tuple[Callable[[str], bool], int]]
    alpha_pattern: dict[str, tuple[Callable[[str], bool], float]]


def _check_config(config: object, where: str) -> _Settings:
    """Checks every field of a PEFT LoRA config; ``where`` names the file in messages."""
    where = f" in {where}"
    if not isinstance(config, dict):
        raise ValueError(f"Expected a JSON object{where}, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"Expected a LoRA adapter config (peft_type 'LORA'){where}, got {config.get('peft_type')!r}."
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"Expected `{key}`{where}, got keys {sorted(config)}.")
    r = _check_rank(config["r"], "r", where)
    lora_alpha = _check_alpha(config["lora_alpha"], "lora_alpha", where)
    _check_dropout(config.get("lora_dropout", 0.0), where)
    flags = {
        f: _check_bool(config.get(f, False), f, where)
        for f in ("use_rslora", "use_dora", "inference_mode")
    }
    for field, default in _UNSUPPORTED.items():
        value = config.get(field, default)
        if field in ("fan_in_fan_out", "lora_bias", "use_qalora", "ensure_weight_tying"):
            _check_bool(value, field, where)
        if value != default and not (default is None and value == []):
            raise ValueError(
                f"Expected `{field}`{where} to be {json.dumps(default)} (hqqlora cannot honour it), "
                f"got {value!r}."
            )
    init = config.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _ADAPTER_ONLY_INITS):
        raise _refuse(
            "init_lora_weights",
            "true, false, 'gaussian', 'eva' or 'orthogonal' (inits that rewrite the base "
            "weight cannot be reproduced)",
            init,
            where,
        )
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not _is_str_list(targets):
        raise _refuse("target_modules", "a str, a list of str or null", targets, where)
    for field in ("exclude_modules", "layers_pattern"):
        value = config.get(field)
        if value is not None and not isinstance(value, str) and not _is_str_list(value):
            raise _refuse(field, "a str, a list of str or null", value, where)
    layers = config.get("layers_to_transform")
    if not (
        layers is None
        or _is_int(layers)
        or (isinstance(layers, list) and all(map(_is_int, layers)))
    ):
        raise _refuse("layers_to_transform", "an int, a list of int or null", layers, where)
    if not _is_int(config.get("qalora_group_size", 16)):
        raise _refuse("qalora_group_size", "an int", config["qalora_group_size"], where)
    for field in _STR_OR_NONE:
        if not isinstance(config.get(field), (str, type(None))):
            raise _refuse(field, "a str or null", config[field], where)
    for field in _DICT_OR_NONE:
        if not isinstance(config.get(field), (dict, type(None))):
            raise _refuse(field, "an object or null", config[field], where)
    for field in sorted(set(config) - _KNOWN):
        # A field of a newer PEFT: a switch turned on (true, a non-empty object or
        # list) may change what PEFT builds; a number or string alone does not.
        value = config[field]
        if value is True or (isinstance(value, (dict, list)) and value):
            raise ValueError(
                f"Expected the unknown field `{field}`{where} to be off (null, false or empty), "
                f"got {value!r}; hqqlora does not know what it changes."
            )
    return _Settings(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=flags["use_rslora"],
        use_dora=flags["use_dora"],
        rank_pattern=_check_pattern(config, "rank_pattern", _check_rank, where),
        alpha_pattern=_check_pattern(config, "alpha_pattern", _check_alpha, where),
    )


def _check_pattern(
    config: Mapping[str, Any], field: str, check: Callable[..., Any], where: str
) -> dict[str, tuple[Callable[[str], bool], Any]]:
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise _refuse(field, "an object of pattern -> value", pattern, where)
    return {
        key: (compile_pattern(key, field=field), check(value, f"{field}[{key!r}]", where))
        for key, value in pattern.items()
    }


def _read_config(folder: Path) -> tuple[dict[str, Any], _Settings]:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"Expected valid JSON in {folder / CONFIG_NAME}, got an error: {e}."
        ) from e
    return config, _check_config(config, str(folder / CONFIG_NAME))


def _group_tensors(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        suffix = next((s for s in _KEYS if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX) or len(key) == len(PREFIX) + len(suffix):
            unknown.append(key)
            continue
        leaves = grouped.setdefault(key[len(PREFIX) : -len(suffix)], {})
        if _KEYS[suffix] in leaves:
            raise ValueError(f"Expected one tensor per leaf, got two for {key!r}.")
        leaves[_KEYS[suffix]] = value
    if unknown:
        raise ValueError(
            f"Expected only `{PREFIX}<path>.lora_A.weight`, `.lora_B.weight` and "
            f"`.lora_magnitude_vector` tensors, got unsupported {sorted(unknown)[:6]}."
        )
    return grouped


def _check_fits(adapters: Mapping[str, Mapping[str, Tensor]], model: nn.Module) -> None:
    layers = hqq_layers(model)
    missing = sorted(p for p in adapters if p not in layers)
    if missing:
        raise ValueError(
            f"Expected adapter paths among the HQQ layers of `model`, got unknown {missing}."
        )
    for name, params in adapters.items():
        out_features, in_features = (int(s) for s in layers[name].meta["shape"])
        check_params(
            params, in_features=in_features, out_features=out_features, name=f"adapters[{name!r}]"
        )


def load_adapter(
    path: str | os.PathLike[str], *, model: nn.Module | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Reads a PEFT-format LoRA/DoRA adapter folder (PEFT's ``save_pretrained`` output too).

    Reads ``adapter_model.safetensors`` only: a pickled ``adapter_model.bin`` /
    ``.pt`` / ``.pth`` is never opened (ignored beside a safetensors file, refused
    alone). Each adapter's ``scaling`` is rebuilt as PEFT does, ``alpha / r``
    (``alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and ``alpha`` from the
    first ``rank_pattern`` / ``alpha_pattern`` key matching the module path
    (PEFT's ``re.match(rf"(.*\\.)?({key})$", path)``, in bounded time).

    Every config field is checked first: ``r`` a positive int, ``lora_alpha`` a
    finite number > 0, ``use_rslora``/``use_dora`` JSON booleans, pattern values
    like them, ``lora_dropout`` in [0, 1), ``target_modules`` a str, a list of str
    or null; fields that would change what PEFT builds and that hqqlora cannot
    honour (``modules_to_save``, ``layer_replication``, ``fan_in_fan_out``,
    ``bias``, ``init_lora_weights="pissa"``, ...) must hold PEFT's default.

    Args:
        path: the adapter folder.
        model: if given, every adapter must fit an HQQ layer of ``model`` at its path.

    Returns:
        ``(adapters, config)``: module path → adapter dict (``scaling`` float32),
        and the config as read.

    Raises:
        FileNotFoundError: the folder, its config or its safetensors file is missing.
        ValueError: only a pickle file, a config field of the wrong type or out of
            range (the message names it), a pattern key that cannot be matched in
            bounded time, an unsupported tensor, ranks that disagree with the
            config, or shapes that do not fit ``model``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Expected an adapter folder, got {str(folder)!r}, which is not a directory."
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).is_file()]
        if pickles:
            raise ValueError(
                f"Expected {WEIGHTS_NAME} in {str(folder)!r}, got only the pickle file {pickles[0]}: "
                "hqqlora refuses to unpickle (it can run arbitrary code); convert it to safetensors "
                "with a tool you trust."
            )
        raise FileNotFoundError(f"Expected {WEIGHTS_NAME} in {str(folder)!r}, got no such file.")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"Expected {CONFIG_NAME} in {str(folder)!r}, got no such file.")
    config, settings = _read_config(folder)
    try:
        tensors = load_file(str(weights))
    except OSError:
        raise
    except Exception as e:  # safetensors' own error type for a malformed file
        raise ValueError(f"Expected a valid safetensors file at {weights}, got: {e}.") from e
    grouped = _group_tensors(tensors)
    if not grouped:
        raise ValueError(f"Expected adapter tensors in {weights}, got none.")
    adapters = {}
    for name, leaves in sorted(grouped.items()):
        expected = {"lora_A", "lora_B"} | ({"magnitude"} if settings.use_dora else set())
        if set(leaves) != expected:
            raise ValueError(
                f"Expected tensors {sorted(expected)} for {name!r} (use_dora={settings.use_dora}), "
                f"got {sorted(leaves)}."
            )
        rank = pattern_value(settings.rank_pattern, name, settings.r)
        if leaves["lora_A"].ndim != 2 or leaves["lora_A"].shape[0] != rank:
            raise ValueError(
                f"Expected rank {rank} for {name!r} from the config, got lora_A of shape "
                f"{tuple(leaves['lora_A'].shape)}."
            )
        alpha = pattern_value(settings.alpha_pattern, name, settings.lora_alpha)
        params = {
            **leaves,
            "scaling": torch.tensor(
                lora_scaling(rank, alpha, settings.use_rslora), dtype=torch.float32
            ),
        }
        adapters[name] = dict(check_params(params, name=f"adapter {name!r}"))
    if model is not None:
        _check_fits(adapters, model)
    return adapters, config
