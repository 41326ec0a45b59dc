"""save_adapter replaces the pair of files as one: SIGKILLs at every step and at random times.

No PEFT needed: the folder must load with `load_adapter` as exactly the old adapter or
exactly the new one, whatever the moment of the kill, and the next save leaves no debris.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import select
import signal
import sys
import time

import pytest
import torch

import hqqlora._atomic
import hqqlora._io
from hqqlora import load_adapter, save_adapter

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

FILES = ["adapter_config.json", "adapter_model.safetensors"]


def adapters(r, width=64, seed=0, dora=False):
    """Two modules of rank `r`; ranks differ between old and new, so a mixed pair cannot load."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(("fc1", "block.fc2")):
        out[name] = {
            "lora_A": torch.randn(r, width, generator=gen),
            "lora_B": torch.randn(width, r, generator=gen),
            "scaling": torch.tensor(
                2.0 + i
            ),  # fc1 at the default alpha, block.fc2 via alpha_pattern
        }
        if dora:
            out[name]["magnitude"] = torch.rand(width, generator=gen) + 0.5
    return out


OLD = {"adapters": adapters(4), "r": 4, "lora_alpha": 8.0}
NEW = {"adapters": adapters(2, seed=1, dora=True), "r": 2, "lora_alpha": 4.0, "use_dora": True}


def save(folder, spec):
    return save_adapter(
        folder, spec["adapters"], **{k: v for k, v in spec.items() if k != "adapters"}
    )


def equals(loaded, spec):
    expected = spec["adapters"]
    return sorted(loaded) == sorted(expected) and all(
        set(loaded[p]) == set(a) and all(torch.equal(loaded[p][k], v) for k, v in a.items())
        for p, a in expected.items()
    )


def which(folder):
    """'old' or 'new': what the folder loads as; fails on anything else."""
    adapters_, config = load_adapter(folder)
    found = [name for name, spec in (("old", OLD), ("new", NEW)) if equals(adapters_, spec)]
    assert len(found) == 1 and config["r"] == (OLD if found == ["old"] else NEW)["r"]
    return found[0]


def setup_folder(tmp_path, name="adapter"):
    folder = tmp_path / name
    save(folder, OLD)
    (folder / "README.md").write_text("kept")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept too")
    return folder


def check_folder(folder):
    assert sorted(os.listdir(folder)) == sorted([*FILES, "README.md", "extra"])
    assert (folder / "README.md").read_text() == "kept"
    assert (folder / "extra" / "notes.txt").read_text() == "kept too"


