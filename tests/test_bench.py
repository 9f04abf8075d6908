"""`diffkiln bench`: every requested path measured or explained, the three kinds of output, finite numbers, and
fidelity that proves every path got the same prompts, noise and sampler. No speed is asserted."""

import json
import math
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from diffkiln.bench import click_options, run_bench
from diffkiln.bench.config import BenchConfig, jobs, read_prompts
from diffkiln.bench.fidelity import PSNR_CAP_DB, psnr, ssim
from diffkiln.bench.paths import PATHS, parse_paths, skip_reason
from diffkiln.bench.session import BenchSession, PathRun
from diffkiln.bench.summary import adherence_scores
from diffkiln.bench.workers import Worker, WorkerError
from diffkiln.errors import DiffkilnError

REQUESTED = ["torch-fp32", "torch-bf16", "ort-fp32", "ort-opt", "ort-fp16", "trt-fp16", "openvino-fp32", "ort-sdopt"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The acceptance run: the tiny preset (exported into a private cache) through six requested paths."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFKILN_CACHE", str(tmp_path_factory.mktemp("cache")))
        report = run_bench("tiny", REQUESTED, height=64, width=64, steps=3, runs=2, report_dir=out, log=lambda _: None)
    return report, out


def test_writes_markdown_json_plots_and_images(bench):
    _, out = bench
    assert (out / "report.md").read_text().startswith("# diffkiln bench: tiny")
    assert json.loads((out / "report.json").read_text())["format"] == "diffkiln-bench/1"
    pytest.importorskip("matplotlib")
    for name in ("latency.png", "speed_vs_fidelity.png", "image_grid.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "images" / "torch-fp32" / "p0-0.png").is_file()


def test_every_number_in_report_json_is_finite(bench):
    _, out = bench

    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}")

    numbers = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers.append(value)

    walk(json.loads((out / "report.json").read_text(), parse_constant=refuse))
    assert numbers and all(math.isfinite(x) for x in numbers)


def test_every_requested_path_is_measured_or_explained(bench):
    report, _ = bench
    assert list(report["paths"]) == REQUESTED
    for name, path in report["paths"].items():
        if path["status"] == "ok":
            assert path["latency"]["total"]["n"] == 2 * 2, name  # 2 runs × 2 prompts
            assert len(path["samples"][0]["unet_steps"]) == 3
            assert path["memory"]["peak"] > 0 and path["it_per_s"] > 0
        else:
            assert path["status"] in ("skipped", "failed") and path["reason"], name
    for name in ("torch-fp32", "ort-fp32", "ort-opt", "ort-fp16"):
        assert report["paths"][name]["status"] == "ok", report["paths"][name]["reason"]
    # fp16 (calibrated on the pipeline, tiny's random weights) draws torch's image closely; fp32 paths identically
    assert report["paths"]["ort-fp16"]["fidelity"]["psnr_db"] >= 35
    assert (
        report["paths"]["ort-fp16"]["one_off"]["artifact_bytes"]
        < report["paths"]["ort-opt"]["one_off"]["artifact_bytes"]
    )
    if not report["environment"]["gpus"]:
        assert "no NVIDIA GPU" in report["paths"]["trt-fp16"]["reason"]


def test_peer_paths_run_or_say_why(bench):
    """OpenVINO (f32 hint) on the plain export gives diffkiln's ORT image; the peer optimizer (ortx.py) runs or
    is reported failed with its one-line reason, never a crash of the bench."""
    report, _ = bench
    openvino = report["paths"]["openvino-fp32"]
    if openvino["status"] == "ok":
        assert openvino["fidelity"]["psnr_db"] >= 40
    else:
        assert "pip install diffkiln[openvino]" in openvino["reason"]
    sdopt = report["paths"]["ort-sdopt"]
    assert (sdopt["status"] == "ok" and sdopt["fidelity"]["psnr_db"] >= 40) or sdopt["reason"], sdopt


def test_same_prompts_noise_and_sampler_on_every_path(bench):
    """diffkiln's images match the diffusers reference's: the bench fed both the same latents and scheduler."""
    report, _ = bench
    for name in ("ort-fp32", "ort-opt"):
        assert report["paths"][name]["fidelity"]["psnr_db"] >= 40
        assert report["paths"][name]["speedup"]["end_to_end"] > 0
    assert report["paths"]["torch-fp32"]["fidelity"] == {"reference": True}
    assert report["flops"]["per_call"]["unet"] > 0
    assert report["machine_peak"]["flops"]["numpy_fp32"] > 0


