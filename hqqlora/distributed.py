"""Data-parallel adapter training on ``torch.distributed``, the functional way.

Each rank takes its share of the batch, computes the gradients of its loss with
``torch.func.grad`` over the adapters dict, and :func:`all_reduce_mean` averages
them over the ranks. With every rank's loss weighted so that the ranks' losses
average to the loss of the whole batch, the averaged gradient *is* the
gradient of the whole batch, and N ranks train like one process (up to the
order of float additions):

    L = (1/B) Σ_{i<B} ℓ_i = (1/N) Σ_k L_k,   L_k = (N/B) Σ_{i ∈ rows(k)} ℓ_i,

so ∇L = (1/N) Σ_k ∇L_k. With equal shares (B/N rows each) L_k is the plain
mean over the rank's rows.

Launching and transport are PyTorch's: ``torchrun`` (or ``torch.multiprocessing``)
starts the processes, ``torch.distributed.init_process_group`` connects them,
and :func:`all_reduce_mean` only issues ``torch.distributed.all_reduce``.

The quantized base is frozen, so nothing about it needs reducing: every rank
holds the same base (or, sharded by FSDP2, its share of it) and the same adapters
(same seed, or broadcast once), and only the adapters' gradients cross ranks.

The module way shards the quantized base too: :func:`shard_quantized` applies
FSDP2's ``fully_shard`` to each repeated block (or each HQQ layer), codes, scales and
zeros included (:func:`register_quant_params`), :func:`gathered` gives whole units
back for a merge, and :func:`~hqqlora.save_adapter` / :func:`assign_adapter` write and load
one PEFT-format adapter from and into the shards.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import sys
import time
from typing import Any, TypeVar, cast

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from hqqlora._shard import (
    assign_adapter,
    gathered,
    quantized_bytes,
    register_quant_params,
    shard_quantized,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "all_reduce_mean",
    "assign_adapter",
    "gathered",
    "quantized_bytes",
    "rank_generator",
    "register_quant_params",
    "shard_quantized",
]

T = TypeVar("T")

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""25 MiB, DDP's default bucket size (``bucket_cap_mb=25``)."""


def _require_process_group(caller: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: expected an initialized process group "
            "(torch.distributed.init_process_group, e.g. under torchrun), got none."
        )


def _timeout_seconds(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(
            f"Expected timeout as seconds (a number) or a datetime.timedelta, "
            f"got {type(timeout).__name__}."
        )
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"Expected a finite timeout > 0 seconds, got {timeout!r}.")
    return seconds


def _check_leaf(path: tuple[Any, ...], leaf: object) -> Tensor:
    where = "the root" if not path else "/".join(map(str, path))
    if not isinstance(leaf, Tensor):
        raise TypeError(f"Expected a pytree of tensors, got {type(leaf).__name__} at {where}.")
    # Looked up, not imported: importing torch.distributed.tensor costs ~0.7 s, and no
    # DTensor can exist before it is imported.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(leaf, dtensor.DTensor):
        raise TypeError(
            f"Expected plain tensors, got a DTensor at {where}. FSDP2 reduces the gradients "
            "of the parameters it shards itself; average only plain (replicated) tensors here."
        )
    if leaf.layout != torch.strided:
        raise TypeError(f"Expected dense (strided) tensors, got layout {leaf.layout} at {where}.")
    if not leaf.is_floating_point():
        raise TypeError(f"Expected floating-point tensors, got {leaf.dtype} at {where}.")
    return leaf


def _backend_of(group: dist.ProcessGroup | None, device: torch.device) -> str:
    """The backend that serves ``device`` in ``group`` ("nccl", or "cpu:gloo,cuda:nccl" parsed)."""
    name = str(dist.get_backend(group))
    for entry in name.split(","):
        kind, _, backend = entry.rpartition(":")
        if not kind or kind == device.type:
            return backend
    return name


