"""Errors a user can act on. The CLI prints their one-line message and exits non-zero, never a traceback."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos of a full disk or quota


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries like ONNX Runtime raise pages), or its type."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@contextlib.contextmanager
def library_errors(what: str, fix: str, kind: type[DiffkilnError] | None = None) -> Iterator[None]:
    """An exception a library (onnx, ONNX Runtime, OpenVINO) raises inside becomes one line: `what: its first
    line; fix`. Our own errors, full disks and interrupts pass through."""
    try:
        yield
    except (DiffkilnError, KeyboardInterrupt, MemoryError):
        raise
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        raise (kind or KilnError)(f"{what}: {first_line(e)}; {fix}") from None
    except Exception as e:
        raise (kind or KilnError)(f"{what}: {first_line(e)}; {fix}") from None