def test_kiln_dir_source_batch_and_prompts_file(tiny_kiln, tmp_path):
    """A kiln directory rebuilds its reference from the manifest's source; batch 2, DDIM, prompts from a file,
    one path resident at a time."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red circle\n\n")
    report = run_bench(
        str(tiny_kiln),
        "torch-fp32,ort-fp32",
        steps=2,
        batch=2,
        scheduler="ddim",
        prompts=read_prompts(prompts),
        runs=1,
        warmup=0,
        one_at_a_time=True,
        report_dir=tmp_path / "report",
        log=lambda _: None,
    )
    assert report["subject"]["source"] == "tiny"
    assert report["config"]["prompts"] == ["a red circle"]
    fid = report["paths"]["ort-fp32"]["fidelity"]
    assert fid["images_compared"] == 2 and fid["psnr_db"] >= 40
    assert report["paths"]["ort-fp32"]["load"]["loads"] == 1 and report["config"]["one_at_a_time"]


def test_folder_source_runs_the_reference(tiny_folder, tmp_path):
    report = run_bench(
        str(tiny_folder), ["torch-fp32"], steps=2, runs=1, warmup=0, report_dir=tmp_path, log=lambda _: None
    )
    assert report["paths"]["torch-fp32"]["status"] == "ok"
    assert report["flops"]["per_call"]["vae_decoder"] > 0


class StubWorker:
    """Stands in for a worker process: records the order of calls, fails on its `fail_at`-th call."""

    def __init__(self, name, order, fail_at=None):
        self.name, self.order, self.fail_at, self.n = name, order, fail_at, 0

    def call(self, op, **kw):
        self.n += 1
        if self.n == self.fail_at:
            raise WorkerError("boom")
        self.order.append((self.name, kw["i"]))
        return kw["i"]

    def close(self):
        return {"peak": 10 * self.n}


def _stub_session(names, one_at_a_time=False):
    session = BenchSession.__new__(BenchSession)
    session.log, session.one_at_a_time = (lambda _: None), one_at_a_time
    session.runs = [PathRun(PATHS[n], status="ok") for n in names]
    return session


def test_interleaves_paths_call_by_call():
    """Round r sends call i to every active path (A B C A B C …); a path that fails drops out, the rest go on."""
    order = []
    session = _stub_session(["torch-fp32", "ort-fp32", "ort-opt"])
    for run, fail_at in zip(session.runs, (None, None, 3), strict=True):
        run.worker = StubWorker(run.name, order, fail_at)
    results = list(session.interleaved([("x", {"i": 0}), ("x", {"i": 1})], runs=1, warmup=1, settle=0))
    assert order == [
        ("torch-fp32", 0),
        ("ort-fp32", 0),
        ("ort-opt", 0),
        ("torch-fp32", 1),
        ("ort-fp32", 1),
        ("ort-opt", 1),
        ("torch-fp32", 0),
        ("ort-fp32", 0),  # ort-opt's third call failed: it is out from here on
        ("torch-fp32", 1),
        ("ort-fp32", 1),
    ]
    assert [measured for *_, measured in results] == [False] * 6 + [True] * 4
    assert session.runs[2].status == "failed" and "boom" in session.runs[2].reason


def test_one_at_a_time_brings_each_path_up_per_round():
    """One path resident: each round, each path is started, warmed up, run through every call and closed."""
    order = []
    session = _stub_session(["torch-fp32", "ort-fp32"], one_at_a_time=True)

    def bring_up(runs):
        for run in runs:
            run.worker = StubWorker(run.name, order)

    session._bring_up = bring_up
    calls = [("x", {"i": 0}), ("x", {"i": 1})]
    results = list(session.interleaved(calls, runs=2, warmup=1, settle=0))
    one_life = [0, 1, 0, 1]  # warm-up pass, then the measured pass
    assert order == [(name, i) for _ in range(2) for name in ("torch-fp32", "ort-fp32") for i in one_life]
    assert [measured for *_, measured in results] == [False, False, True, True] * 4
    assert all(r.worker is None and r.memory == {"peak": 40} for r in session.runs)


def test_a_worker_that_dies_is_reported_not_fatal():
    worker = Worker("victim", "tools").start()
    worker.ready()
    worker.proc.kill()  # our own child: as the kernel's OOM killer would
    with pytest.raises(WorkerError, match="victim worker died from signal 9"):
        worker.call("caps")
    assert worker.close() is not None


def test_skip_reasons(monkeypatch):
    caps = {"torch": True, "diffusers": True, "openvino": False, "tensorrt": False, "gpus": [], "source": "tiny"}
    caps |= {"kiln": True, "ort_precisions": ["fp32"], "torch_bf16": True, "native_bf16": False}
    assert skip_reason(PATHS["torch-fp32"], caps) is None
    assert "no native bf16" in skip_reason(PATHS["torch-bf16"], caps)
    assert skip_reason(PATHS["torch-bf16"], {**caps, "native_bf16": True}) is None
    assert "has not landed yet" in skip_reason(PATHS["ort-int8"], caps)
    from diffkiln.runtime import backends

    real = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda n: None if n == "openvino" else real(n))
    assert "pip install diffkiln[openvino]" in skip_reason(PATHS["openvino-fp32"], caps)  # from the backend table
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda n: object() if n == "openvino" else real(n))
    assert skip_reason(PATHS["openvino-fp32"], caps) is None
    assert "no native bf16" in skip_reason(PATHS["openvino-bf16"], caps)
    assert skip_reason(PATHS["openvino-bf16"], {**caps, "native_bf16": True}) is None
    assert "no NVIDIA GPU" in skip_reason(PATHS["trt-fp16"], caps)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda n: None if n == "tensorrt" else real(n))
    assert "pip install diffkiln[tensorrt]" in skip_reason(PATHS["trt-int8"], {**caps, "gpus": ["H100"]})
    no_source = {**caps, "source": None, "source_problem": "the kiln directory's source 'x' (folder) is gone"}
    assert "is gone" in skip_reason(PATHS["torch-fp32"], no_source)


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(DiffkilnError, match="unknown bench path ort-fast"):
        parse_paths("torch-fp32,ort-fast")
    with pytest.raises(DiffkilnError, match="unknown scheduler"):
        run_bench("tiny", ["ort-fp32"], scheduler="plms", report_dir=tmp_path, log=lambda _: None)
    with pytest.raises(DiffkilnError, match="unknown bench kind 'micro'; choose one of generate, components"):
        run_bench("tiny", ["ort-fp32"], kind="micro", report_dir=tmp_path, log=lambda _: None)
    with pytest.raises(DiffkilnError, match="--height 60 must be a positive multiple of 8"):
        BenchConfig(height=60).check()
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(DiffkilnError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_jobs_share_seeded_noise():
    config = BenchConfig(height=64, width=128, batch=2, prompts=("a", "b"), seed=7)
    a, b = jobs(config, 4)
    assert a.latents.shape == (2, 4, 8, 16)
    assert np.array_equal(a.latents, np.random.default_rng(7).standard_normal((2, 4, 8, 16), dtype=np.float32))
    assert not np.array_equal(a.latents, b.latents)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((24, 20, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert psnr(a, a) == PSNR_CAP_DB and ssim(a, a) == pytest.approx(1.0)
    assert 20 < psnr(a, b) < 30 and 0 < ssim(a, b) < 1
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    assert ssim(a, b) == pytest.approx(_ssim_brute_force(a, b), rel=1e-9)


def _ssim_brute_force(a, b, size=11, sigma=1.5):
    """SSIM by an explicit loop over every 11×11 window: checks the separable numpy version."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(a.shape[2]):
        for i in range(a.shape[0] - size + 1):
            for j in range(a.shape[1] - size + 1):
                pa, pb = a[i : i + size, j : j + size, c], b[i : i + size, j : j + size, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                cov = (w * pa * pb).sum() - ma * mb
                c1, c2 = 0.01**2, 0.03**2
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_adherence_is_scored_for_the_demo_model_only():
    """Perfect demo images (rendered from their captions) score 100% through diffkiln.eval.adherence."""
    from diffkiln.demo.data import caption_of, heldout_scenes, render

    scenes = heldout_scenes()[:3]
    prompts = tuple(caption_of(scene) for scene in scenes)
    run = PathRun(PATHS["ort-fp32"], status="ok")
    run.images = {i: render(scene)[None].astype(np.float32) / 255 for i, scene in enumerate(scenes)}
    scores = adherence_scores([run], prompts, ("demo", None))["scores"]["ort-fp32"]
    assert scores["all"] == 1.0 and scores["color"] == 1.0
    wrong = PathRun(PATHS["ort-opt"], status="ok")  # caption 0 gets caption 1's image: size and position wrong
    wrong.images = {0: run.images[1], 1: run.images[1], 2: run.images[2]}
    assert adherence_scores([wrong], prompts, ("demo", None))["scores"]["ort-opt"]["all"] == 2 / 3
    assert "demo model only" in adherence_scores([run], prompts, ("tiny", "tiny"))["reason"]


def test_click_options_parse_into_bench_arguments():
    seen = {}

    @click.command()
    @click.argument("source", required=False)
    @click_options
    def bench(source, **options):
        seen.update(options, source=source)

    result = CliRunner().invoke(bench, ["sd15", "--paths", "torch-fp32,ort-opt", "--height", "256", "--runs", "2"])
    assert result.exit_code == 0, result.output
    assert seen["source"] == "sd15" and seen["paths"] == "torch-fp32,ort-opt"
    assert seen["height"] == 256 and seen["runs"] == 2 and seen["warmup"] == 1 and seen["prompts_file"] is None
    assert seen["one_at_a_time"] is False


def test_importing_bench_loads_no_torch_or_matplotlib():
    import subprocess

    code = "import sys, diffkiln.bench; print([m for m in ('torch', 'diffusers', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_components_kind_times_each_component_on_every_path(tmp_path, monkeypatch):
    """`--kind components`: one UNet step and one VAE decode per path, interleaved, with speedups against torch."""
    monkeypatch.setenv("DIFFKILN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "micro"
    paths = ["torch-fp32", "ort-fp32", "ort-opt", "trt-fp16"]
    report = run_bench("tiny", paths, kind="components", height=64, width=64, runs=3, report_dir=out, log=print)
    assert json.loads((out / "report.json").read_text())["format"] == "diffkiln-bench-components/1"
    assert report["config"]["kind"] == "components" and report["paths"]["trt-fp16"]["status"] == "skipped"
    for component in ("unet", "vae_decoder"):
        rows = report["components"][component]["paths"]
        assert list(rows) == ["torch-fp32", "ort-fp32", "ort-opt"]
        assert all(r["latency"]["n"] == 3 and r["latency"]["min"] > 0 for r in rows.values())
        assert rows["torch-fp32"]["speedup"] == pytest.approx(1.0)
        assert report["components"][component]["gflop_per_call"] > 0
    text = (out / "report.md").read_text()
    assert text.startswith("# diffkiln bench, one call per component: tiny, 64×64, batch 1 (UNet on 2·batch rows")
    assert "| unet | `ort-opt` |" in text and "- `trt-fp16`: skipped: " in text and "## Method" in text


def test_method_text_is_written_from_the_constants(monkeypatch):
    from diffkiln.bench import report

    assert "cut to 2 steps" in report.method()["interleaving"] and "a 0.2 s pause" in report.method()["interleaving"]
    monkeypatch.setattr(report, "WARMUP_STEPS", 3)
    monkeypatch.setattr(report, "SETTLE_S", 0.5)
    monkeypatch.setattr(report, "GEMM_REPEATS", 9)
    text = report.method()
    assert "cut to 3 steps" in text["interleaving"] and "a 0.5 s pause" in text["interleaving"]
    assert text["peak"].startswith("best of 9 square GEMMs") and "capped at 100 dB" in text["fidelity"]


# ---- Flux: the transformer as the denoiser, distilled guidance, flow-matching Euler ------------------------------

FLUX_REQUESTED = ["torch-fp32", "ort-fp32", "ort-opt", "openvino-fp32", "ort-sdopt"]


@pytest.fixture(scope="module")
def flux_cache(tmp_path_factory):
    """One private cache for the Flux benches: tiny-flux is exported and optimized once."""
    return tmp_path_factory.mktemp("flux-cache")


@pytest.fixture(scope="module")
def flux_bench(tmp_path_factory, flux_cache):
    """tiny-flux through the reference, ORT (plain and optimized), OpenVINO and the SD-only peer optimizer."""
    out = tmp_path_factory.mktemp("flux-bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFKILN_CACHE", str(flux_cache))
        report = run_bench("tiny-flux", FLUX_REQUESTED, height=64, width=64, steps=3, runs=2, report_dir=out,
                           log=lambda _: None)  # fmt: skip
    return report, out


def test_flux_bench_paths_reproduce_diffusers_flux_pipeline(flux_bench):
    """Every ONNX path draws diffusers' FluxPipeline image from the same packed latents and distilled guidance."""
    report, _ = flux_bench
    assert list(report["paths"]) == FLUX_REQUESTED
    assert report["subject"]["kind"] == "flux" and report["subject"]["denoiser"] == "transformer"
    assert report["config"]["guidance"] == 3.5 and report["config"]["cfg"] is False
    for name in ("torch-fp32", "ort-fp32", "ort-opt"):
        path = report["paths"][name]
        assert path["status"] == "ok", path["reason"]
        assert path["latency"]["total"]["n"] == 2 * 2 and len(path["samples"][0]["unet_steps"]) == 3
        assert path["memory"]["peak"] > 0 and path["efficiency"]["unet_flops_per_s"] > 0
    for name in ("ort-fp32", "ort-opt"):
        assert report["paths"][name]["fidelity"]["psnr_db"] >= 40, name
    openvino = report["paths"]["openvino-fp32"]
    assert openvino["fidelity"]["psnr_db"] >= 40 if openvino["status"] == "ok" else openvino["reason"]
    assert report["paths"]["ort-sdopt"]["status"] == "skipped" and "no Flux" in report["paths"]["ort-sdopt"]["reason"]
    assert report["flops"]["per_call"]["transformer"] > 0 and report["flops"]["unet_rows"] == 1


def test_flux_report_names_the_transformer_stage(flux_bench):
    _, out = flux_bench
    text = (out / "report.md").read_text()
    assert text.startswith("# diffkiln bench: tiny-flux (flux)") and "guidance 3.5" in text
    assert "| transformer total ms | transformer/step ms |" in text and "UNet" not in text.split("## Method")[0]
    assert (out / "images" / "ort-opt" / "p1-0.png").is_file()


def test_flux_settings_are_checked_before_any_work(tmp_path):
    from diffkiln.bench.torch_ref import build_pipeline
    from diffkiln.exporter import open_source

    flux, sd = open_source("tiny-flux").info, open_source("tiny").info
    assert BenchConfig().fitted(flux, 64).guidance == 3.5 and BenchConfig().fitted(sd, 64).guidance == 7.5
    assert BenchConfig(guidance=2.0).fitted(flux, 64).guidance == 2.0 and not BenchConfig().fitted(flux, 64).cfg
    assert jobs(BenchConfig().fitted(flux, 64), flux.latent_channels)[0].latents.shape == (1, 4, 8, 8)
    with pytest.raises(DiffkilnError, match="Flux samples with flow-matching Euler: use --sampler euler, not ddim"):
        run_bench("tiny-flux", ["torch-fp32"], scheduler="ddim", report_dir=tmp_path, log=lambda _: None)
    with pytest.raises(DiffkilnError, match="--width 72 must be a multiple of 16 for Flux"):
        run_bench("tiny-flux", ["ort-fp32"], width=72, report_dir=tmp_path, log=lambda _: None)
    with pytest.raises(DiffkilnError, match="flow-matching Euler"):
        build_pipeline("tiny-flux", "ddim")


def test_flux_components_kind_times_the_transformer(tmp_path, monkeypatch, flux_cache):
    monkeypatch.setenv("DIFFKILN_CACHE", str(flux_cache))
    out = tmp_path / "micro"
    report = run_bench("tiny-flux", ["torch-fp32", "ort-opt"], kind="components", height=64, width=128, runs=2,
                       report_dir=out, log=lambda _: None)  # fmt: skip
    assert list(report["components"]) == ["transformer", "vae_decoder"]
    for summary in report["components"].values():
        assert list(summary["paths"]) == ["torch-fp32", "ort-opt"] and summary["gflop_per_call"] > 0
    text = (out / "report.md").read_text()
    assert "batch 1, median" in text and "| transformer | `ort-opt` |" in text  # no CFG rows: distilled guidance


def test_flux_folder_source_runs_the_reference_with_its_t5_length(tmp_path, monkeypatch, flux_cache):
    """A FluxPipeline folder: diffusers loads it (its own scheduler), T5 runs at the folder's 512 tokens on both
    sides, and FLOPs come from its configs."""
    from diffkiln.exporter import open_source
    from diffkiln.exporter.sources import save_as_folder

    monkeypatch.setenv("DIFFKILN_CACHE", str(flux_cache))
    folder = save_as_folder(open_source("tiny-flux"), tmp_path / "flux-folder")
    report = run_bench(str(folder), "torch-fp32,ort-fp32", steps=2, runs=1, warmup=0, report_dir=tmp_path / "r",
                       log=lambda _: None)  # fmt: skip
    assert report["paths"]["ort-fp32"]["fidelity"]["psnr_db"] >= 40, report["paths"]["ort-fp32"]
    assert report["flops"]["per_call"]["text_encoder_2"] > 0