def _buckets(leaves: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Leaf indices packed into buckets: one dtype and device each, ≤ ``bucket_bytes`` each
    (a single larger leaf gets a bucket of its own), in the order the leaves come."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_kind.setdefault((leaf.dtype, leaf.device), []).append(i)
    buckets = []
    for indices in by_kind.values():
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = leaves[i].numel() * leaves[i].element_size()
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        buckets.append(current)
    return buckets


def all_reduce_mean(
    tree: T,
    /,
    *,
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout: float | datetime.timedelta | None = None,
) -> T:
    """The mean of a pytree of tensors over the ranks of a process group.

    For every leaf, with N ranks in ``group`` and ``x_k`` the leaf on rank k::

        mean = (1/N) Σ_{k<N} x_k

    The leaves travel in a few flat buckets, one ``torch.distributed.all_reduce``
    per bucket rather than one per leaf: leaves are grouped by dtype and device,
    concatenated in tree order, and cut into buckets of at most ``bucket_bytes``
    (a leaf larger than that travels alone). All buckets are issued before the
    first is waited on, so they overlap. On NCCL the reduction is
    ``ReduceOp.AVG``; on every other backend (gloo) it is ``ReduceOp.SUM``
    followed by a division by N, which every torch version supports. The sum
    runs in the leaves' own dtype: cast a bf16 tree to float32 first for an
    fp32 reduction.

    Pure: the input tensors are read, never written; the result is a new tree of
    the same structure whose leaves are new tensors, detached from any autograd
    graph. Each result leaf is a view into its bucket's buffer (no two overlap);
    ``.clone()`` one that must own its storage.

    Every rank of ``group`` must call this with trees of the same structure,
    shapes and dtypes (and, for a mixed tree, the same device types in the same
    order), as for any collective; this is not checked, because checking would
    cost one more collective per call. Run with ``TORCH_DISTRIBUTED_DEBUG=DETAIL``
    to have torch check every collective's shapes across ranks.

    Args:
        tree: a pytree (``optree``: dicts, lists, tuples, namedtuples...) whose
            leaves are floating-point tensors of any shape, e.g. the gradients
            ``torch.func.grad`` returns for a model-level adapters dict, or a
            ``(grads, loss)`` tuple to average the loss in the same bucket.
            ``None`` is an empty subtree (optree's default): it is kept as it is and
            takes no part in the collective.
        group: the process group to average over; ``None`` is the default (world)
            group. For data parallelism inside a larger mesh, pass the
            data-parallel group, e.g. ``mesh.get_group("dp")``.
        bucket_bytes: the largest bucket, in bytes (default 25 MiB, DDP's).
        timeout: seconds (or a ``datetime.timedelta``) to wait for all buckets
            together; ``None`` waits as long as the process group does. Past it,
            ``TimeoutError``. The process group's own timeout
            (``init_process_group(timeout=...)``: 30 min for gloo, 10 min for
            NCCL by default) bounds every collective anyway: gloo then raises, and
            NCCL's watchdog tears the process down. ``timeout`` is a shorter bound
            that raises in the caller instead. A peer process that *exits* makes
            gloo raise at once ("Connection closed by peer"), timeout or not.

    Returns:
        A new tree with the structure of ``tree``: each leaf the mean of that leaf
        over the ranks, with the leaf's shape, dtype and device.

    Raises:
        RuntimeError: if no process group is initialized.
        TypeError: if a leaf is not a dense floating-point tensor, or is a DTensor
            (a sharded gradient, which FSDP2 reduces itself).
        ValueError: if ``bucket_bytes`` or ``timeout`` is not positive.
        TimeoutError: if a peer has not joined within ``timeout``. The collective
            is then left unfinished: the process group is no longer usable, so
            end the run (``torch.distributed.destroy_process_group()`` and exit;
            ``torchrun --max-restarts`` can restart the job).

    Example::

        grads, loss = torch.func.grad_and_value(loss_fn)(trainable, my_rows)
        grads, loss = hqqlora.distributed.all_reduce_mean((grads, loss), timeout=60)
    """
    _require_process_group("all_reduce_mean")
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool):
        raise TypeError(f"Expected bucket_bytes as an int, got {type(bucket_bytes).__name__}.")
    if bucket_bytes <= 0:
        raise ValueError(f"Expected bucket_bytes > 0, got {bucket_bytes}.")
    seconds = _timeout_seconds(timeout)
    paths, leaves, treespec = optree.tree_flatten_with_path(cast(Any, tree))
    leaves = [_check_leaf(path, leaf) for path, leaf in zip(paths, leaves, strict=True)]

    world = dist.get_world_size(group)
    launched = []
    for bucket in _buckets(leaves, bucket_bytes):
        # torch.cat copies: the input leaves are never written.
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in bucket])
        # NCCL averages natively. Elsewhere SUM, then divide: gloo gained AVG only in 2025
        # (pytorch#149781; torch>=2.4 is supported here), and its reduce_scatter AVG was
        # found summing silently (pytorch#162338).
        average = _backend_of(group, flat.device) == "nccl"
        op = dist.ReduceOp.AVG if average else dist.ReduceOp.SUM
        work = dist.all_reduce(flat, op=op, group=group, async_op=True)
        launched.append((bucket, flat, work, average))

    deadline = None if seconds is None else time.monotonic() + seconds
    means: list[Tensor | None] = [None] * len(leaves)
    for k, (bucket, flat, work, average) in enumerate(launched):
        _wait(work, deadline, seconds, k, len(launched), group)
        if not average:
            flat.div_(world)
        pieces = flat.split([leaves[i].numel() for i in bucket])  # type: ignore[no-untyped-call]  # torch's Tensor.split is unannotated
        for i, piece in zip(bucket, pieces, strict=True):
            means[i] = piece.view(leaves[i].shape)
    return cast(T, optree.tree_unflatten(treespec, means))


