"""Errors a user can act on. The CLI prints their one-line message and exits non-zero, never a traceback."""


class DiffkilnError(Exception):
    """Base class: the message says what was wrong and what to do."""


class SourceError(DiffkilnError):
    """The model source (folder, preset, hub id) cannot be used."""


class OutputError(DiffkilnError):
    """The output location cannot be written (or already holds something we must not overwrite)."""


class ParityError(DiffkilnError):
    """An exported graph does not reproduce the PyTorch reference within the threshold."""


class KilnError(DiffkilnError):
    """A kiln directory is missing, incomplete or stale."""
