"""benchmarks/bench_distributed.py --tiny under torchrun, 2 CPU processes (gloo): it runs and prints its table."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
)


def test_bench_distributed_tiny_runs_all_modes_on_two_ranks():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "benchmarks" / "bench_distributed.py"),
        "--tiny",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(
        r"^\| (functional|ddp|fsdp2) \| 2 \| (\d+) \| (\d+) \| ([\d.e-]+) \|", done.stdout, re.M
    )
    assert [r[0] for r in rows] == ["functional", "ddp", "fsdp2"], done.stdout
    base = {mode: float(mib) for mode, _, _, mib in rows}
    # FSDP2 shards the quantized base over the two ranks; the other modes keep it whole.
    assert base["ddp"] == base["functional"]
    assert base["fsdp2"] <= 0.5 * base["ddp"] * 1.01
    assert all(int(tokens) > 0 for _, tokens, _, _ in rows)