def _wait(
    work: dist.Work,
    deadline: float | None,
    seconds: float | None,
    k: int,
    n: int,
    group: dist.ProcessGroup | None,
) -> None:
    if deadline is None:
        work.wait()
        return
    # c10d counts whole milliseconds and reads 0 as "no timeout": round up, at least 1 ms.
    left_ms = max(math.ceil(1000 * (deadline - time.monotonic())), 1)
    error: Exception | None = None
    try:
        completed = work.wait(datetime.timedelta(milliseconds=left_ms))
    except RuntimeError as caught:  # gloo raises "Operation timed out!"; NCCL a DistBackendError
        if time.monotonic() < deadline - 0.01:  # failed early: a peer exited, not a timeout
            raise
        completed, error = False, caught
    if completed is False:
        raise TimeoutError(
            f"all_reduce_mean: rank {dist.get_rank(group)} of {dist.get_world_size(group)} "
            f"waited {seconds:g} s for its peers (bucket {k + 1} of {n}) and some did not "
            "join the collective: a peer may have raised, hung, or called a different "
            "collective. The process group is no longer usable; end the run."
        ) from error


def rank_generator(
    seed: int,
    /,
    *,
    group: dist.ProcessGroup | None = None,
    device: str | torch.device = "cpu",
) -> torch.Generator:
    """A ``torch.Generator`` of its own for this rank: reproducible, and independent across ranks.

    Its seed is the first 8 bytes of BLAKE2b("hqqlora.rank_generator", seed, rank),
    with ``rank`` this process's rank in ``group``. Each rank draws its own
    dropout masks for its own rows; two runs with the same ``seed`` and the same
    number of ranks draw the same masks. (A plain ``seed + rank`` would give
    rank 1 of seed 0 the stream of rank 0 of seed 1.)

    Args:
        seed: an int, the run's seed (the same on every rank).
        group: the process group whose rank counts; ``None`` is the default group.
        device: the generator's device (a CUDA generator for CUDA dropout).

    Returns:
        A new ``torch.Generator`` on ``device``.

    Raises:
        RuntimeError: if no process group is initialized.
        TypeError: if ``seed`` is not an int.

    Example::

        generator = rank_generator(0, device=f"cuda:{local_rank}")
        y = hqqlora.apply_lora(layer, params, x_rows, dropout=0.1, generator=generator)
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"Expected seed as an int, got {type(seed).__name__}.")
    _require_process_group("rank_generator")
    rank = dist.get_rank(group)
    digest = hashlib.blake2b(
        f"hqqlora.rank_generator:{seed}:{rank}".encode(), digest_size=8
    ).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))
