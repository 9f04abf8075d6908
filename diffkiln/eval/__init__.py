"""Backend-independent image evaluation (numpy + Pillow only): `adherence` scores demo images against captions."""

from diffkiln.eval.adherence import ATTRIBUTES, background_share, estimate, score

__all__ = ["ATTRIBUTES", "background_share", "estimate", "score"]
