"""Real-time figures of recon-stream (docs/real-time.md), each written with its machine record.

    online   the cost of being real time: every test-image trial of each session's runs after the first, its
             online beta (the stream's LSS estimate, z-scored with the session's first run as calibration) and its
             offline GLM beta (the session's betas file, z-scored over the session as recon-prepare does), both
             reconstructed by one model with the same seeds and scored against the image seen; a contact sheet.
    latency  the stream at real-time pace (--speed 1) over one replayed run per preset, the live viewer open in
             headless Chromium: per trial, from the arrival of the volume completing its window to the stage-1
             and final PNGs on disk and on the page; p50/p95 and each step's share.

    python -m brainrecon.benchmarks.stream online --nsd-root data/sim-demo-ts --model-dir engines/subj01-ts \
        --data data/subj01-ts --out benchmarks/results/stream/online
    python -m brainrecon.benchmarks.stream latency --nsd-root data/sim-demo-ts --model-dir engines/subj01 \
        --out benchmarks/results/stream/latency
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.benchmarks.common import machine
from brainrecon.data import layout
from brainrecon.errors import InputError
from brainrecon.io import load_npy, read_json, write_json, write_text

SHEET_TRIALS = 12


# ----------------------------------------------------------------------------------------------- online vs offline


def session_runs(root: Path, subject: int) -> dict[int, list[int]]:
    """{session: [run, ...]} of the time series present, consecutive from session 1 and run 1."""
    found: dict[int, list[int]] = {}
    session = 1
    while layout.timeseries_path(root, subject, session, 1).is_file():
        runs = [1]
        while layout.timeseries_path(root, subject, session, runs[-1] + 1).is_file():
            runs.append(runs[-1] + 1)
        found[session] = runs
        session += 1
    if not found:
        raise InputError(
            layout.timeseries_path(root, subject, 1, 1), "time series (recon-sim --timeseries)", "none"
        )
    return found


def collect_betas(
    root: Path, subject: int, model_dir: Path, test_stim_ids: np.ndarray, sessions: int | None = None
) -> dict[str, Any]:
    """The online and offline model inputs of every test-image trial in runs 2.. of each session.

    Online: serve/stream.py's estimator over each run, at once; z-scored with the online betas of the session's
    run 1 (the calibration recon-stream --calibrate makes). Offline: the session's betas file (the offline GLM over
    whole runs), masked and z-scored over the session's trials, then the model's voxel statistics (recon-prepare's
    steps, `Preprocessing.apply`). Trials whose image is not in the model's test set, or that the stream could not
    estimate, are left out (counted)."""
    from brainrecon.data.nsd import load_design, open_session, read_session
    from brainrecon.runtime.inputs import Preprocessing
    from brainrecon.serve.stream import (
        Calibration,
        RunDesign,
        StreamConfig,
        _run_tr,
        normalise,
        online_betas,
    )

    prep = Preprocessing(model_dir)
    design = load_design(root, subject)
    config = StreamConfig()
    row_of = {int(s): i for i, s in enumerate(test_stim_ids)}
    mask = prep.mask()
    online, offline, psc_r, trials = [], [], [], []
    skipped = {"not in the test set": 0, "not estimated online": 0}
    runs_of = session_runs(root, subject)
    for session in list(runs_of)[:sessions]:
        path = layout.session_path(root, subject, session)
        session_psc = read_session(open_session(path, prep.grid, None), path, mask, 50)  # (T, V)
        session_x = prep.apply(session_psc)
        offset = 0
        calibration = None
        for run in runs_of[session]:
            run_path = layout.timeseries_path(root, subject, session, run)
            run_design = RunDesign.read(layout.run_design_path(root, subject, session, run))
            betas = online_betas(run_path, run_design, prep, _run_tr(run_path, None), config)
            if run == 1:
                calibration = Calibration.from_betas(np.stack([betas[t] for t in sorted(betas)]), {})
            else:
                for t, ten_k in enumerate(run_design.ten_k_ids):
                    stim = int(design.subjectim[subject - 1, ten_k - 1]) - 1
                    if stim not in row_of:
                        skipped["not in the test set"] += 1
                        continue
                    if t not in betas:
                        skipped["not estimated online"] += 1
                        continue
                    row = offset + t  # the trial's volume in the session's betas file
                    online.append(normalise(betas[t], prep, calibration)[0])
                    offline.append(session_x[row])
                    psc_r.append(float(np.corrcoef(betas[t], session_psc[row])[0, 1]))
                    trials.append(
                        {"session": session, "run": run, "trial": t, "ten_k_id": int(ten_k), "stim_id": stim}
                    )
            offset += len(run_design.onsets)
        if offset != len(session_psc):
            raise InputError(path, f"{offset} trials (the runs' design files)", f"{len(session_psc)}")
    if len(trials) < 2:
        raise InputError(
            root, "at least 2 test-image trials after each session's first run", str(len(trials))
        )
    return {
        "online": np.stack(online),
        "offline": np.stack(offline),
        "psc_r": np.asarray(psc_r),
        "trials": trials,
        "skipped": skipped,
        "sessions": list(runs_of)[:sessions],
    }


def _scores(gt: np.ndarray, images: np.ndarray, extractor, gt_embeddings: np.ndarray) -> dict[str, float]:
    from brainrecon.metrics import pixcorr, ssim
    from brainrecon.train.evaluation.stage2 import clip_identification

    return {
        "pixcorr": round(float(pixcorr(gt, images)), 4),
        "ssim": round(float(ssim(gt, images)), 4),
        "clip_2way": round(clip_identification(extractor, gt_embeddings, images), 4),
    }


def online_quality(
    root: Path,
    model_dir: Path,
    data_dir: Path,
    out: Path,
    subject: int = 1,
    preset: str = "paper",
    sessions: int | None = None,
) -> dict[str, Any]:
    """Online against offline single-trial betas, reconstructed and scored → out/online.{json,md}, online_sheet.png."""
    from brainrecon.images import contact_sheet
    from brainrecon.metrics import pixcorr
    from brainrecon.model_dir import STAGE2_SUMMARY
    from brainrecon.runtime import Reconstructor
    from brainrecon.sampling import preset_overrides
    from brainrecon.train.evaluation.stage2 import clip_image_embeddings
    from brainrecon.train.experiments.quality import load_test_set
    from brainrecon.train.foundations.loaders import load_clip

    t_start = time.perf_counter()
    host = machine()
    test_betas, test_images = load_test_set(data_dir)
    test_ids = load_npy(data_dir / "test_stim_ids.npy", "test stimulus ids from recon-prepare")
    found = collect_betas(root, subject, model_dir, test_ids, sessions)
    row_of = {int(s): i for i, s in enumerate(test_ids)}
    gt = test_images[[row_of[t["stim_id"]] for t in found["trials"]]]
    n = len(gt)

    info = read_json(model_dir / STAGE2_SUMMARY, "stage-2 summary (recon-train subject)")
    extractor, _ = load_clip(info["config"]["clip"], device="cpu")
    conditions: dict[str, dict[str, Any]] = {}
    with Reconstructor.open(model_dir, stage=2) as rec:
        sampling = rec.sampling.with_overrides(**preset_overrides(preset))
        seeds = [sampling.seed + i for i in range(n)]  # trial i: one seed for both betas
        for name in ("offline", "online"):
            print(f"reconstructing {n} trials from the {name} betas ...", file=sys.stderr, flush=True)
            res = rec.reconstruct(found[name], sampling, seeds=seeds, renormalize=False)
            conditions[name] = {"stage1": res.stage1_images, "final": res.final_images}
        # the usual test set (each image's repeats averaged, offline), for scale
        print(f"reconstructing the {len(test_betas)} test images ...", file=sys.stderr, flush=True)
        res = rec.reconstruct(test_betas, sampling)
        reference = {"stage1": res.stage1_images, "final": res.final_images}

    gt_embeddings = clip_image_embeddings(extractor, gt)
    rows = []
    for name, images in conditions.items():
        row = {"betas": name, "n": n}
        for kind in ("stage1", "final"):
            row[kind] = _scores(gt, images[kind], extractor, gt_embeddings)
            row[kind]["pixcorr_per_trial_mean"] = round(
                float(pixcorr(gt, images[kind], per_image=True).mean()), 4
            )
        rows.append(row)
    ref_embeddings = clip_image_embeddings(extractor, test_images)
    rows.append(
        {
            "betas": "offline, repeats averaged (the test set)",
            "n": len(test_betas),
            **{k: _scores(test_images, reference[k], extractor, ref_embeddings) for k in ("stage1", "final")},
        }
    )
    x_r = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(found["online"], found["offline"], strict=True)]
    result = {
        "machine": host,
        "command": "python -m brainrecon.benchmarks.stream " + " ".join(sys.argv[1:]),
        "nsd_root": str(root),
        "model_dir": str(model_dir),
        "data": str(data_dir),
        "preset": preset,
        "sampling": {
            k: getattr(sampling, k) for k in ("sampler", "num_inference_steps", "strength", "guidance_scale")
        },
        "sessions": found["sessions"],
        "trials": n,
        "skipped": found["skipped"],
        "renormalize": "off for single trials (a stream has no batch to renormalise over); the fitted rule for the "
        "test set",
        "agreement": {
            "psc_r_mean": round(float(found["psc_r"].mean()), 4),
            "psc_r_min": round(float(found["psc_r"].min()), 4),
            "model_input_r_mean": round(float(np.mean(x_r)), 4),
            "what": "per trial, the correlation across voxels of the online beta with the offline one "
            "(percent signal change; and the z-scored model inputs), averaged over trials",
        },
        "rows": rows,
        "metrics_note": "clip_2way is ours: the subject's own CLIP (the stage-2 summary's), among the rows' trials",
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    k = min(SHEET_TRIALS, n)
    contact_sheet(
        [
            ("seen", gt[:k]),
            ("offline s1", conditions["offline"]["stage1"][:k]),
            ("online s1", conditions["online"]["stage1"][:k]),
            ("offline final", conditions["offline"]["final"][:k]),
            ("online final", conditions["online"]["final"][:k]),
        ],
        out / "online_sheet.png",
    )
    write_json(out / "online.json", result)
    write_text(out / "online.md", online_table(result))
    return result


def online_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Online vs offline single-trial betas: {result['trials']} test-image trials, sessions "
        f"{result['sessions'][0]}-{result['sessions'][-1]} runs 2.., preset {result['preset']} "
        f"({m['date'][:10]}, {m['cpu']}, {m['cores']} cores)",
        "",
        "| betas | trials | stage 1 PixCorr | SSIM | CLIP 2-way (ours) | final PixCorr | SSIM | CLIP 2-way (ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s1, fin = row["stage1"], row["final"]
        lines.append(
            f"| {row['betas']} | {row['n']} | {s1['pixcorr']:.3f} | {s1['ssim']:.3f} | {s1['clip_2way']:.3f} | "
            f"{fin['pixcorr']:.3f} | {fin['ssim']:.3f} | {fin['clip_2way']:.3f} |"
        )
    a = result["agreement"]
    lines += [
        "",
        f"Online beta vs offline beta of the same trial, correlation across voxels: mean {a['psc_r_mean']:.3f} "
        f"(lowest {a['psc_r_min']:.3f}); model inputs {a['model_input_r_mean']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- latency

NSD_GRID = (81, 104, 83)  # NSD's func1pt8mm volume (the NSD data manual)
NSD_VOXELS = 15724  # subj01's nsdgeneral ROI (Brain-Diffuser's subj01 input)
REAL_SIZE_IMAGE = 512  # the final image at real size (Versatile Diffusion)


def front_end_real_size(design_path: Path, tr: float, repeats: int = 20) -> dict[str, Any]:
    """The stream's own steps at NSD's size with random data (their cost does not depend on the values): reading
    one per-volume .nii.gz as --watch does (81 x 104 x 83 int16) and masking it to 15,724 voxels, the LSS GLM of
    the run's last trial (the longest window) over those voxels, normalising, and writing a 512-px PNG of random
    pixels (incompressible: the slowest PNG). Medians over `repeats` calls, seconds."""
    import tempfile

    import nibabel as nib

    from brainrecon.images import save_png
    from brainrecon.serve.stream import RunDesign, hrf_kernel, lss_beta

    rng = np.random.default_rng(0)
    design = RunDesign.read(design_path)
    mask_indices = np.sort(rng.choice(int(np.prod(NSD_GRID)), NSD_VOXELS, replace=False))
    data = rng.normal(2000, 20, (design.n_volumes, NSD_VOXELS)).astype(np.float32)
    t = len(design.onsets) - 1
    end = min(int(design.onsets[t]) + 7, design.n_volumes - 1)
    present = np.ones(end + 1, dtype=bool)
    kernel = hrf_kernel(tr)
    mean, std = data.mean(axis=0), data.std(axis=0)

    def median(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)), 6)

    with tempfile.TemporaryDirectory() as tmp:
        vol_path = Path(tmp) / "vol_00000.nii.gz"
        volume = rng.integers(0, 4000, NSD_GRID, dtype=np.int16)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), vol_path)
        png = rng.integers(0, 256, (REAL_SIZE_IMAGE, REAL_SIZE_IMAGE, 3), dtype=np.uint8)
        result = {
            "read_s": median(
                lambda: np.asarray(nib.load(vol_path).dataobj).reshape(-1)[mask_indices].astype(np.float32)
            ),
            "glm_s": median(lambda: lss_beta(data[: end + 1], present, t, design, kernel, 1)),
            "normalise_s": median(lambda: (((data[0] - mean) / std - mean) / std).astype(np.float32)),
            "write_png_s": median(lambda: save_png(Path(tmp) / "final_00000.png", png)),
        }
    return {
        "grid": list(NSD_GRID),
        "voxels": NSD_VOXELS,
        "glm_window_volumes": end + 1,
        "png_px": REAL_SIZE_IMAGE,
        "repeats": repeats,
        **result,
    }


RESULTS = Path(__file__).parent / "results"
# Published anchors for SD 1.5 at 512 px, 50 steps, one H100 PCIe: TensorRT 0.75 s against torch 2 +
# torch.compile 1.11 s (NVIDIA TensorRT demo/Diffusion README; Hugging Face diffusers "torch 2.0" benchmarks);
# their ratio carried over to our compiled step is a projection, not a measurement (docs/gpu.md).
TRT_OVER_COMPILE = 0.75 / 1.11


def gpu_projection(front_end: dict[str, Any], presets: tuple[str, ...]) -> dict[str, Any]:
    """One real-size trial on the H200 of benchmarks/results/gpu/ (torch fp16, measured 2026-12-04), from the
    committed per-call figures: the front end at NSD's size (measured here, on the CPU), the GRU and CLIP ridges at
    real size (ORT on this project's AMD EPYC), the VDVAE decoder, the compiled UNet step and the SD VAE decoder (GPU);
    the SD VAE encoder was not run on the GPU: the decoder's time x the encoder/decoder ratio measured in torch on
    the CPU. Stage 2 recomputes stage 1, as the runtime does. Each preset's UNet calls are its sampler's timesteps
    at the paper's defaults."""
    from brainrecon.runtime.ddim import DDIMScheduler
    from brainrecon.runtime.samplers import schedulers
    from brainrecon.sampling import SamplingConfig, preset_overrides

    by_sampler = schedulers(DDIMScheduler())

    gpu = read_json(RESULTS / "gpu/gpu_bench_compile.json", "GPU compiled UNet (benchmarks/gpu_run.sh)")
    decoders = read_json(RESULTS / "gpu/gpu_bench_eager_graphs.json", "GPU decoders (benchmarks/gpu_run.sh)")
    cpu = read_json(RESULTS / "real_size_amd_epyc.json", "real-size CPU figures")["models"]
    enc = read_json(RESULTS / "real_size_vae_encoder_amd_epyc.json", "real-size VAE encoder curve")
    dec = read_json(RESULTS / "real_size_vae_decoder_amd_epyc.json", "real-size VAE decoder curve")
    torch_s = [d["pipelines"]["torch"]["batches"]["1"]["p50_s"] for d in (enc, dec)]
    step = gpu["unet_step"]["b1/compile:reduce-overhead"]["median_s"]
    loop37 = gpu["guided_loop"]["b1/compile:reduce-overhead"]["37"]["median_s"]
    per_step = {"torch.compile": loop37 / 37, "TensorRT (projected step)": step * TRT_OVER_COMPILE}
    vae_decoder = decoders["vae_decoder"]["b1/float16"]["median_s"]
    parts = {
        "front_end": front_end["read_s"] + front_end["glm_s"] + front_end["normalise_s"],
        "stage1": cpu["gru"]["fp32"]["latency"]["1"]["median_s"]
        + decoders["vdvae_decoder"]["b1/float32"]["median_s"],
        "clip_ridges": sum(cpu[m]["fp32"]["latency"]["1"]["median_s"] for m in ("clip_text", "clip_vision")),
        "vae_encoder": vae_decoder * torch_s[0] / torch_s[1],
        "vae_decoder": vae_decoder,
        "write_png": front_end["write_png_s"],
    }
    rows = {}
    for preset in presets:
        cfg = SamplingConfig().with_overrides(**preset_overrides(preset))
        calls = len(by_sampler[cfg.sampler].timesteps(cfg.num_inference_steps, cfg.strength))
        for engine, s in per_step.items():
            unet = calls * s
            final = (
                parts["front_end"] + 2 * parts["stage1"] + parts["clip_ridges"] + parts["vae_encoder"] + unet
                + parts["vae_decoder"] + parts["write_png"]
            )  # fmt: skip
            rows[f"{preset}, {engine}"] = {
                "unet_calls": calls,
                "unet_s": round(unet, 4),
                "stage1_image_s": round(parts["front_end"] + parts["stage1"], 4),
                "final_image_s": round(final, 4),
            }
    return {
        "gpu": gpu["machine"]["gpu"],
        "torch": gpu["machine"]["torch"],
        "parts_s": {k: round(v, 4) for k, v in parts.items()},
        "rows": rows,
    }


def stream_latency(
    root: Path,
    model_dir: Path,
    out: Path,
    subject: int = 1,
    session: int = 1,
    run: int = 2,
    presets: tuple[str, ...] = ("paper", "fast"),
    speed: float = 1.0,
    browser: bool = True,
) -> dict[str, Any]:
    """Replay one run per preset at `speed` through run_stream with the live viewer (and, with `browser`, the page
    open in headless Chromium) → out/latency.{json,md}. Calibrated on the session's run 1."""
    import subprocess
    import tempfile

    from brainrecon.sampling import preset_overrides
    from brainrecon.serve.stream import _run_tr, calibrate, run_stream
    from brainrecon.serve.viewer import close_chromium, open_chromium, start_viewer

    host = machine()
    run_path = layout.timeseries_path(root, subject, session, run)
    design_path = layout.run_design_path(root, subject, session, run)
    tr = _run_tr(run_path, None)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "calibration.npz"
        calibrate(
            layout.timeseries_path(root, subject, session, 1),
            layout.run_design_path(root, subject, session, 1),
            model_dir,
            cal,
        )
        for preset in presets:
            stream_out = Path(tmp) / preset  # run_stream makes it; the viewer waits for its log
            viewer = start_viewer(stream_out, nsd_root=root, subject=subject, port=0)
            page = (
                open_chromium([viewer.url], Path(tmp) / f"profile-{preset}", subprocess.DEVNULL)
                if browser
                else None
            )
            try:
                print(
                    f"{preset}: streaming {run_path.name} at speed {speed}, page {viewer.url}",
                    file=sys.stderr,
                )
                summary = run_stream(
                    model_dir,
                    design_path,
                    stream_out,
                    replay_path=run_path,
                    calibration_path=cal,
                    speed=speed,
                    sampling_overrides=preset_overrides(preset),
                )
                shown = viewer.settle(timeout=10) if page is not None else None  # the page's last reports
            finally:
                if page is not None:
                    close_chromium(page)
                viewer.stop()
            steps = summary["steps"]
            total = summary["latency"]["final"]["mean_s"]
            rows[preset] = {
                "latency": summary["latency"],
                "page_latency": shown,
                "steps": steps,
                "share_of_final_mean": {
                    k: round(v["mean_s"] * (v["n"] / summary["trials_done_now"]) / total, 4)
                    for k, v in steps.items()
                    if v["n"]
                },
                "trials": summary["trials_done_now"],
                "faults": summary["faults"],
            }
    result = {
        "machine": host,
        "command": "python -m brainrecon.benchmarks.stream " + " ".join(sys.argv[1:]),
        "model_dir": str(model_dir),
        "run": str(run_path),
        "speed": speed,
        "tr_s": round(tr, 4),
        "browser": browser,
        "presets": rows,
        "front_end_real_size": front_end_real_size(design_path, tr),
    }
    result["gpu_projection"] = gpu_projection(result["front_end_real_size"], presets)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "latency.json", result)
    write_text(out / "latency.md", latency_table(result))
    return result


