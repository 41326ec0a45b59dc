"""Replacing a folder in one step, so that readers see the old contents or the new, whole.

An adapter is a PAIR of files with fixed names (PEFT reads exactly
``adapter_config.json`` and ``adapter_model.safetensors``), and no sequence of file
renames inside one folder swaps two files at once: a crash between them leaves
new weights beside the old config. So the whole folder is swapped:

1. Leftovers of earlier killed saves (siblings named ``.<name>.hqqlora-<hex>``
   that no running save holds locked) are removed.
2. A fresh sibling ``.<name>.hqqlora-<hex>`` (same parent, so same filesystem) is
   created and locked (``flock``) while in use; the new files are written into it,
   every other entry of the old folder is carried over as a hard link (a copy where
   the filesystem has none), and files and folder are ``fsync``-ed.
3. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically: at
   every instant ``<name>`` is the complete old folder or the complete new one. A
   missing ``<name>`` is created by a plain ``rename``, atomic too.
4. The sibling, which now holds the old folder, is removed and the parent ``fsync``-ed.

A kill at any point leaves ``<name>`` whole (old or new), and at most a hidden
sibling, which nothing reads and which the next save removes. Where
``RENAME_EXCHANGE`` is missing (not Linux, an old kernel, a filesystem without it),
the fallback renames the old folder aside and then the new one into place: a
crash between those two renames leaves ``<name>`` missing and the old folder whole
under ``.<name>.hqqlora-<hex>``.

Other processes writing into the folder during a save may lose those writes; two
saves of one folder at once end with one of them in place, whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]  # a module or None: typeshed has no Optional module type

__all__ = ["replace_folder"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_TAG = ".hqqlora-"


def replace_folder(
    folder: Path, write: Callable[[Path], None], *, carry: Callable[[str], bool]
) -> None:
    """Makes ``folder`` the folder that ``write`` fills, in one atomic step.

    Args:
        folder: the folder to create or replace; its parent is created if missing.
        write: fills the (empty) staging folder given to it; it should ``fsync``
            what it writes, or leave that to this function (every regular file it
            leaves at the top level is ``fsync``-ed).
        carry: whether an entry of the old folder, by name, is carried over into
            the new one when ``write`` did not make one of that name.

    Raises:
        ValueError: ``folder`` is a filesystem root, or the current working
            directory or one of its ancestors (replacing it would strand the process).
        NotADirectoryError: ``folder`` exists and is not a directory.
    """
    folder = Path(os.path.realpath(folder))
    parent, name = folder.parent, folder.name
    if not name or parent == folder:
        raise ValueError(f"Expected a folder with a parent, got {str(folder)!r}.")
    cwd = Path(os.getcwd())
    if cwd == folder or folder in cwd.parents:
        raise ValueError(
            f"Expected a folder other than the working directory and its ancestors (the folder "
            f"is replaced as a whole), got {str(folder)!r}."
        )
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"Expected a folder, got the file {str(folder)!r}.")
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent, name)

    staging = parent / f".{name}{_TAG}{secrets.token_hex(8)}"
    os.mkdir(staging)  # mode 0o777 & ~umask, like any new folder
    handle = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fcntl is not None:  # tells a concurrent save's clean-up that this one is alive
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            write(staging)
            with os.scandir(staging) as entries:
                written = [e.path for e in entries if e.is_file(follow_symlinks=False)]
            for file in written:
                _fsync_file(file)
            if folder.is_dir():
                _carry_over(folder, staging, carry)
                os.chmod(staging, stat.S_IMODE(folder.stat().st_mode))
            with contextlib.suppress(OSError):  # some filesystems refuse fsync on a folder
                os.fsync(handle)
            old = _swap(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        os.close(handle)  # releases the lock
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def remove_leftovers(parent: Path, name: str) -> None:
    """Removes staging folders of ``name`` left by killed saves (unlocked ones only)."""
    pattern = re.compile(rf"\.{re.escape(name)}{re.escape(_TAG)}[0-9a-f]{{16}}")
    with os.scandir(parent) as entries:
        stale = [
            e.path for e in entries if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]
    for path in stale:
        try:
            handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or replaced by something that is not ours
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a save in progress
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(handle)


def _swap(staging: Path, folder: Path) -> Path | None:
    """Puts ``staging`` at ``folder``; returns where the old folder now is (``None``: none)."""
    if not folder.exists():
        try:
            os.rename(staging, folder)
            return None
        except OSError as e:  # created meanwhile, and not empty
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(staging, folder):
        return staging
    aside = folder.parent / f".{folder.name}{_TAG}{secrets.token_hex(8)}"
    os.rename(folder, aside)
    os.rename(staging, folder)
    return aside


def _exchange(a: Path, b: Path) -> bool:
    """Swaps ``a`` and ``b`` atomically; ``False`` where ``RENAME_EXCHANGE`` is unavailable."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange on this kernel/fs
        return False
    raise OSError(err, os.strerror(err), str(b))


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (AttributeError, OSError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def _carry_over(old: Path, new: Path, carry: Callable[[str], bool]) -> None:
    with os.scandir(old) as listing:
        entries = list(listing)
    for entry in entries:
        target = new / entry.name
        if not carry(entry.name) or os.path.lexists(target):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, target)


def _link_or_copy(source: str, target: str | os.PathLike[str]) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _fsync_file(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a folder
        handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
