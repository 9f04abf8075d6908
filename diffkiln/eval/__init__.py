"""Backend-independent image evaluation (numpy + Pillow only): `adherence` scores demo images against captions."""

from diffkiln.eval.adherence import ATTRIBUTES, estimate, score

__all__ = ["ATTRIBUTES", "estimate", "score"]