def fork(child):
    """Runs `child()` in a forked process; returns (pid, read end of a pipe it may write to)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # never return into pytest from here
        try:
            os.close(read)
            torch.set_num_threads(1)  # no OpenMP pool in a forked child
            child(write)
        finally:
            os._exit(0)
    os.close(write)
    return pid, read


def traced_save(folder, kill_at):
    """Saves NEW in a child that SIGKILLs itself at its `kill_at`-th line of the swap protocol.

    Every line run in hqqlora/_atomic.py counts (the validation before it touches
    nothing); returns the count when the save completes.
    """
    traced = {hqqlora._atomic.__file__}

    def child(pipe):
        count = 0

        def local(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return local

        sys.settrace(
            lambda frame, event, arg: local if frame.f_code.co_filename in traced else None
        )
        save(folder, NEW)
        sys.settrace(None)
        os.write(pipe, str(count).encode())

    pid, read = fork(child)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or (os.WIFEXITED(status) and report), status
    return None if killed else int(report)


def test_save_killed_at_every_step_leaves_old_or_new(tmp_path):
    folder = setup_folder(tmp_path)
    total = traced_save(setup_folder(tmp_path, "dry-run"), kill_at=-1)  # lines a save runs
    assert total > 50
    seen = set()
    for step in range(1, total + 1):
        save(folder, OLD)
        assert traced_save(folder, kill_at=step) is None
        seen.add(which(folder))
        check_folder(folder)
    assert seen == {"old", "new"}
    save(folder, NEW)  # the next save removes whatever the killed ones left
    assert sorted(os.listdir(tmp_path)) == ["adapter", "dry-run"]
    check_folder(folder)
    assert which(folder) == "new"


def test_save_killed_at_random_times_leaves_old_or_new(tmp_path):
    big_old = {"adapters": adapters(32, width=2048), "r": 32, "lora_alpha": 64.0}
    big_new = {"adapters": adapters(16, width=2048, seed=1), "r": 16, "lora_alpha": 32.0}
    folder = tmp_path / "adapter"
    save(folder, big_old)

    def child(pipe):
        while True:
            for spec in (big_new, big_old):
                save(folder, spec)
                os.write(pipe, b".")

    def saved(pipe):
        # One more save finished in the child (a minute at most: a hung child fails).
        ready, _, _ = select.select([pipe], [], [], 60)
        return bool(ready) and pipe.read(1) == b"."

    rng = random.Random(0)
    for _ in range(20):
        pid, read = fork(child)
        with os.fdopen(read, "rb", buffering=0) as pipe:
            try:
                # Aim by the child's own saves rather than the parent's: a slow or loaded
                # machine then delays the kill instead of landing it before any save.
                assert saved(pipe), "the child finished no first save"
                started = time.perf_counter()
                assert saved(pipe), "the child finished no second save"
                duration = time.perf_counter() - started
                time.sleep(rng.uniform(0, 2 * duration))  # in the third or fourth save
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        loaded, config = load_adapter(folder)
        matches = [s for s in (big_old, big_new) if equals(loaded, s) and config["r"] == s["r"]]
        assert len(matches) == 1
        assert sorted(os.listdir(folder)) == FILES
    save(folder, big_old)
    assert os.listdir(tmp_path) == ["adapter"]


@pytest.mark.parametrize("fail", ["weights", "config", "fsync", "swap"])
def test_save_that_raises_keeps_old_adapter(tmp_path, monkeypatch, fail):
    folder = setup_folder(tmp_path)
    before = {n: (folder / n).read_bytes() for n in FILES}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if fail == "weights":
        monkeypatch.setattr(hqqlora._io, "save_file", boom)
    elif fail == "config":  # after the weights are written
        monkeypatch.setattr(hqqlora._io.json, "dump", boom)
    elif fail == "fsync":
        monkeypatch.setattr(hqqlora._atomic, "_fsync_file", boom)
    else:
        monkeypatch.setattr(hqqlora._atomic, "_exchange", boom)
    with pytest.raises(OSError, match="disk full"):
        save(folder, NEW)
    monkeypatch.undo()
    assert {n: (folder / n).read_bytes() for n in FILES} == before
    check_folder(folder)
    assert os.listdir(tmp_path) == ["adapter"]
    assert which(folder) == "old"


def test_save_without_rename_exchange(tmp_path, monkeypatch):
    """The documented fallback (rename aside, rename in) still ends whole and clean."""
    folder = setup_folder(tmp_path)
    monkeypatch.setattr(hqqlora._atomic, "_renameat2", lambda: None)
    save(folder, NEW)
    assert which(folder) == "new"
    check_folder(folder)
    assert os.listdir(tmp_path) == ["adapter"]


def test_save_removes_leftovers_of_killed_saves_only(tmp_path):
    folder = setup_folder(tmp_path)
    stale = tmp_path / ".adapter.hqqlora-0123456789abcdef"
    busy = tmp_path / ".adapter.hqqlora-fedcba9876543210"
    other = tmp_path / ".adapter.hqqlora-mine"  # not a name hqqlora makes
    for d in (stale, busy, other):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    handle = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a save in progress holds its staging folder
        save(folder, NEW)
    finally:
        os.close(handle)
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", busy.name, other.name])
    assert which(folder) == "new"


def test_save_drops_old_temporary_files_and_keeps_mode(tmp_path):
    folder = tmp_path / "adapter"
    save(folder, OLD)
    (folder / ".adapter_model.safetensors.abc123.tmp").write_bytes(b"half")  # older hqqlora's
    (folder / ".adapter_config.json.x.tmp").write_text("{")
    os.chmod(folder, 0o750)
    save(folder, NEW)
    assert sorted(os.listdir(folder)) == FILES
    assert os.stat(folder).st_mode & 0o777 == 0o750
    assert os.stat(folder / FILES[0]).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def test_save_into_new_folder_through_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save(tmp_path / "link" / "adapter", OLD)
    assert which(tmp_path / "real" / "adapter") == "old"
    (tmp_path / "latest").symlink_to(tmp_path / "real" / "adapter")
    save(tmp_path / "latest", NEW)  # writes through the link, which stays a link
    assert (tmp_path / "latest").is_symlink()
    assert which(tmp_path / "real" / "adapter") == "new"
    assert sorted(os.listdir(tmp_path / "real")) == ["adapter"]


def test_save_refuses_working_directory_and_files(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="Expected a folder"):
        save(tmp_path / "file", OLD)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="working directory"):
        save(".", OLD)
    with pytest.raises(ValueError, match="working directory"):
        save(tmp_path.parent, OLD)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_config_written_last_is_valid_json(tmp_path):
    folder = tmp_path / "adapter"
    save(folder, NEW)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["use_dora"] is True
    assert config["alpha_pattern"] == {"^block\\.fc2": 6.0}
