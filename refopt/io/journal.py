"""The file-system side of a save: every call that changes the file system, staged files, the
directory lock, the commit journal and recovery after an interruption.

:class:`refopt.io.saving.PresetSave` writes through these; every loader calls :func:`recover`.  The
kill-injection test (tests/test_save_safety.py, scripts/fuzz.py) replaces :data:`fs` to stop a save
after each call in turn.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import io
import os
import time
from pathlib import Path

from refopt.errors import CheckpointError, SaveError
from refopt.io.preset_layout import STAGING_PATTERN, JOURNAL, is_preset_file

LOCK_TIMEOUT_S = 60.0

# -------------------------------------------------------------------- file-system calls
class FileSystem:
    """Every call a save makes that changes the file system (the kill-injection test wraps it)."""

    def mkdir(self, path):
        os.mkdir(path, 0o777)

    def create(self, path) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)

    def pwrite(self, fd, data, offset) -> int:
        return os.pwrite(fd, data, offset)

    def truncate(self, fd, size):
        os.ftruncate(fd, size)

    def fsync(self, fd):
        os.fsync(fd)

    def close(self, fd):
        os.close(fd)

    def replace(self, src, dst):
        os.replace(src, dst)

    def rename(self, src, dst):
        os.rename(src, dst)

    def unlink(self, path):
        os.unlink(path)

    def rmdir(self, path):
        os.rmdir(path)

    def fsync_dir(self, path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        except OSError as e:           # some file systems cannot fsync a directory
            if e.errno not in (_errno.EINVAL, _errno.ENOTSUP, _errno.EBADF):
                raise
        finally:
            os.close(fd)


fs = FileSystem()


class StagedFile(io.RawIOBase):
    """A new file in the staging directory, opened for reading and writing (h5py needs both);
    every write goes through :data:`fs`; closing it ``fsync``-s it."""

    def __init__(self, path):
        super().__init__()
        self.name = os.fspath(path)
        self._fd = fs.create(self.name)
        self._pos = 0

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def fileno(self):
        return self._fd

    def tell(self):
        return self._pos

    def seek(self, offset, whence=0):
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size + offset
        return self._pos

    def readinto(self, buffer):
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, data):
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += fs.pwrite(self._fd, view[done:], self._pos + done)
        self._pos += done
        return done

    def truncate(self, size=None):
        size = self._pos if size is None else size
        fs.truncate(self._fd, size)
        return size

    def flush(self):
        pass

    def close(self):
        if not self.closed:
            try:
                fs.fsync(self._fd)
            finally:
                fd, self._fd = self._fd, -1
                super().close()
                fs.close(fd)


# -------------------------------------------------------------------- locking
@contextlib.contextmanager
def locked(directory, wait: bool = True):
    """An exclusive ``flock`` on ``directory`` (yields False when ``wait`` is False and another
    process holds it, or when the platform has no flock)."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise SaveError(f"{directory}: another process has been saving into this "
                                    f"directory for over {LOCK_TIMEOUT_S:.0f} s", _errno.EBUSY,
                                    directory) from None
                time.sleep(0.05)
            except OSError:          # a file system without flock: carry on unlocked
                break
        yield True
    finally:
        os.close(fd)


# -------------------------------------------------------------------- the journal
def _check_rel(rel, source) -> str:
    if not isinstance(rel, str) or not is_preset_file(rel):
        raise CheckpointError(f"{source}: names {rel!r}, which is not a preset file; the journal "
                              "is not refopt's or is corrupted (remove it to keep the old files)")
    return rel


def _read_journal(directory: Path) -> dict:
    from refopt.errors import ConfigError
    from refopt.io import files

    source = directory / JOURNAL
    try:
        data = files.read_json(source, ConfigError, "save journal", max_bytes=1 << 20, max_depth=4)
    except ConfigError as e:
        raise CheckpointError(f"{e} (remove {source} to keep the old files)") from None
    if not (isinstance(data, dict) and isinstance(data.get("staging"), str)
            and STAGING_PATTERN.fullmatch(data["staging"]) and isinstance(data.get("files"), list)
            and isinstance(data.get("remove"), list)):
        raise CheckpointError(f"{source}: not a refopt save journal (remove it to keep the old "
                              "files)")
    data["files"] = [_check_rel(r, source) for r in data["files"]]
    data["remove"] = [_check_rel(r, source) for r in data["remove"]]
    if set(data["files"]) & set(data["remove"]):
        raise CheckpointError(f"{source}: a file is both written and removed; the journal is corrupted")
    return data


def roll_forward(directory: Path, journal: dict) -> None:
    """Complete a committed save: move the staged files in, delete the stale ones, then the
    staging directory and the journal.  Every step may be repeated after an interruption."""
    staging = directory / journal["staging"]
    touched = {directory}
    for rel in journal["files"]:
        src, dst = staging / rel, directory / rel
        if os.path.lexists(src):
            for parent in reversed(dst.relative_to(directory).parents[:-1]):
                if not (directory / parent).is_dir():
                    fs.mkdir(directory / parent)
                    touched.add((directory / parent).parent)
            fs.replace(src, dst)
            touched.add(dst.parent)
        elif not os.path.lexists(dst):
            raise CheckpointError(f"{directory}: the save journal lists {rel}, which is neither "
                                  "staged nor in place; the preset is incomplete")
    for d in sorted(touched, key=lambda p: len(p.parts), reverse=True):
        fs.fsync_dir(d)
    for rel in journal["remove"]:
        try:
            fs.unlink(directory / rel)
        except FileNotFoundError:
            pass
    for rel in ("assets/tokenizer", "assets"):
        if (directory / rel).is_dir() and not any(os.scandir(directory / rel)):
            fs.rmdir(directory / rel)
    remove_tree(staging)
    try:
        fs.unlink(directory / JOURNAL)
    except FileNotFoundError:
        pass
    fs.fsync_dir(directory)


def remove_tree(root: Path) -> None:
    """Remove a staging directory refopt made: its files, then its directories, bottom up."""
    if not os.path.lexists(root):
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                fs.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                fs.unlink(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    fs.rmdir(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rmdir(root)


def recover(directory) -> None:
    """Finish or clean up after an interrupted save in ``directory`` (every loader calls this).

    A committed journal is rolled forward; staging directories no save is using are removed.  When
    the directory cannot be written, a committed journal raises :class:`CheckpointError` saying
    what to do, and uncommitted staging directories are left alone (the old preset is complete)."""
    directory = Path(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    pending = JOURNAL in names
    stale = [n for n in names if STAGING_PATTERN.fullmatch(n) or n.startswith(".refopt-journal-")]
    if not pending and not stale:
        return
    try:
        with locked(directory, wait=pending) as held:
            if held:                          # else a save is staging now; nothing is committed
                recover_holding_lock(directory)
    except OSError as e:
        if os.path.lexists(directory / JOURNAL):
            raise CheckpointError(
                f"{directory}: a save into this directory was interrupted after it committed; "
                f"completing it failed ({e.strerror or e}). Load it once with write permission to "
                "finish the save (or remove .refopt-commit.json and the .refopt-save-* directory "
                "to keep the old files)") from None


def recover_holding_lock(directory: Path) -> None:
    if os.path.lexists(directory / JOURNAL):
        roll_forward(directory, _read_journal(directory))
    for name in os.listdir(directory):
        if STAGING_PATTERN.fullmatch(name):
            remove_tree(directory / name)
        elif name.startswith(".refopt-journal-"):
            fs.unlink(directory / name)
