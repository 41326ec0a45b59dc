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
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hqqlora._model import _check_targets, _matches, hqq_layers
from hqqlora._params import check_params, lora_scaling

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


def _write_atomically(target: Path, write: Callable[[str], None]) -> None:
    # A temporary file in the same folder, then os.replace: the target is either
    # the old file or the complete new one, never half written.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pattern_key(path: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", path); the
    # anchor makes the key match this exact path and no longer one ending in it.
    return "^" + re.escape(path)


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's lookup: the first key of ``pattern`` matching ``path`` (or a ``.``-suffix)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def save_adapter(
    path: str | os.PathLike,
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
    """Writes ``adapters`` to the folder ``path`` in PEFT's format.

    The result loads with ``peft.PeftModel.from_pretrained(model, path)`` and with
    :func:`load_adapter`. ``r`` and ``lora_alpha`` are the config's defaults; a
    module whose rank differs from ``r``, or whose ``scaling`` differs from
    ``lora_scaling(rank, lora_alpha, use_rslora)``, gets an exact entry in
    ``rank_pattern`` / ``alpha_pattern`` (alpha recovered as ``scaling·rank``, or
    ``scaling·√rank`` with rslora), so PEFT rebuilds every adapter as it is.

    Each file is written to a temporary file in the same folder and renamed
    (``os.replace``), the config last: an interrupted save never leaves a
    half-written file.

    Args:
        path: the folder (created if missing).
        adapters: module path → adapter dict.
        r: default rank in the config.
        lora_alpha: default alpha in the config.
        target_modules: PEFT's ``target_modules``; by default the adapters' paths.
            Every adapter path must match it.
        use_rslora: scaling is ``lora_alpha / sqrt(r)``.
        use_dora: the adapters are DoRA adapters (all of them have ``magnitude``).
        base_model_name_or_path, lora_dropout, task_type: written to the config.

    Returns:
        The folder's ``Path``.

    Raises:
        ValueError: empty adapters, adapters without ``magnitude`` when
            ``use_dora`` (or with it when not), or paths ``target_modules`` misses.
        TypeError: ``adapters`` is not a dict of adapter dicts.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise (TypeError if not isinstance(adapters, Mapping) else ValueError)(
            f"Expected `adapters` to be a non-empty dict of module path -> adapter dict, got {adapters!r}."
        )
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"Expected `r` to be a positive int, got {r!r}.")
    for name, params in adapters.items():
        check_params(params, name=f"adapters[{name!r}]")
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
            alpha_pattern[_pattern_key(name)] = alpha
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
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(
        folder / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"})
    )

    def write_config(f: str) -> None:
        with open(f, "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)

    _write_atomically(folder / CONFIG_NAME, write_config)
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"Expected valid JSON in {folder / CONFIG_NAME}, got an error: {e}."
        ) from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"Expected a LoRA adapter config (peft_type 'LORA'), got {got!r}.")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(
                f"Expected `{key}` in {folder / CONFIG_NAME}, got keys {sorted(config)}."
            )
    for key in ("fan_in_fan_out", "lora_bias"):
        if config.get(key):
            raise ValueError(
                f"Expected `{key}` false in {folder / CONFIG_NAME}, got true (unsupported)."
            )
    return config


def _group_tensors(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        suffix = next((s for s in _KEYS if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            unknown.append(key)
            continue
        grouped.setdefault(key[len(PREFIX) : -len(suffix)], {})[_KEYS[suffix]] = value
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
    path: str | os.PathLike, *, model: nn.Module | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Reads a PEFT-format LoRA/DoRA adapter folder (PEFT's ``save_pretrained`` output too).

    Reads ``adapter_model.safetensors`` only: a folder holding a pickled
    ``adapter_model.bin`` is refused, never unpickled. Each adapter's ``scaling`` is
    rebuilt as PEFT does, ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``),
    with ``rank_pattern`` / ``alpha_pattern`` overrides.

    Args:
        path: the adapter folder.
        model: if given, every adapter must fit an HQQ layer of ``model`` at its path.

    Returns:
        ``(adapters, config)``: module path → adapter dict (``scaling`` float32),
        and the config as a dict.

    Raises:
        FileNotFoundError: the folder, its config or its safetensors file is missing.
        ValueError: only a pickle file, an unsupported config or tensor, ranks that
            disagree with the config, or shapes that do not fit ``model``.
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
    config = _read_config(folder)
    grouped = _group_tensors(load_file(str(weights)))
    if not grouped:
        raise ValueError(f"Expected adapter tensors in {weights}, got none.")
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    adapters = {}
    for name, leaves in sorted(grouped.items()):
        expected = {"lora_A", "lora_B"} | ({"magnitude"} if use_dora else set())
        if set(leaves) != expected:
            raise ValueError(
                f"Expected tensors {sorted(expected)} for {name!r} (use_dora={use_dora}), got {sorted(leaves)}."
            )
        rank = _pattern_value(rank_pattern, name, config["r"])
        if leaves["lora_A"].shape[0] != rank:
            raise ValueError(
                f"Expected rank {rank} for {name!r} from the config, got lora_A of shape "
                f"{tuple(leaves['lora_A'].shape)}."
            )
        alpha = _pattern_value(alpha_pattern, name, config["lora_alpha"])
        params = {
            **leaves,
            "scaling": torch.tensor(lora_scaling(rank, alpha, use_rslora), dtype=torch.float32),
        }
        adapters[name] = dict(check_params(params, name=f"adapter {name!r}"))
    if model is not None:
        _check_fits(adapters, model)
    return adapters, config
