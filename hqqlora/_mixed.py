"""Mixed-adapter batches: each row of a batch gets its own adapter, in one pass.

The adapters are stacked into an :class:`AdapterBank` (ranks padded with zeros to
the largest one: zero rows of ``A`` and zero columns of ``B`` add nothing), each
row gathers its adapter through an index tensor, and two batched matmuls compute
every row's term at once::

    term[i] = scaling[k] · x[i] @ A[k]ᵀ @ B[k]ᵀ          with k = index[i]

so the number of kernels does not depend on the number of adapters. Rows with
index ``-1`` (``"__base__"``) get no adapter term. A DoRA row with
``c = magnitude[k] / n[k]`` gets ``c ⊙ (base(x[i]) - bias + term[i]) + bias``.

The gather copies ``r·(in + out)`` adapter values per row. In plain eager mode on the
CPU, when that costs more than a few small kernels per adapter (few adapters for many
rows, or wide layers), the rows are instead sorted by adapter and each adapter's run of
rows goes through :func:`~hqqlora.apply_lora`'s own term, reading the adapter where it
lies (Punica's segments, as a loop); PEFT loops the same way. Under ``torch.compile``
and ``torch.func`` transforms, and on accelerators, the batched form always runs: the
loop needs the index on the host and has data-dependent shapes.

Rows never read another row's adapter: a ``"__base__"`` row selects zeros, not the
tensors of some other adapter multiplied by 0 (``0 · NaN`` is NaN), so a NaN or inf in
one adapter stays in the rows that use it, in the forward and in gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from hqqlora import _decode, _prefill
from hqqlora._bank import (
    BASE,
    AdapterBank,
    _check_bank,
    _check_base_fits,
    _check_norm_dict,
    _check_stackable,
    _dora_needs_base,
    _unknown_name,
    bank_weight_norm,
    stack_adapters,
)
from hqqlora._base import (
    HQQLinear,
    _eager,
    base_forward,
    check_hqq_layer,
    quant_layout,
    quant_tensors,
)
from hqqlora._dora import add_dora_term
from hqqlora._lora import add_lora_term
from hqqlora._params import check_norm_values, check_params

__all__ = ["mixed_batch", "mixed_batch_indexed"]


def _check_index(index: object, rows: int, size: int, device: torch.device) -> Tensor:
    # int32/int64 only: uint8 cannot hold -1 (and indexes as a mask), int8/int16 do not index.
    if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64):
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(
            f"Expected `index` to be an integer tensor of dtype torch.int32 or torch.int64, got {got}."
        )
    if index.shape != (rows,):
        raise ValueError(
            f"Expected `index` of shape ({rows},), one entry per row of x, got {tuple(index.shape)}."
        )
    if index.device != device:
        raise ValueError(f"Expected `index` on the adapters' device {device}, got {index.device}.")
    # Checking values needs the data on the host: only when that costs no device sync.
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and rows:
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= size:
            raise ValueError(
                f"Expected `index` values in [-1, {size}), got values in [{low}, {high}]."
            )
    return index


def _check_x(x: object, in_features: int | None, device: torch.device | None) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"Expected `x` to be a floating-point tensor, got {got}.")
    if x.ndim < 2 or (in_features is not None and x.shape[-1] != in_features):
        raise ValueError(
            f"Expected `x` of shape (batch, ..., {in_features or 'in'}), got {tuple(x.shape)}."
        )
    if x.device.type == "meta":
        raise ValueError("Expected `x` to hold data, got a tensor on the meta device.")
    if device is not None and x.device != device:
        raise ValueError(f"Expected `x` on the adapters' device {device}, got {x.device}.")
    return x


def _rows(t: Tensor) -> Tensor:
    """``(batch, ..., d)`` as ``(batch, L, d)``, without ``-1`` (which a 0-row batch cannot infer)."""
    return t.unsqueeze(1) if t.ndim == 2 else t.flatten(1, -2)


# The cost model of _loop_pays, in "adapter values the batched form copies" (about 1 ns
# each): the loop costs about 12 µs per adapter, the batched form 25 µs more than the
# loop's own fixed cost. Fitted on one thread of this project's 2-core x86 CPU, layers of
# 64 to 1024 features, r=16 (benchmarks/bench_mixed.py --loop-grid times both forms).
_LOOP_COST_PER_ADAPTER = 13_000
_BATCHED_FIXED_COST = 28_000


def _loop_allowed(x: Tensor) -> bool:
    """Whether the per-adapter loop may run: plain eager mode on the CPU, no autocast.

    The loop reads the index on the host (free on the CPU, a sync elsewhere) and has
    data-dependent shapes, which ``torch.compile`` and ``vmap`` cannot trace.
    """
    return (
        _eager()
        and x.device.type == "cpu"
        and x.shape[0] > 0
        and not torch.is_autocast_enabled("cpu")
    )


def _loop_pays(rows: int, used: int, rank: int, in_features: int, out_features: int) -> bool:
    """Whether looping over the ``used`` adapters costs less than the batched form.

    The batched form copies every row's adapter, ``rank · (in + out)`` values per row,
    on top of a fixed cost; the loop reads each adapter where it lies but launches a
    few small kernels per adapter. Both cost the same arithmetic. Few adapters for
    many rows, or wide layers: the loop; many adapters of few rows each on a narrow
    layer: the batched form.
    """
    copied = rows * rank * (in_features + out_features)
    return used * _LOOP_COST_PER_ADAPTER <= copied + _BATCHED_FIXED_COST


def _rows_by_slot(slots: Sequence[int]) -> dict[int, list[int]]:
    """Slot → the rows that use it, in order of first use (``-1``: no slot).

    Plain Python on the host values: on the CPU right after a large matmul every
    PyTorch call is slow (its dispatch code is out of the caches), a loop over a few
    hundred ints is not.
    """
    rows_of: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot >= 0:
            rows_of.setdefault(slot, []).append(row)
    return rows_of


def _row_order(runs: Sequence[list[int]], batch: int) -> Tensor | None:
    """The rows of ``runs`` one run after the other, or ``None`` if that is every row in order."""
    if len(runs) == 1 and len(runs[0]) == batch:
        return None
    return torch.tensor([row for rows in runs for row in rows], dtype=torch.int64)


def _loop_forward(
    x: Tensor,
    base: HQQLinear | None,
    order: Tensor | None,
    runs: Sequence[tuple[Mapping[str, Tensor], Tensor | None, int]],
    dtype: torch.dtype,
    out_features: int,
) -> Tensor:
    """The mixed batch as one :func:`apply_lora` per adapter on its own rows.

    ``x.index_select(0, order)`` sorts the rows by adapter (``order`` is ``None`` when
    one adapter has every row, in order); ``runs`` are the ``(adapter, weight_norm,
    number of rows)`` of the sorted runs, in order. Each run gets its adapter's term,
    read where the adapter lies (no per-row copy of any adapter), with the maths and
    roundings of :func:`apply_lora` on those rows alone. The runs are then put back in
    place; rows in no run (``"__base__"``) keep the base output, or a zero term
    without ``base``. Eager only (see :func:`_loop_allowed`).
    """
    x_a = x.to(dtype)
    xs = x_a if order is None else x_a.index_select(0, order)
    counts = [count for _, _, count in runs]
    if base is None or not any("magnitude" in p for p, _, _ in runs):
        result = None if base is None else base_forward(base, x)
        if order is None and result is not None:
            ((p, _, _),) = runs
            return add_lora_term(p, xs, result).to(result.dtype)
        terms = [
            F.linear(F.linear(xk, p["lora_A"]) * p["scaling"], p["lora_B"])
            for (p, _, _), xk in zip(runs, torch.split(xs, counts), strict=True)
        ]
        term = terms[0] if len(terms) == 1 else torch.cat(terms)
        if result is None:
            if order is None:
                return term
            return term.new_zeros((*x.shape[:-1], out_features)).index_copy(0, order, term)
        # Added in the promoted dtype, then rounded once: as apply_lora's `result + term`.
        out = result.to(torch.promote_types(result.dtype, term.dtype), copy=True)
        return out.index_add_(0, cast(Tensor, order), term.to(out.dtype)).to(result.dtype)
    # DoRA rescales each row's whole output: each run goes through apply_lora's own
    # term functions on its rows of the base output.
    result = base_forward(base, x)
    rs = result if order is None else result.index_select(0, order)
    pieces = []
    for (p, norm, _), xk, rk in zip(
        runs, torch.split(xs, counts), torch.split(rs, counts), strict=True
    ):
        if "magnitude" in p:
            y = add_dora_term(base, p, xk, rk, norm, dropped=False)
        else:
            y = add_lora_term(p, xk, rk)
        pieces.append(y.to(result.dtype))
    y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return y if order is None else result.index_copy(0, order, y)


def mixed_batch_indexed(
    x: Tensor,
    bank: AdapterBank,
    index: Tensor,
    /,
    *,
    base: HQQLinear | None = None,
    weight_norm: Tensor | Mapping[str, Tensor] | None = None,
    exact: bool = False,
) -> Tensor:
    """Row ``i`` of ``x`` through adapter ``index[i]`` of ``bank`` (``-1``: none).

    With ``k = index[i]``, ``term[i] = scaling[k] · x[i] @ A[k]ᵀ @ B[k]ᵀ``, for all
    rows at once by gathering and batched matmuls (in eager mode on the CPU, by a loop
    over the adapters in the batch when that is cheaper; same result up to rounding).
    With ``base``, the layer output::

        y[i] = base(x[i]) + term[i]                                  (LoRA, or k = -1)
        y[i] = c ⊙ (base(x[i]) - bias + term[i]) + bias,  c = magnitude[k] / n[k]   (DoRA)

    and without ``base`` only ``term`` (LoRA banks only). A row with index ``-1``
    selects zeros instead of reading any adapter, so a broken (NaN, inf) adapter only
    affects its own rows.

    Under ``torch.compile`` nothing here syncs with the host when ``weight_norm`` is
    given (or the bank has no DoRA entry), so the call compiles into a serving loop
    (``fullgraph=True``). Eager calls check the values they can: ``index`` values on
    the CPU, and ``weight_norm``'s DoRA rows (positive, finite) also on an
    accelerator, at the cost of one host sync; to skip it in a hot loop, compile.

    Dtypes follow :func:`apply_lora`: the term is computed in the bank's dtype (in
    float32 on the CUDA kernel paths below, whatever the bank's dtype), the layer
    output comes back in the base output's dtype.

    Decode with ``base`` (at most 64 tokens in all on CUDA, ``x`` in the layer's
    bf16/fp16 compute dtype, no gradient wanted), eager or compiled, unless
    ``exact``: two Triton kernels (BGMV-style) read the packed codes once and each
    distinct adapter of the batch once (rows that share one hit the cache; nothing
    is gathered per row), with :func:`apply_lora`'s decode precision. There an index
    value outside ``[-1, n)`` on the GPU (not checked without a host sync) gives NaN
    rows, where the dense path stops on a device-side assert. Above 64 tokens (prefill),
    or for a layout the decode kernels do not read, under the same conditions, HQQ's
    base output and then two Triton kernels (SGMV-style shrink and expand) add each
    row's term, read from the bank where it lies, with float32-grade products (TF32x3
    tensor cores) and float32 sums, rounded once to the output dtype; index values
    outside ``[-1, n)`` give NaN rows there too.

    Args:
        x: input of shape ``(batch, ..., in)``.
        bank: from :func:`stack_adapters`.
        index: ``torch.int32`` or ``torch.int64`` tensor of shape ``(batch,)`` on the
            bank's device, values in ``[-1, n)`` (``-1``: no adapter). Narrower
            integer dtypes are refused: ``uint8`` cannot hold ``-1``.
        base: the quantized layer.
        weight_norm: DoRA's ``n`` as a ``(n, out)`` tensor (from
            :func:`bank_weight_norm`; LoRA rows are ignored) or a dict name → ``(out,)``;
            computed from ``base`` when missing.
        exact: compute the base term with HQQ's bits (dense weight) on every path.

    Returns:
        ``(batch, ..., out)``: the layer output in the base output dtype with
        ``base``, else the adapter term in the bank's dtype.

    Raises:
        ValueError: shapes that do not fit, index values out of range (checked for
            CPU indices), DoRA entries without ``base``, tensors on different devices
            or on the meta device, or a ``weight_norm`` whose DoRA rows are not
            positive and finite (checked in eager mode).
        TypeError: ``x`` not floating point, ``index`` not int32/int64.
    """
    _check_bank(bank)
    n_adapters, _, in_features = bank.lora_A.shape
    out_features = bank.lora_B.shape[1]
    device = bank.lora_A.device
    _check_x(x, in_features, device)
    rows = x.shape[0]
    _check_index(index, rows, n_adapters, device)
    if base is None and any(bank.dora):
        raise _dora_needs_base([n for n, d in zip(bank.names, bank.dora, strict=True) if d])
    if base is not None:
        _check_base_fits(base, bank)
    if base is not None and any(bank.dora):
        if weight_norm is None or isinstance(weight_norm, Mapping):
            weight_norm = bank_weight_norm(base, bank, weight_norm)
        elif not isinstance(weight_norm, Tensor) or weight_norm.shape != bank.magnitude.shape:
            got = (
                tuple(weight_norm.shape)
                if isinstance(weight_norm, Tensor)
                else type(weight_norm).__name__
            )
            raise ValueError(
                f"Expected `weight_norm` of shape {tuple(bank.magnitude.shape)} or a dict, got {got}."
            )
        elif weight_norm.device != device and weight_norm.device.type != "meta":
            raise ValueError(
                f"Expected `weight_norm` on the adapters' device {device}, got {weight_norm.device}."
            )
        else:
            dora_rows = [k for k, d in enumerate(bank.dora) if d]
            check_norm_values(weight_norm, "weight_norm (its DoRA rows)", rows=dora_rows)
    elif weight_norm is not None:
        raise ValueError("Expected no `weight_norm` for a bank without DoRA adapters, got one.")

    if base is not None and not exact:
        fused = _decode_mixed(x, bank, index, base, weight_norm)
        if fused is None:
            norm = cast(Tensor, weight_norm) if any(bank.dora) else None  # checked above
            fused = _prefill.mixed_prefill(x, bank, index, base, norm)
        if fused is not None:
            return fused
    rows_of = _rows_by_slot(index.tolist()) if _loop_allowed(x) else None
    rank = bank.lora_A.shape[1]
    if rows_of and _loop_pays(rows, len(rows_of), rank, in_features, out_features):
        norms = cast(Tensor, weight_norm) if any(bank.dora) and base is not None else None
        runs = []
        for k, rows_k in rows_of.items():
            p = {"lora_A": bank.lora_A[k], "lora_B": bank.lora_B[k], "scaling": bank.scaling[k]}
            if bank.dora[k]:
                p["magnitude"] = bank.magnitude[k]
            runs.append((p, None if norms is None else norms[k], len(rows_k)))
        order = _row_order(list(rows_of.values()), rows)
        return _loop_forward(x, base, order, runs, bank.lora_A.dtype, out_features)

    autocast = torch.is_autocast_enabled(x.device.type)
    x_a = x if autocast else x.to(bank.lora_A.dtype)
    x3 = _rows(x_a)  # (batch, L, in)
    valid = index >= 0
    safe = torch.where(valid, index, torch.zeros_like(index))
    # "__base__" rows gather slot 0 (any valid slot) and then select zeros: selection, not
    # a multiplication by 0, since 0 · NaN = NaN would let slot 0's adapter into their
    # output and, through B, into their gradient w.r.t. x.
    row = valid[:, None, None]
    A = torch.where(row, bank.lora_A[safe], 0)  # (batch, r_max, in)
    B = torch.where(row, bank.lora_B[safe], 0)  # (batch, out, r_max)
    row_scaling = torch.where(valid, bank.scaling[safe], 0)
    h = torch.bmm(x3, A.transpose(1, 2))
    # Multiply then cast back, as a 0-d scaling does.
    h = (h * row_scaling[:, None, None]).to(h.dtype)
    term = torch.bmm(h, B.transpose(1, 2))  # (batch, L, out)
    out_shape = (*x.shape[:-1], out_features)
    if base is None:
        return term.reshape(out_shape)

    result = base_forward(base, x, exact=exact)
    out_dtype = result.dtype
    result3 = _rows(result)
    lora_out = (result3 + term).to(out_dtype)
    if not any(bank.dora):
        return lora_out.reshape(out_shape)
    use_dora = bank.is_dora[safe] & valid  # (batch,)
    # c = 1 on LoRA and "__base__" rows, selected (not computed from another slot), so
    # that their gradients never see another adapter's magnitude or norm either.
    c = bank.magnitude[safe] / cast(Tensor, weight_norm).detach()[safe]  # set above for DoRA
    c = torch.where(use_dora[:, None], c, 1)[:, None, :]  # (batch, 1, out)
    base_term = result3.to(term.dtype)
    bias = base.bias
    if bias is None:
        dora_out = c * (base_term + term)
    else:
        bias = bias.to(term.dtype)
        dora_out = torch.addcmul(bias, base_term - bias + term, c)
    return torch.where(use_dora[:, None, None], dora_out.to(out_dtype), lora_out).reshape(out_shape)


def _decode_mixed(
    x: Tensor, bank: AdapterBank, index: Tensor, base: HQQLinear, weight_norm: object
) -> Tensor | None:
    """The whole layer through the decode kernels, or ``None`` if they don't apply."""
    layout = quant_layout(base)
    dora = any(bank.dora)
    held = (bank.lora_A, bank.lora_B, bank.scaling, bank.magnitude, bank.is_dora, base.bias)
    norm = cast(Tensor, weight_norm) if dora else None  # a tensor once checked
    if not _decode.eligible(x, base.W_q, layout, _decode.MAX_ROWS, *held, norm):
        return None
    per_token = index
    tokens = x[0].numel() // layout.in_features if x.shape[0] else 1
    if tokens > 1:
        per_token = per_token.repeat_interleave(tokens)
    W_q, scale, zero = quant_tensors(base)
    return _decode.lora_decode(
        x, W_q, scale, zero, layout,
        lora_A=bank.lora_A, lora_B=bank.lora_B, scaling=bank.scaling, index=per_token,
        magnitude=bank.magnitude if dora else None, weight_norm=norm,
        is_dora=bank.is_dora if dora else None, bias=base.bias,
    )  # fmt: skip