def latency_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"recon-stream latency, {Path(result['run']).name} replayed at speed {result['speed']} (TR "
        f"{result['tr_s']} s), {m['date'][:10]}, {m['cpu']}, {m['cores']} cores",
        "",
        "| preset | trials | stage 1 on disk p50 / p95 | final on disk p50 / p95 | stage 1 on the page p50 / p95 "
        "| final on the page p50 / p95 |",
        "|---|---|---|---|---|---|",
    ]

    def pair(d: dict | None) -> str:
        return "–" if not d or d["p50_s"] is None else f"{d['p50_s']:.3f} / {d['p95_s']:.3f} s"

    for name, row in result["presets"].items():
        page = row["page_latency"] or {}
        lines.append(
            f"| {name} | {row['trials']} | {pair(row['latency']['stage1'])} | {pair(row['latency']['final'])} | "
            f"{pair(page.get('stage1'))} | {pair(page.get('final'))} |"
        )
    lines += ["", "| preset | " + " | ".join(STEP_NAMES) + " |", "|---|" + "---|" * len(STEP_NAMES)]
    for name, row in result["presets"].items():
        cells = [
            f"{1000 * row['steps'][k]['mean_s']:.1f} ms ({100 * row['share_of_final_mean'].get(k, 0):.0f}%)"
            if row["steps"][k]["n"]
            else "–"
            for k in STEP_NAMES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    f = result["front_end_real_size"]
    lines += [
        "",
        f"At NSD's size ({'x'.join(map(str, f['grid']))} volume, {f['voxels']} voxels, {f['png_px']}-px PNG): read "
        f"{1000 * f['read_s']:.1f} ms, GLM {1000 * f['glm_s']:.1f} ms, normalise {1000 * f['normalise_s']:.2f} ms, "
        f"PNG {1000 * f['write_png_s']:.1f} ms.",
    ]
    g = result["gpu_projection"]
    lines += [
        "",
        f"Real size on one {g['gpu']} (torch {g['torch']} fp16; see docs/real-time.md for what is measured and what "
        "projected):",
        "",
        "| preset, UNet | UNet calls | UNet | stage-1 image | final image |",
        "|---|---|---|---|---|",
    ]
    for name, row in g["rows"].items():
        lines.append(
            f"| {name} | {row['unet_calls']} | {row['unet_s']:.3f} s | {row['stage1_image_s']:.3f} s | "
            f"{row['final_image_s']:.3f} s |"
        )
    return "\n".join(lines) + "\n"


STEP_NAMES = ("read", "glm", "normalise", "stage1", "stage2", "write")


# ----------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    on = sub.add_parser("online", help="online vs offline single-trial betas, reconstructed and scored")
    on.add_argument("--nsd-root", type=Path, required=True, help="recon-sim --timeseries output (NSD layout)")
    on.add_argument("--model-dir", type=Path, required=True, help="exported two-stage model folder")
    on.add_argument(
        "--data", type=Path, required=True, help="recon-prepare folder (test images and their ids)"
    )
    on.add_argument("--out", type=Path, required=True, help="results folder")
    on.add_argument("--subject", type=int, default=1)
    on.add_argument("--preset", default="paper", help="stage-2 sampling preset")
    on.add_argument("--sessions", type=int, default=None, help="the first N sessions (default: all)")
    la = sub.add_parser("latency", help="the stream at real-time pace with the live viewer open")
    la.add_argument("--nsd-root", type=Path, required=True, help="recon-sim --timeseries output (NSD layout)")
    la.add_argument("--model-dir", type=Path, required=True, help="exported model folder")
    la.add_argument("--out", type=Path, required=True, help="results folder")
    la.add_argument("--subject", type=int, default=1)
    la.add_argument("--session", type=int, default=1, help="its run 1 calibrates")
    la.add_argument("--run", type=int, default=2, help="the run replayed")
    la.add_argument("--presets", default="paper,fast", help="stage-2 sampling presets, one replay each")
    la.add_argument("--speed", type=float, default=1.0, help="1: the run's TR (real time)")
    la.add_argument("--no-browser", action="store_true", help="no headless Chromium (no page latency)")
    args = p.parse_args(argv)
    if args.mode == "latency":
        result = stream_latency(
            args.nsd_root,
            args.model_dir,
            args.out,
            args.subject,
            args.session,
            args.run,
            tuple(args.presets.split(",")),
            args.speed,
            not args.no_browser,
        )
        print(latency_table(result))
    if args.mode == "online":
        result = online_quality(
            args.nsd_root, args.model_dir, args.data, args.out, args.subject, args.preset, args.sessions
        )
        print(online_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
