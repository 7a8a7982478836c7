"""Exceptions a user can cause.

Every error refopt raises on bad input is a subclass of :class:`RefoptError` and of the matching
built-in (``ValueError``, ``TypeError`` or ``OSError``), so ``except ValueError`` /
``except OSError`` keep working.  Messages name the file, tensor, argument or token at fault and
what was expected.
"""


class RefoptError(Exception):
    """Base class of every refopt error."""


class ConfigError(RefoptError, ValueError):
    """An unknown, missing or inconsistent configuration value."""


class CheckpointError(RefoptError, ValueError):
    """A checkpoint file or directory that cannot be read: missing, extra or misshaped tensors,
    truncated or corrupted files, non-finite weights, unsupported formats (pickles are refused,
    never unpickled)."""


class PresetNotFoundError(RefoptError, FileNotFoundError):
    """A preset name or path that does not resolve to anything on disk."""


class InputError(RefoptError, ValueError):
    """A model input with the wrong values or shapes (ids out of range, too long, mismatched mask)."""


class InputTypeError(RefoptError, TypeError):
    """A model or tokenizer input of the wrong type."""


class TokenizerError(RefoptError, ValueError):
    """A malformed vocabulary or merges file, or a token that cannot be encoded or decoded."""


class SamplerError(RefoptError, ValueError):
    """A sampler argument out of its range, an unknown sampler name, or incompatible models."""


class TrainingError(RefoptError, ValueError):
    """A problem with training data or optimizer settings, or a non-finite loss."""


class BackendError(RefoptError, ValueError):
    """An unknown backend, or one that is not available on this machine."""


class RefoptOSError(RefoptError, OSError):
    """Base of the I/O errors: an ``OSError`` whose ``errno`` is the underlying one (or None) and
    whose message is refopt's (it names the file and what went wrong)."""

    def __init__(self, message: str, errno: int | None = None, filename=None):
        super().__init__(message)
        self.errno = errno
        self.filename = None if filename is None else str(filename)

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class FileReadError(RefoptOSError):
    """A file refopt will not or cannot read: not a regular file (a directory, FIFO, socket or
    device), no permission, or an I/O error."""


class SaveError(RefoptOSError):
    """A save that failed part-way (disk full, read-only file system, no permission, I/O error).
    What was at the destination before is intact and nothing the save began is left behind
    (unless the message says the save was committed and the next load completes it)."""


class DestinationError(RefoptError, FileExistsError):
    """A save refused before anything was written: the destination is a file, holds files that are
    not part of a preset, or is the current, home or a root directory (pass ``overwrite=True`` /
    ``--force`` to write the preset's files there anyway; other files are never touched)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""
