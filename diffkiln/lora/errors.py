"""The one error type of LoRA folding: a bad LoRA, embedding or payload file, named with what to do about it."""

from diffkiln.errors import DiffkilnError


class LoraError(DiffkilnError):
    """A LoRA, textual-inversion embedding or refit payload cannot be used with this kiln directory."""
