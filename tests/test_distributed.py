"""hqqlora.distributed: averaging pytrees over ranks (gloo, CPU).

The multi-process checks share one spawned run of two ranks (tests/_dist_worker.py);
the argument checks run in this process, in a process group of one.
"""

from __future__ import annotations

import datetime
import time

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hqqlora
from hqqlora.distributed import all_reduce_mean, rank_generator


def _gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


pytestmark = [
    pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo"),
    # One xdist worker takes the whole module, so its module-scoped run of two ranks is
    # spawned once (addopts: --dist loadgroup).
    pytest.mark.xdist_group("dist_ranks"),
]

if _gloo_available():
    import _dist_worker as worker

SPAWN_LIMIT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks saw, and rank 0's try at a collective rank 1 never joined."""
    out = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(
        worker.run,
        args=(2, str(out / "init"), str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_LIMIT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the two spawned ranks did not finish in {SPAWN_LIMIT_S} s")
    seen = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    return seen, torch.load(out / "timeout0.pt")


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank in this process (a FileStore in tmp_path)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def collectives(monkeypatch):
    """The sizes of the tensors passed to torch.distributed.all_reduce, one per call."""
    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, **kwargs):
        # gloo sums then divides: its AVG exists only in recent torch.
        assert op == dist.ReduceOp.SUM
        calls.append(tensor.numel())
        return all_reduce(tensor, op=op, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    return calls


def _assert_trees_equal(a, b):
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


# --- two ranks ------------------------------------------------------------------


def test_two_ranks_on_their_rows_train_like_one_process_on_the_batch(ranks):
    (rank0, rank1), _ = ranks
    # After the collective both ranks hold the same gradients, hence the same adapters.
    _assert_trees_equal(rank0["distributed"], rank1["distributed"])
    assert rank0["distributed_losses"] == rank1["distributed_losses"]
    init = hqqlora.trainable_params(rank0["adapters_before"])
    single = rank0["single"]
    moved = max((single[p][k] - init[p][k]).abs().max().item() for p in init for k in init[p])
    assert moved > 1e-2  # the comparison below is not between two copies of the init
    # fp32, 4 AdamW steps: the only difference is the order of float additions (a sum
    # over 9 rows vs 5 + 4 then one more add), ~1e-7 relative on the gradients;
    # Adam's m/√v carries it to the update at the same relative size.
    torch.testing.assert_close(rank0["distributed"], single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(rank0["distributed_losses"]),
        torch.tensor(rank0["single_losses"]),
        rtol=1e-5,
        atol=0,
    )


def test_leaves_travel_in_one_bucket_not_one_collective_each(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        # 5 adapter leaves (DoRA: A, B, magnitude; LoRA: A, B) + the loss, per step.
        assert seen["reduced_leaves"] == 6
        total = sum(
            v.numel()
            for p in hqqlora.trainable_params(seen["adapters_before"]).values()
            for v in p.values()
        )
        assert seen["collectives"] == [total + 1] * worker.STEPS


def test_mean_over_ranks_is_exact_for_each_dtype_and_keeps_none(ranks):
    (rank0, rank1), _ = ranks
    expected = {
        "a": torch.linspace(-1, 1, 10) * 1.5,
        "b": [torch.arange(5, dtype=torch.float64) * 1.5, None],
        "c": torch.full((3, 4), 3.0),
    }
    _assert_trees_equal(rank0["mean_tree"], expected)
    _assert_trees_equal(rank1["mean_tree"], expected)


def test_rank_generators_are_reproducible_and_differ_across_ranks(ranks):
    (rank0, rank1), _ = ranks
    assert not torch.equal(rank0["draws"], rank1["draws"])
    for seen in (rank0, rank1):
        _assert_trees_equal(seen["dropout_run0"], seen["dropout_run1"])
        assert not torch.equal(
            seen["dropout_run0"]["0"]["lora_A"], seen["distributed"]["0"]["lora_A"]
        )
    _assert_trees_equal(rank0["dropout_run0"], rank1["dropout_run0"])


def test_training_leaves_the_input_adapters_alone(ranks):
    (rank0, rank1), _ = ranks
    for seen in (rank0, rank1):
        _assert_trees_equal(seen["adapters_after"], seen["adapters_before"])


def test_a_rank_that_never_joins_gives_a_timeout_error_not_a_hang(ranks):
    _, timeout = ranks
    assert timeout["error"] == "TimeoutError", timeout.get("trace")
    assert "waited 2 s for its peers" in timeout["message"]
    assert "rank 0 of 2" in timeout["message"]
    assert worker.TIMEOUT_S - 0.05 <= timeout["elapsed"] < worker.TIMEOUT_S + 5


def test_rank_generator_depends_on_seed_and_rank_only(ranks, world_of_one):
    (rank0, rank1), _ = ranks
    # Rank 0 of a group of one draws what rank 0 of a group of two drew.
    assert torch.equal(torch.rand(8, generator=rank_generator(7)), rank0["draws"])
    # Seed 8 on rank 0 is not seed 7 on rank 1 (as seed + rank would make it).
    seed8 = torch.rand(8, generator=rank_generator(8))
    assert not torch.equal(seed8, rank0["draws"])
    assert not torch.equal(seed8, rank1["draws"])


# --- one rank, in this process ----------------------------------------------------


def _mixed_tree():
    """fp32 leaves of 40, 48 and 8 bytes, one fp64 leaf of 40 bytes, and a None."""
    return {
        "a": torch.linspace(-1, 1, 10),
        "b": [torch.arange(5, dtype=torch.float64), None],
        "c": {
            "d": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
            "e": torch.ones(2),
        },
    }


@pytest.mark.parametrize(
    ("bucket_bytes", "sizes"),
    [
        (hqqlora.distributed.DEFAULT_BUCKET_BYTES, [10 + 12 + 2, 5]),  # one bucket per dtype
        (56, [10, 12 + 2, 5]),  # 40 + 48 > 56: "d" starts a bucket; 48 + 8 = 56 fits
        (16, [10, 12, 2, 5]),  # every leaf is larger than a bucket: each alone
    ],
)
def test_buckets_group_by_dtype_up_to_bucket_bytes(world_of_one, collectives, bucket_bytes, sizes):
    tree = _mixed_tree()
    _assert_trees_equal(all_reduce_mean(tree, bucket_bytes=bucket_bytes), tree)
    assert sorted(collectives) == sorted(sizes)


def test_result_is_new_and_detached_and_input_unchanged(world_of_one):
    tree = _mixed_tree()
    tree["a"].requires_grad_(True)
    before = optree.tree_map(lambda t: t.detach().clone(), tree)
    result = all_reduce_mean(tree)
    _assert_trees_equal(tree, before)
    assert not result["a"].requires_grad
    inputs = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(tree)}
    assert not inputs & {t.untyped_storage().data_ptr() for t in optree.tree_leaves(result)}
    result["c"]["e"].add_(1.0)  # writing to a result leaves the input and the other leaves alone
    _assert_trees_equal(tree, before)
    torch.testing.assert_close(result["c"]["d"], before["c"]["d"], rtol=0, atol=0)


def test_empty_tree_issues_no_collective(world_of_one, collectives):
    assert all_reduce_mean({"a": None, "b": []}) == {"a": None, "b": []}
    assert collectives == []


@pytest.mark.parametrize(
    ("leaf", "message"),
    [
        (torch.arange(3), r"Expected floating-point tensors, got torch.int64 at b/0\."),
        (
            torch.ones(2, dtype=torch.bool),
            r"Expected floating-point tensors, got torch.bool at b/0\.",
        ),
        (1.5, r"Expected a pytree of tensors, got float at b/0\."),
        (
            torch.eye(3).to_sparse(),
            r"Expected dense \(strided\) tensors, got layout torch.sparse_coo",
        ),
    ],
)
def test_bad_leaves_raise_before_any_collective(world_of_one, collectives, leaf, message):
    tree = {"a": torch.ones(3), "b": [leaf]}
    with pytest.raises(TypeError, match=message):
        all_reduce_mean(tree)
    assert collectives == []


def test_dtensor_leaves_are_refused(world_of_one, collectives):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    leaf = distribute_tensor(torch.ones(4), mesh, [Replicate()])
    with pytest.raises(TypeError, match=r"Expected plain tensors, got a DTensor at x\. FSDP2"):
        all_reduce_mean({"x": leaf})
    assert collectives == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bucket_bytes": 0}, ValueError, r"Expected bucket_bytes > 0, got 0\."),
        ({"bucket_bytes": 1.5}, TypeError, r"Expected bucket_bytes as an int, got float\."),
        ({"timeout": 0}, ValueError, r"Expected a finite timeout > 0 seconds, got 0\."),
        (
            {"timeout": float("nan")},
            ValueError,
            r"Expected a finite timeout > 0 seconds, got nan\.",
        ),
        ({"timeout": "5"}, TypeError, r"Expected timeout as seconds .* got str\."),
    ],
)
def test_bad_options_raise(world_of_one, collectives, kwargs, error, message):
    with pytest.raises(error, match=message):
        all_reduce_mean({"a": torch.ones(2)}, **kwargs)
    assert collectives == []


def test_timeout_as_timedelta_and_seconds(world_of_one):
    tree = {"a": torch.ones(2)}
    _assert_trees_equal(all_reduce_mean(tree, timeout=datetime.timedelta(seconds=5)), tree)
    _assert_trees_equal(all_reduce_mean(tree, timeout=5), tree)


def test_without_a_process_group_nothing_is_averaged_silently():
    assert not dist.is_initialized()
    with pytest.raises(
        RuntimeError, match=r"all_reduce_mean: expected an initialized process group"
    ):
        all_reduce_mean({"a": torch.ones(2)})
    with pytest.raises(
        RuntimeError, match=r"rank_generator: expected an initialized process group"
    ):
        rank_generator(0)


def test_rank_generator_refuses_a_non_int_seed(world_of_one):
    with pytest.raises(TypeError, match=r"Expected seed as an int, got float\."):
        rank_generator(1.0)
    with pytest.raises(TypeError, match=r"Expected seed as an int, got bool\."):
        rank_generator(True)
