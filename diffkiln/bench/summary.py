"""From raw per-call timings and images to the report's figures: latency per stage, speedup, efficiency, fidelity.

Definitions (all medians over the measured generations: runs × prompts):
- stages: text encoding, UNet (all steps), VAE decode, and "other" = end to end minus those three (scheduler
  arithmetic, tokenizing, image post-processing); per-step UNet latency is the median over every step's call.
- it/s: denoising steps per second of UNet time, as `diffkiln run` and A1111 print it.
- the "unet" figures are the denoiser's: the UNet, or Flux's transformer (report["subject"]["denoiser"]).
- achieved FLOP/s: the UNet's counted FLOPs per call × calls per generation / UNet time; "of peak" divides it by
  this machine's measured GEMM peak in the path's precision (fp32: best of numpy and torch; bf16: torch bf16).
- fidelity: each image against the reference path's image for the same prompt and initial noise.
"""

from __future__ import annotations

import numpy as np

from diffkiln.bench import fidelity
from diffkiln.bench.measure import stats
from diffkiln.bench.paths import REFERENCE
from diffkiln.bench.session import PathRun
from diffkiln.models import is_demo_model


def latency(samples: list[dict]) -> dict:
    """Per-stage statistics over measured generations."""
    unet_total = [sum(s["unet_steps"]) for s in samples]
    other = [
        max(0.0, s["total"] - s["text_encoding"] - u - s["vae_decode"])
        for s, u in zip(samples, unet_total, strict=True)
    ]
    return {
        "text_encoding": stats([s["text_encoding"] for s in samples]),
        "unet_total": stats(unet_total),
        "unet_per_step": stats([t for s in samples for t in s["unet_steps"]]),
        "vae_decode": stats([s["vae_decode"] for s in samples]),
        "other": stats(other),
        "total": stats([s["total"] for s in samples]),
    }


def peak_for(precision: str, machine: dict) -> float | None:
    flops = machine.get("flops", {})
    if precision == "fp32":
        return max((v for k, v in flops.items() if k.endswith("fp32")), default=None)
    return flops.get(f"torch_{precision}")


def efficiency(run: PathRun, samples: list[dict], flops: dict, machine: dict, denoiser: str = "unet") -> dict:
    """Achieved FLOP/s of the denoiser (`unet`, or Flux's `transformer`) and the VAE decoder, and the denoiser's
    share of the measured GEMM peak (the keys say "unet" for either)."""
    per_call = flops.get("per_call")
    if not per_call or denoiser not in per_call:
        return {"reason": flops.get("reason", "FLOPs were not counted")}
    step = per_call[denoiser]
    unet = float(np.median([step * len(s["unet_steps"]) / sum(s["unet_steps"]) for s in samples]))
    vae = float(np.median([per_call["vae_decoder"] / s["vae_decode"] for s in samples if s["vae_decode"] > 0]))
    result = {"unet_gflop_per_call": step / 1e9, "unet_flops_per_s": unet, "vae_flops_per_s": vae}
    peak = peak_for(run.definition.precision, machine)
    if run.load.get("device", "cpu") != "cpu":
        result["reason"] = "runs on a GPU: no GPU peak was measured"
    elif peak:
        result.update(peak_flops_per_s=peak, unet_fraction_of_peak=unet / peak)
    else:
        result["reason"] = f"no {run.definition.precision} GEMM peak was measured"
    return result


def fidelity_against(run: PathRun, reference: PathRun | None, deterministic: bool) -> dict:
    if run.name == REFERENCE:
        return {"reference": True}
    if reference is None or not reference.images:
        return {"reason": f"{REFERENCE} did not run, so there is no reference image"}
    pairs = [(run.images[i], reference.images[i]) for i in sorted(run.images) if i in reference.images]
    if not pairs:
        return {"reason": "no prompt produced an image on both paths"}
    per_prompt = [fidelity.compare(images, ref) for images, ref in pairs]
    result = {
        "psnr_db": float(np.mean([p["psnr_db"] for p in per_prompt])),
        "psnr_db_min": float(min(p["psnr_db"] for p in per_prompt)),
        "ssim": float(np.mean([p["ssim"] for p in per_prompt])),
        "ssim_min": float(min(p["ssim"] for p in per_prompt)),
        "max_abs_diff_255": float(max(p["max_abs_diff_255"] for p in per_prompt)),
        "images_compared": int(sum(len(images) for images, _ in pairs)),
    }
    if not deterministic:
        result["note"] = "stochastic sampler: the paths draw different step noise, so the images differ by design"
    return result


def adherence_scores(runs: list[PathRun], prompts: tuple[str, ...], refs: tuple[str | None, ...]) -> dict:
    """Prompt adherence per path (demo model only: `refs` are the model's ref and source), or why there is none."""
    if not is_demo_model(*refs):
        return {"reason": "n/a: prompt adherence is scored for the demo model only"}
    scores = {}
    for run in runs:
        if not run.images:
            continue
        order = sorted(run.images)
        images = np.concatenate([run.images[i] for i in order])
        captions = [prompts[i] for i in order for _ in range(len(run.images[i]))]
        scores[run.name] = fidelity.adherence(images, captions)
    return {"scores": scores}


def path_summary(run: PathRun, reference: PathRun | None, session, config) -> dict:
    d = run.definition
    entry = {
        "status": run.status,
        "reason": run.reason,
        "description": d.description,
        "backend": d.backend,
        "precision": d.precision,
        "kiln_dir": str(run.kiln_dir) if run.kiln_dir else None,
        "one_off": run.one_off,
        "load": run.load,
        "memory": run.memory,
    }
    if run.status != "ok" or not run.samples:
        return entry
    lat = latency(run.samples)
    steps = len(run.samples[0]["unet_steps"])
    entry.update(
        latency=lat,
        it_per_s=steps / lat["unet_total"]["median"],
        images_per_s=config.batch / lat["total"]["median"],
        efficiency=efficiency(run, run.samples, session.flops, session.machine, session.subject.info.denoiser),
        fidelity=fidelity_against(run, reference, config.deterministic),
        samples=run.samples,
    )
    if reference is not None and reference.samples:
        ref = latency(reference.samples)
        entry["speedup"] = {
            "end_to_end": ref["total"]["median"] / lat["total"]["median"],
            "unet": ref["unet_total"]["median"] / lat["unet_total"]["median"],
        }
    return entry


def summarize_paths(session, config) -> dict:
    reference = next((r for r in session.runs if r.name == REFERENCE and r.status == "ok"), None)
    return {run.name: path_summary(run, reference, session, config) for run in session.runs}
