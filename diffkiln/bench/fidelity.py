"""How close an image is to the reference's: PSNR, SSIM (numpy, gaussian window) and prompt adherence.

Images are float arrays [H, W, 3] in [0, 1], as both pipelines return them before rounding to uint8.
SSIM follows Wang et al. 2004 (scikit-image's `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`):
an 11-tap gaussian window, K1 = 0.01, K2 = 0.03, data range 1, the map averaged over the valid region and channels.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
PSNR_CAP_DB = 100.0  # identical images: report the cap instead of infinity, so every number stays finite


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for a data range of 1, capped at PSNR_CAP_DB."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else float(10 * np.log10(1.0 / mse))


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [H, W, C] along H then W: [H-k+1, W-k+1, C]."""
    x = np.tensordot(sliding_window_view(x, len(kernel), axis=0), kernel, axes=([-1], [0]))
    return np.tensordot(sliding_window_view(x, len(kernel), axis=1), kernel, axes=([-1], [0]))


def ssim(image: np.ndarray, reference: np.ndarray, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity of two [H, W, C] images in [0, 1] (1.0 = identical)."""
    a, b = image.astype(np.float64), reference.astype(np.float64)
    kernel = _gaussian(min(window, *a.shape[:2]), sigma)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _blur(a, kernel), _blur(b, kernel)
    var_a = _blur(a * a, kernel) - mu_a**2
    var_b = _blur(b * b, kernel) - mu_b**2
    cov = _blur(a * b, kernel) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def compare(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and the largest pixel difference (in 0..255 steps) of one batch against the reference batch."""
    return {
        "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(images, reference, strict=True)])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, reference, strict=True)])),
        "max_abs_diff_255": float(np.max(np.abs(images - reference)) * 255),
    }


def adherence(images: np.ndarray, captions: list[str]) -> dict[str, float | None]:
    """Adherence of images [N, H, W, 3] in [0, 1] to their demo captions: {<attribute>: accuracy over the captions
    naming it, "all": share of images with every named attribute right} (diffkiln.eval.adherence)."""
    from diffkiln.demo.data import parse_caption
    from diffkiln.eval.adherence import ATTRIBUTES, score

    def parses(caption: str) -> bool:
        try:
            parse_caption(caption)
        except ValueError:
            return False
        return True

    # a user's own prompts may not be demo captions: only the ones the evaluator can read are scored
    keep = [i for i, c in enumerate(captions) if parses(c)]
    if not keep:
        return {k: None for k in [*ATTRIBUTES, "all"]}
    found = score(np.asarray(images)[keep], [captions[i] for i in keep])["accuracy"]
    return {k: (None if v is None else float(v)) for k, v in found.items()}
