"""Saving presets without ever losing a file.

A save writes only the files a preset consists of (:data:`PRESET_FILES`) and never deletes a file
it did not write.  :class:`PresetSave` is the one way refopt writes a preset directory::

    with PresetSave(path, overwrite=False, replaces=MODEL_FILES) as staging:
        staging.write_json("config.json", {...})
        with staging.open("model.weights.h5") as f:
            ...                                   # any binary writer (h5py, safetensors)

**Where it may write.**  Into a path that does not exist; into an empty directory; into a directory
holding only preset files (an existing KerasHub, transformers or refopt preset, which is then
replaced).  It refuses, with :class:`~refopt.errors.DestinationError` and before writing anything,
a path that is a file or a broken link, and -- unless ``overwrite=True`` -- a directory holding
any other file, ``""``, the current directory, the home directory or the root of a file system.
With ``overwrite=True`` the other files are kept: only preset files are written or replaced.

**How.**  The new files are written and ``fsync``-ed in a staging directory first.  A new preset
is then renamed into place (one atomic rename: the path holds nothing, then the whole preset).  An
existing directory is updated through a journal: ``.refopt-commit.json`` (written atomically) lists
the staged files to move in and the old preset files the new preset no longer has; once it exists
the save is committed and :func:`roll_forward` moves the files, deletes the stale ones, then the
journal.  So at every instant the directory holds the complete old preset, or the complete new one,
or a committed journal that the next load (:func:`recover`, called by every loader) completes.  A
save that fails before its commit (disk full, read-only file system, no permission) removes what
it wrote and raises :class:`~refopt.errors.SaveError`; the old preset is untouched.

Files and directories are created with modes ``0o666`` / ``0o777``, so they get the user's umask.
Every call that changes the file system goes through :data:`fs` -- the kill-injection test replaces
it to stop a save after each call in turn.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import io
import json
import os
import re
import secrets
import time
from pathlib import Path

from refopt.errors import CheckpointError, DestinationError, InputTypeError, SaveError

JOURNAL = ".refopt-commit.json"
STAGING_PREFIX = ".refopt-save-"
_STAGING = re.compile(r"\.refopt-save-[0-9a-f]{16}")
LOCK_TIMEOUT_S = 60.0

# -------------------------------------------------------------------- what a preset consists of
KERAS_MODEL_FILES = ("config.json", "model.weights.h5", "metadata.json", "task.json",
                     "model.weights.json")
HF_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                  "generation_config.json")
KERAS_TOKENIZER_FILES = ("tokenizer.json", "assets/tokenizer/vocabulary.json",
                         "assets/tokenizer/merges.txt")
KERAS_PREPROCESSOR_FILES = ("preprocessor.json",)
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                      "special_tokens_map.json", "tokenizer.json", "added_tokens.json")
REFOPT_FILES = ("MODEL_CARD.md", "refopt_training.json")
# shards: transformers' model-00001-of-00003.safetensors, Keras' model_00000.weights.h5
SHARD_PATTERNS = (re.compile(r"model-\d{5}-of-\d{5}\.safetensors"),
                  re.compile(r"model_\d{5}\.weights\.h5"))
PRESET_FILES = frozenset(KERAS_MODEL_FILES + HF_MODEL_FILES + KERAS_TOKENIZER_FILES
                         + KERAS_PREPROCESSOR_FILES + HF_TOKENIZER_FILES + REFOPT_FILES)
PRESET_DIRS = ("assets", "assets/tokenizer")

# What a save replaces: the old preset files of these kinds that it does not write are removed.
MODEL_FILES = frozenset(KERAS_MODEL_FILES + HF_MODEL_FILES) | {"<shards>"}
TOKENIZER_FILES = frozenset(KERAS_TOKENIZER_FILES)
PREPROCESSOR_FILES = frozenset(KERAS_PREPROCESSOR_FILES + KERAS_TOKENIZER_FILES)
HF_TOKENIZER = frozenset(HF_TOKENIZER_FILES)
WHOLE_PRESET = PRESET_FILES | {"<shards>"}


def is_preset_file(rel: str) -> bool:
    """Whether ``rel`` (a path relative to a preset directory, ``/``-separated) names a file a
    preset consists of."""
    return rel in PRESET_FILES or any(p.fullmatch(rel) for p in SHARD_PATTERNS)


def _in_scope(rel: str, scope) -> bool:
    return rel in scope or ("<shards>" in scope and any(p.fullmatch(rel) for p in SHARD_PATTERNS))


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


# -------------------------------------------------------------------- destination checks
def list_preset_files(directory) -> tuple[list[str], list[str]]:
    """(preset files, other entries) directly in ``directory`` and under its ``assets/``,
    as ``/``-separated relative paths (refopt's own journal and staging entries are in neither)."""
    ours, others = [], []
    for entry in os.scandir(directory):
        rel = entry.name
        if rel == JOURNAL or _STAGING.fullmatch(rel) or rel.startswith(".refopt-journal-"):
            continue
        if rel == "assets" and entry.is_dir(follow_symlinks=False):
            sub_ours, sub_others = _listing_assets(Path(entry.path))
            ours += sub_ours
            others += sub_others
        elif is_preset_file(rel) and not entry.is_dir():
            ours.append(rel)
        else:
            others.append(rel + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return ours, others


def _listing_assets(assets: Path):
    ours, others = [], []
    for entry in os.scandir(assets):
        if entry.name == "tokenizer" and entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(entry.path):
                rel = f"assets/tokenizer/{inner.name}"
                (ours if is_preset_file(rel) and not inner.is_dir() else others).append(rel)
        else:
            others.append(f"assets/{entry.name}")
    return ours, others


def _special(path: Path) -> str | None:
    """Why ``path`` is a directory no save should write into unasked, or None."""
    real = os.path.realpath(path)
    if real == os.path.realpath(os.getcwd()):
        return "is the current directory"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "is the home directory"
    if real == os.path.dirname(real) or os.path.ismount(real):
        return "is the root of a file system"
    return None


def check_destination(target, overwrite: bool = False, what: str = "preset") -> Path:
    """The directory a save of ``what`` would write, or :class:`DestinationError` saying why it
    may not (see the module docstring).  Nothing is written."""
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise InputTypeError(f"save_to_preset: the path must be a string or a path, got "
                             f"{type(target).__name__}")
    if not isinstance(overwrite, bool):
        raise InputTypeError(f"save_to_preset: overwrite={overwrite!r}; expected True or False")
    if "\0" in target:
        raise DestinationError(f"save_to_preset: the path {target!r} holds a NUL character")
    if target == "":
        if not overwrite:
            raise DestinationError("save_to_preset: the path is empty (''), which names the current "
                                   "directory; pass a directory name (or overwrite=True / --force "
                                   "to write the preset files into the current directory)")
        target = "."
    path = Path(target).expanduser()
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != _errno.ELOOP:
            raise DestinationError(f"{path}: cannot be a preset directory ({e.strerror or e})") \
                from None
    if os.path.islink(path) and not path.exists():
        raise DestinationError(f"{path} is a broken symbolic link; refopt will not replace it")
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{path} exists and is not a directory (a preset is a directory); "
                               "refopt will not replace it")
    if path.is_dir():
        why = _special(path)
        if why and not overwrite:
            raise DestinationError(f"{path} {why}; refusing to write {what} files there (pass "
                                   "overwrite=True / --force to write them anyway; other files are "
                                   "never touched)")
        try:
            _, others = list_preset_files(path)
        except OSError as e:
            raise SaveError(f"{path}: cannot list the directory ({e.strerror or e})", e.errno,
                            path) from None
        if others and not overwrite:
            shown = ", ".join(sorted(others)[:5]) + (" ..." if len(others) > 5 else "")
            raise DestinationError(f"{path} holds files that are not part of a preset ({shown}); "
                                   f"refusing to write {what} files there (pass overwrite=True / "
                                   "--force to write them anyway; those files are kept)")
    return path


# -------------------------------------------------------------------- locking
@contextlib.contextmanager
def _locked(directory, wait: bool = True):
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
            and _STAGING.fullmatch(data["staging"]) and isinstance(data.get("files"), list)
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
    _remove_tree(staging)
    try:
        fs.unlink(directory / JOURNAL)
    except FileNotFoundError:
        pass
    fs.fsync_dir(directory)


def _remove_tree(root: Path) -> None:
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
    stale = [n for n in names if _STAGING.fullmatch(n) or n.startswith(".refopt-journal-")]
    if not pending and not stale:
        return
    try:
        with _locked(directory, wait=pending) as held:
            if held:                          # else a save is staging now; nothing is committed
                _recover_holding_lock(directory)
    except OSError as e:
        if os.path.lexists(directory / JOURNAL):
            raise CheckpointError(
                f"{directory}: a save into this directory was interrupted after it committed; "
                f"completing it failed ({e.strerror or e}). Load it once with write permission to "
                "finish the save (or remove .refopt-commit.json and the .refopt-save-* directory "
                "to keep the old files)") from None


def _recover_holding_lock(directory: Path) -> None:
    if os.path.lexists(directory / JOURNAL):
        roll_forward(directory, _read_journal(directory))
    for name in os.listdir(directory):
        if _STAGING.fullmatch(name):
            _remove_tree(directory / name)
        elif name.startswith(".refopt-journal-"):
            fs.unlink(directory / name)


# -------------------------------------------------------------------- the save
class PresetSave:
    """Write a preset (or part of one: ``replaces`` says which kinds of preset files this save
    owns -- the old ones of those kinds it does not rewrite are removed) into ``target``.

    Used as a context manager, it yields itself: write files with :meth:`open`,
    :meth:`write_bytes`, :meth:`write_text` and :meth:`write_json` (paths relative to the preset,
    ``/``-separated, each a preset file name).  On a clean exit the preset is committed; on an
    exception everything written is removed."""

    def __init__(self, target, *, overwrite: bool = False, replaces=WHOLE_PRESET,
                 what: str = "preset"):
        self.target = check_destination(target, overwrite, what)
        self.replaces = frozenset(replaces)
        self.what = what
        self.written: list[str] = []
        self.directory: Path | None = None      # the staging directory, while the save runs
        self._made: list[Path] = []             # directories this save created (deepest last)
        self._lock = None
        self._existing = False
        self._committed = False

    # -- writing
    def _new_path(self, rel: str) -> Path:
        if not isinstance(rel, str) or not is_preset_file(rel):
            raise InputTypeError(f"{rel!r} is not the name of a preset file")
        if rel in self.written:
            raise InputTypeError(f"{rel} is written twice in one save")
        path = self.directory / rel
        for parent in reversed(Path(rel).parents[:-1]):
            if not (self.directory / parent).is_dir():
                fs.mkdir(self.directory / parent)
        self.written.append(rel)
        return path

    def open(self, rel: str) -> StagedFile:
        """A new staged file, open for reading and writing; closing it makes it durable."""
        return StagedFile(self._new_path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, data, newline: bool = True, **kwargs) -> None:
        kwargs.setdefault("indent", 4)
        self.write_text(rel, json.dumps(data, **kwargs) + ("\n" if newline else ""))

    # -- the protocol
    def __enter__(self) -> "PresetSave":
        try:
            self._begin()
        except OSError as e:
            self._abort()
            raise _save_error(e, self.target, "could not start the save") from None
        except BaseException:
            self._abort()
            raise
        return self

    def _begin(self):
        token = secrets.token_hex(8)
        if self.target.is_dir():
            self._existing = True
            self._lock = _locked(self.target)
            self._lock.__enter__()
            _recover_holding_lock(self.target)
            self.directory = self.target / (STAGING_PREFIX + token)
        else:
            self._existing = False
            parent = self.target.absolute().parent
            missing = []
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                fs.mkdir(d)
                self._made.append(d)
            self.directory = self.target.absolute().parent / f".{self.target.name}{STAGING_PREFIX[1:]}{token}"
        fs.mkdir(self.directory)

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self._abort()
            if isinstance(value, OSError) and not isinstance(value, (SaveError, DestinationError)):
                raise _save_error(value, self.target, f"saving the {self.what} failed") from None
            return False
        try:
            committed = self._commit()
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError) and not isinstance(e, (SaveError, DestinationError)):
                raise _save_error(e, self.target, f"saving the {self.what} failed") from None
            raise
        try:
            committed()
        except OSError as e:
            raise SaveError(f"{self.target}: the new {self.what} was saved and committed, but moving "
                            f"it into place failed ({e.strerror or e}); the next load completes "
                            "it", e.errno, self.target) from None
        finally:
            self._release()
        return False

    def _commit(self):
        """Everything up to the commit point; returns the step that completes the save."""
        self._fsync_staging()
        if not self._existing:
            try:
                fs.rename(self.directory, self.target)             # the commit point
            except OSError as e:
                if e.errno in (_errno.EEXIST, _errno.ENOTEMPTY, _errno.ENOTDIR, _errno.EISDIR):
                    raise DestinationError(f"{self.target} appeared while the {self.what} was being "
                                           "saved; nothing was changed there") from None
                raise
            self.directory = None
            self._committed = True
            return lambda: fs.fsync_dir(self.target.absolute().parent)
        for rel in self.written:
            dst = self.target / rel
            if os.path.lexists(dst) and (dst.is_dir() and not dst.is_symlink()):
                raise DestinationError(f"{dst} is a directory; refopt will not replace it with "
                                       "a file")
            for parent in Path(rel).parents[:-1]:
                p = self.target / parent
                if os.path.islink(p):
                    raise DestinationError(f"{p} is a symbolic link; refopt writes preset files "
                                           "only inside the preset directory")
                if os.path.lexists(p) and not p.is_dir():
                    raise DestinationError(f"{p} is a file where the preset needs a directory; "
                                           "refopt will not replace it")
        ours, _ = list_preset_files(self.target)
        remove = sorted(rel for rel in ours if rel not in self.written
                        and _in_scope(rel, self.replaces))
        journal = {"version": 1, "staging": self.directory.name, "files": list(self.written),
                   "remove": remove}
        tmp = self.target / f".refopt-journal-{self.directory.name[len(STAGING_PREFIX):]}"
        f = StagedFile(tmp)
        try:
            f.write((json.dumps(journal, indent=1) + "\n").encode("utf-8"))
        finally:
            f.close()
        fs.replace(tmp, self.target / JOURNAL)            # the commit point
        self._committed = True

        def finish():
            fs.fsync_dir(self.target)
            roll_forward(self.target, journal)
            self.directory = None
        return finish

    def _fsync_staging(self):
        dirs = [self.directory] + [self.directory / Path(rel).parent for rel in self.written]
        for d in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
            fs.fsync_dir(d)

    def _abort(self):
        """Remove what this save wrote (only that); best effort, the original error wins."""
        try:
            if self.directory is not None and not self._committed:
                _remove_tree(self.directory)
                if self._existing:
                    tmp = self.target / f".refopt-journal-{self.directory.name[len(STAGING_PREFIX):]}"
                    with contextlib.suppress(FileNotFoundError):
                        fs.unlink(tmp)
                self.directory = None
            for d in reversed(self._made):
                with contextlib.suppress(OSError):
                    fs.rmdir(d)
            self._made = []
        except OSError:
            pass
        finally:
            self._release()

    def _release(self):
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)


def _save_error(e: OSError, target, doing: str) -> SaveError:
    reason = {_errno.ENOSPC: "the disk is full", _errno.EDQUOT: "the disk quota is exceeded",
              _errno.EROFS: "the file system is read-only",
              _errno.EACCES: "no permission to write there",
              _errno.EPERM: "no permission to write there"}.get(e.errno, e.strerror or str(e))
    return SaveError(f"{target}: {doing}: {reason}; nothing was changed there", e.errno, target)


def write_file_atomically(path, writer) -> None:
    """Write one file at ``path`` through ``writer(binary file object)``: into a temporary file
    in the same directory, ``fsync``-ed, then renamed over ``path`` (a reader never sees half a
    file).  Refuses a ``path`` that is a directory; raises :class:`SaveError` on I/O errors."""
    path = Path(os.fspath(path))
    if path.is_dir():
        raise DestinationError(f"{path} is a directory; refopt will not replace it with a file")
    tmp = path.parent / f".{path.name}.refopt-tmp-{secrets.token_hex(8)}"
    try:
        f = StagedFile(tmp)
        try:
            writer(f)
        finally:
            f.close()
        fs.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                fs.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, (SaveError, DestinationError)):
            raise _save_error(e, path, "writing the file failed") from None
        raise
