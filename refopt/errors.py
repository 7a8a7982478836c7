"""Exceptions a user can cause.

Every error refopt raises on bad input is a subclass of :class:`RefoptError` and of the matching
built-in (``ValueError`` or ``TypeError``), so ``except ValueError`` keeps working.  Messages name
the file, tensor, argument or token at fault and what was expected.
"""


class RefoptError(Exception):
    """Base class of every refopt error."""


class ConfigError(RefoptError, ValueError):
    """An unknown, missing or inconsistent configuration value."""


class CheckpointError(RefoptError, ValueError):
    """A checkpoint file or directory that cannot be read: missing, extra or misshaped tensors,
    truncated or corrupted files, unsupported formats (pickles are refused, never unpickled)."""


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
