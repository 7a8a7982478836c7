"""Saving presets without ever losing a file.

A save writes only the files a preset consists of (:data:`~refopt.io.preset_layout.PRESET_FILES`) and never deletes a file
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
the save is committed and :func:`~refopt.io.journal.roll_forward` moves the files, deletes the stale ones, then the
journal.  So at every instant the directory holds the complete old preset, or the complete new one,
or a committed journal that the next load (:func:`~refopt.io.journal.recover`, called by every loader) completes.  A
save that fails before its commit (disk full, read-only file system, no permission) removes what
it wrote and raises :class:`~refopt.errors.SaveError`; the old preset is untouched.

Files and directories are created with modes ``0o666`` / ``0o777``, so they get the user's umask.
Every call that changes the file system goes through :data:`refopt.io.journal.fs` -- the
kill-injection test replaces it to stop a save after each call in turn.  What a preset consists of
and the destination checks live in :mod:`refopt.io.preset_layout`; the file-system calls, the
journal and :func:`~refopt.io.journal.recover` in :mod:`refopt.io.journal`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import secrets
from pathlib import Path

from refopt.errors import DestinationError, InputTypeError, SaveError
from refopt.io import journal
from refopt.io.journal import StagedFile, locked, recover_holding_lock, remove_tree, roll_forward
from refopt.io.preset_layout import (  # noqa: F401  (the scopes are PresetSave's arguments)
    HF_TOKENIZER,
    JOURNAL,
    MODEL_FILES,
    PREPROCESSOR_FILES,
    PRESET_FILES,
    STAGING_PREFIX,
    TOKENIZER_FILES,
    WHOLE_PRESET,
    check_destination,
    in_scope,
    is_preset_file,
    list_preset_files,
)


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
                journal.fs.mkdir(self.directory / parent)
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
            self._lock = locked(self.target)
            self._lock.__enter__()
            recover_holding_lock(self.target)
            self.directory = self.target / (STAGING_PREFIX + token)
        else:
            self._existing = False
            parent = self.target.absolute().parent
            missing = []
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                journal.fs.mkdir(d)
                self._made.append(d)
            self.directory = self.target.absolute().parent / f".{self.target.name}{STAGING_PREFIX[1:]}{token}"
        journal.fs.mkdir(self.directory)

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
                journal.fs.rename(self.directory, self.target)             # the commit point
            except OSError as e:
                if e.errno in (_errno.EEXIST, _errno.ENOTEMPTY, _errno.ENOTDIR, _errno.EISDIR):
                    raise DestinationError(f"{self.target} appeared while the {self.what} was being "
                                           "saved; nothing was changed there") from None
                raise
            self.directory = None
            self._committed = True
            return lambda: journal.fs.fsync_dir(self.target.absolute().parent)
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
                        and in_scope(rel, self.replaces))
        record = {"version": 1, "staging": self.directory.name, "files": list(self.written),
                   "remove": remove}
        tmp = self.target / f".refopt-journal-{self.directory.name[len(STAGING_PREFIX):]}"
        f = StagedFile(tmp)
        try:
            f.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))
        finally:
            f.close()
        journal.fs.replace(tmp, self.target / JOURNAL)            # the commit point
        self._committed = True

        def finish():
            journal.fs.fsync_dir(self.target)
            roll_forward(self.target, record)
            self.directory = None
        return finish

    def _fsync_staging(self):
        dirs = [self.directory] + [self.directory / Path(rel).parent for rel in self.written]
        for d in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
            journal.fs.fsync_dir(d)

    def _abort(self):
        """Remove what this save wrote (only that); best effort, the original error wins."""
        try:
            if self.directory is not None and not self._committed:
                remove_tree(self.directory)
                if self._existing:
                    tmp = self.target / f".refopt-journal-{self.directory.name[len(STAGING_PREFIX):]}"
                    with contextlib.suppress(FileNotFoundError):
                        journal.fs.unlink(tmp)
                self.directory = None
            for d in reversed(self._made):
                with contextlib.suppress(OSError):
                    journal.fs.rmdir(d)
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
        journal.fs.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                journal.fs.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, (SaveError, DestinationError)):
            raise _save_error(e, path, "writing the file failed") from None
        raise