def mixed_batch(
    x: Tensor,
    params_by_name: Mapping[str, Mapping[str, Tensor]],
    names: Sequence[str],
    /,
    *,
    base: HQQLinear | None = None,
    weight_norm: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Row ``i`` of ``x`` (dim 0) through adapter ``names[i]``; ``"__base__"``: none.

    Equal to applying each row's adapter on its own (:func:`apply_lora`), computed
    in one pass: the adapters named in the batch are stacked (:func:`stack_adapters`)
    and :func:`mixed_batch_indexed` does the rest, so the kernel count does not grow
    with the number of adapters. In eager mode on the CPU, when few adapters share
    many rows (or the layer is wide), the rows are grouped by adapter instead and each
    group gets :func:`apply_lora`'s term from the adapter as it is, with no stacking.
    For a hot serving loop, stack once and call :func:`mixed_batch_indexed` with an
    index tensor instead.

    With ``base`` the full layer output; without it only the adapter term, so
    ``base(x) + mixed_batch(x, p, names)`` is the output for LoRA adapters. DoRA
    adapters need ``base``.

    Args:
        x: input of shape ``(batch, ..., in)``.
        params_by_name: adapter name → adapter dict.
        names: ``batch`` names, each a key of ``params_by_name`` or ``"__base__"``.
        base: the quantized layer.
        weight_norm: DoRA adapter name → ``dora_weight_norm(base, params)``, to skip
            recomputing it; missing ones are computed.

    Returns:
        ``(batch, ..., out)``: the layer output (base output dtype) with ``base``,
        else the adapter term (adapters' dtype).

    Raises:
        ValueError: an unknown name (the message lists the known ones),
            ``len(names) != x.shape[0]``, a DoRA adapter without ``base``,
            adapters whose shapes or devices do not fit, or a ``weight_norm`` entry
            that is not positive and finite.

    Example:
        >>> y = mixed_batch(x, {"a": p_a, "b": p_b}, ["a", "__base__", "b"], base=layer)  # doctest: +SKIP
    """
    if not isinstance(params_by_name, Mapping):
        raise TypeError(
            f"Expected `params_by_name` to be a dict of adapter dicts, got {type(params_by_name).__name__}."
        )
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"Expected `names` to be a list of adapter names, got {type(names).__name__}."
        )
    shape = quant_layout(check_hqq_layer(base)).shape if base is not None else (None, None)
    device = base.W_q.device if base is not None else None
    _check_x(x, shape[1], device)
    if len(names) != x.shape[0]:
        raise ValueError(
            f"Expected one adapter name per row of x ({x.shape[0]}), got {len(names)} names."
        )
    known = list(params_by_name)
    if BASE in params_by_name:
        raise ValueError(f"Expected adapter names other than the reserved {BASE!r}, got {BASE!r}.")
    for name in names:
        if name != BASE and name not in params_by_name:
            raise _unknown_name(name, known)
    for name, p in params_by_name.items():
        check_params(
            p, in_features=shape[1], out_features=shape[0], name=f"params_by_name[{name!r}]"
        )
        if device is not None and p["lora_A"].device != device:
            raise ValueError(
                f"Expected `params_by_name[{name!r}]` on the base layer's device {device}, "
                f"got {p['lora_A'].device}."
            )
    if weight_norm is not None:
        is_dora = {name: "magnitude" in p for name, p in params_by_name.items()}
        _check_norm_dict(weight_norm, params_by_name, is_dora, shape[0], device)
    used = list(dict.fromkeys(n for n in names if n != BASE))
    if not used:
        # Only "__base__" rows: no adapter term.
        if base is not None:
            check_hqq_layer(base)
            return base_forward(base, x)
        if not params_by_name:
            raise ValueError(
                "Expected at least one adapter in `params_by_name` to size the term, got none."
            )
        p = next(iter(params_by_name.values()))
        return x.new_zeros((*x.shape[:-1], p["lora_B"].shape[0]), dtype=p["lora_B"].dtype)
    position = {name: k for k, name in enumerate(used)}
    adapters = [params_by_name[name] for name in used]
    rank = max(p["lora_A"].shape[0] for p in adapters)
    out_features, in_features = adapters[0]["lora_B"].shape[0], adapters[0]["lora_A"].shape[1]
    if _loop_allowed(x) and _loop_pays(x.shape[0], len(used), rank, in_features, out_features):
        # The same checks as stacking and mixed_batch_indexed, without the copies.
        _check_stackable(used, adapters)
        dora_names = [name for name, p in zip(used, adapters, strict=True) if "magnitude" in p]
        if base is None and dora_names:
            raise _dora_needs_base(dora_names)
        norms = {} if weight_norm is None or base is None else weight_norm
        rows_of = _rows_by_slot([position.get(n, -1) for n in names])
        runs = [
            (p, norms.get(name), len(rows_of[k]))
            for k, (name, p) in enumerate(zip(used, adapters, strict=True))
        ]
        order = _row_order(list(rows_of.values()), len(names))
        return _loop_forward(x, base, order, runs, adapters[0]["lora_A"].dtype, out_features)
    bank = stack_adapters(params_by_name, used)
    index = torch.tensor([position.get(n, -1) for n in names], device=bank.lora_A.device)
    if weight_norm is not None:
        weight_norm = {n: v for n, v in weight_norm.items() if n in position} or None
    return mixed_batch_indexed(x, bank, index, base=base, weight_norm=weight_norm)
