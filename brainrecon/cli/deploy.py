"""Deployment commands: `recon-export` (torch → ONNX → engines) and `recon-infer` (the lean runtime, torch-free).

Thin wiring; the logic lives in `brainrecon.export.subject.export_model_dir` and
`brainrecon.runtime.infer.run_inference`. Heavy imports happen inside the commands, so `recon-infer` never loads
torch (tests/test_runtime.py checks `sys.modules`). Exit codes: 0 ok, 1 failure (one-line error), 2 usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainrecon.choices import (
    Device,
    Engine,
    ExportFormat,
    ExportPrecision,
    ExportStage,
    ExportUnetGraph,
    Precision,
    Preset,
    Sampler,
    Stage,
    TritonVariant,
)
from brainrecon.cli import console, print_summary, run_app

export_app = typer.Typer(
    add_completion=False, help="Export a subject model directory to ONNX (and TensorRT engines)."
)


@export_app.command()
def export(
    model_dir: Annotated[Path, typer.Option(help="Subject model folder from recon-train subject.")],
    stage: Annotated[
        ExportStage,
        typer.Option(
            help="stage1 (the fitted regressor and vdvae_decoder), gru, ridge or vdvae (that model only), stage2 "
            "(the stage-2 models) or all."
        ),
    ] = "all",
    precision: Annotated[ExportPrecision, typer.Option(help="File precision: fp32, fp16 or both.")] = "both",
    unet_graph: Annotated[
        ExportUnetGraph,
        typer.Option(
            help="Stage-2 UNet graphs to export: both (the plain unet and the K/V-once pair unet_context + "
            "unet_kv, the weights twice on disk), kv (the pair only: what the runtime uses) or plain (unet only). "
            "--format triton: the graph the repository serves (both: the pair when exported, else unet)."
        ),
    ] = "both",
    deepcache: Annotated[
        bool,
        typer.Option(
            "--deepcache",
            help="Also export the DeepCache pair unet_deep + unet_shallow (stage 2), which recon-infer "
            "--cache-interval K > 1 runs on: the UNet weights twice more on disk.",
        ),
    ] = False,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Compare ONNX Runtime with torch after export.")
    ] = True,
    engines: Annotated[
        bool,
        typer.Option("--engines/--no-engines", help="Build TensorRT engines when TensorRT and a GPU exist."),
    ] = True,
    verify: Annotated[
        bool, typer.Option("--verify", help="Only re-hash the files of manifest.json; export nothing.")
    ] = False,
    format: Annotated[
        ExportFormat,
        typer.Option(
            help="onnx: export the models; triton: write a Triton model repository (--out) from an "
            "exported folder (precision 'both' means fp32 there)."
        ),
    ] = "onnx",
    out: Annotated[Path | None, typer.Option(help="--format triton: the model repository folder.")] = None,
    variant: Annotated[
        TritonVariant,
        typer.Option(
            help="--format triton: gpu (onnxruntime_onnx / tensorrt_plan platforms) or cpu (Python-backend "
            "ONNX Runtime wrappers, for a server with the Python backend only)."
        ),
    ] = "gpu",
    plans: Annotated[
        bool, typer.Option(help="--format triton: serve the manifest's TensorRT plans, not the ONNX files.")
    ] = False,
    instances: Annotated[int, typer.Option(help="--format triton: instances per model.")] = 1,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="--format triton: the brainrecon model's dynamic-batching queue delay.")
    ] = 5000,
    preset: Annotated[
        Preset,
        typer.Option(help="--format triton: the brainrecon model's sampling, paper (as fitted) or fast."),
    ] = "paper",
    overwrite: Annotated[
        bool,
        typer.Option(
            help="--format triton: replace an existing --out, only if it is a repository this command wrote."
        ),
    ] = False,
) -> None:
    """Export, validate and record the models of a subject model directory.

    Examples:
      recon-export --model-dir engines/subj01 --stage all --precision both
      recon-export --model-dir engines/subj01 --stage all --unet-graph kv
      recon-export --model-dir engines/subj01 --stage stage2 --deepcache
      recon-export --model-dir engines/subj01 --verify
      recon-export --model-dir engines/subj01 --format triton --out triton-repo --precision fp16
      recon-export --model-dir engines/subj01 --format triton --out triton-repo --variant cpu --preset fast
    """
    if format == "triton":
        from brainrecon.export.triton import RepoOptions, write_triton_repository
        from brainrecon.io import TRITON_REPOSITORY, output_dir

        if out is None:
            raise typer.BadParameter("expected a repository folder, found none", param_hint="--out")
        options = RepoOptions(
            variant=variant,
            precision="fp32" if precision == "both" else precision,
            engine="trt" if plans else "onnx",
            instances=instances,
            max_queue_delay_us=max_queue_delay_us,
            unet_graph="auto" if unet_graph == "both" else unet_graph,
            preset=preset,
        )
        with output_dir(out, TRITON_REPOSITORY, overwrite, inputs=(model_dir,)):
            repo = write_triton_repository(model_dir, out, options, overwrite=overwrite)
        rows = {name: m.get("platform") or m.get("backend") for name, m in repo["models"].items()}
        print_summary(f"recon-export --format triton ({variant}, {options.precision}) -> {out}", rows)
        return
    if verify:
        from brainrecon.manifest import verify_manifest

        manifest = verify_manifest(model_dir)
        print_summary(
            f"recon-export --verify {model_dir}",
            {"manifest_version": manifest.manifest_version, "artifacts verified": len(manifest.artifacts)},
        )
        return
    from brainrecon.export.subject import export_model_dir

    summary = export_model_dir(
        model_dir,
        stage=stage,
        precision=precision,
        validate=validate,
        engines=engines,
        unet_graph=unet_graph,
        deepcache=deepcache,
    )
    rows = {
        f"{e['model']} {e['precision']}": f"{e['path']} ({e['bytes'] / 1e6:.1f} MB, {e['export_seconds']} s, "
        + (
            f"max diff {e['validation']['max_abs']:.2g}, median {e['validation']['median_abs']:.2g})"
            if isinstance(e["validation"], dict)
            else "not validated)"
        )
        for e in summary["exported"]
    }
    engines_info = summary["engines"]
    rows["engines"] = ", ".join(engines_info["built"]) if engines_info["built"] else engines_info["skipped"]
    rows["manifest"] = summary["manifest"]
    print_summary(f"recon-export {stage} -> {model_dir}", rows)


infer_app = typer.Typer(add_completion=False, help="Reconstruct images from betas with the exported models.")


@infer_app.command()
def infer(
    betas: Annotated[
        Path, typer.Argument(help="Z-scored betas .npy (N x V), or a NIfTI / NSD-style HDF5 betas session.")
    ],
    model_dir: Annotated[Path, typer.Option(help="Exported subject model folder (recon-export).")],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder: stage1_NNNNN.png (NNNNN: the input row), final_NNNNN.png and "
            "final_images.npy (stage 2), contact_sheet.png, summary.json, timings.json, metrics.json (with --stimuli)."
        ),
    ],
    engine: Annotated[
        Engine,
        typer.Option(help="ort (ONNX Runtime), openvino (CPU, fp32 or bf16) or trt (TensorRT engines)."),
    ] = "ort",
    stage: Annotated[
        Stage | None,
        typer.Option(
            help="1: VDVAE only; 2: VDVAE then Versatile Diffusion img2img "
            "(default: 2 when the model has a fitted stage 2, else 1).",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(help="Model precision: fp32, fp16 (ort, trt) or bf16 (openvino on the fp32 files)."),
    ] = "fp32",
    device: Annotated[Device, typer.Option(help="ONNX Runtime device (execution provider).")] = "cpu",
    trials: Annotated[
        str | None, typer.Option(help="Rows/trials to reconstruct, e.g. 0,5,10-20 (inclusive); default all.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Images per model call (default: each engine's profile max; the UNet runs 2x)."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Stage-2 noise seed (default: the fitted one; stage 1 is deterministic)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Stage 2: schedule length (default: the fitted one, 50).")
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            help="Stage 2: share of the schedule re-noised, 0..1 (default: fitted, 0.75; 0: VAE only)."
        ),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Stage 2: classifier-free guidance scale (default: fitted, 7.5).")
    ] = None,
    preset: Annotated[
        Preset,
        typer.Option(
            help="Stage 2: paper (Brain-Diffuser's recipe, as fitted) or fast (DPM-Solver++ 2M, 10 steps: "
            "docs/speed.md); the options below override it."
        ),
    ] = "paper",
    sampler: Annotated[
        Sampler | None,
        typer.Option(
            help="Stage 2: ddim (the paper's) or dpmpp_2m (DPM-Solver++ 2M, for fewer steps) (default: fitted, "
            "ddim)."
        ),
    ] = None,
    guidance_stop: Annotated[
        float | None,
        typer.Option(
            help="Stage 2: share of the denoising steps run with classifier-free guidance, 0..1 (the first "
            "ceil(share x steps)); the rest run the conditional pass alone, at half the UNet rows (default: "
            "fitted, 1.0)."
        ),
    ] = None,
    cache_interval: Annotated[
        int | None,
        typer.Option(
            help="Stage 2: DeepCache step reuse, the whole UNet every K-th step (the first always) and its "
            "shallow branch on the others; 1 = off (default: fitted, 1). K > 1 needs recon-export --deepcache."
        ),
    ] = None,
    stimuli: Annotated[
        Path | None, typer.Option(help="Ground-truth images .npy, one per betas row (test_images.npy).")
    ] = None,
    renormalize: Annotated[
        bool | None,
        typer.Option(
            "--renormalize/--no-renormalize",
            help="Re-normalise predictions over the input set (default: as the model was trained; stage 2 "
            "skips it for a single trial).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="ONNX Runtime threads (default: all cores); on the CPU the UNet loop runs this many 1-thread "
            "sessions on chunks of the images."
        ),
    ] = None,
    allow_cpu_fallback: Annotated[
        bool,
        typer.Option(help="Run on the CPU when the GPU provider is missing (warns), instead of failing."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output folder, only if recon-infer wrote it.")
    ] = False,
) -> None:
    """Reconstruct images from betas with the exported ONNX models or TensorRT engines.

    Examples:
      recon-infer data/subj01/test_betas.npy --model-dir engines/subj01 --out out/ --stimuli data/subj01/test_images.npy
      recon-infer data/subj01/test_betas.npy --model-dir engines/subj01 --out out/ --seed 3 --steps 25 --guidance 5
      recon-infer data/subj01/test_betas.npy --model-dir engines/subj01 --out out/ --preset fast
      recon-infer data/subj01/test_betas.npy --model-dir engines/subj01 --out out/ --sampler dpmpp_2m --steps 20 --guidance-stop 0.6
      recon-infer data/subj01/test_betas.npy --model-dir engines/subj01 --out out/ --cache-interval 3
      recon-infer betas_session01.nii.gz --model-dir engines/subj01 --out out/ --trials 0,5,10-20 --engine trt
      recon-infer data/subj01/test_betas.npy --model-dir engines/subj01 --out out/ --stage 1
    """
    from brainrecon.io import RECON_INFER_OUTPUT, output_dir
    from brainrecon.runtime.api import RuntimeOptions
    from brainrecon.runtime.infer import run_inference
    from brainrecon.sampling import preset_overrides

    options = RuntimeOptions(
        engine=engine,
        precision=precision,
        device=device,
        threads=threads,
        allow_cpu_fallback=allow_cpu_fallback,
    )
    sampling = preset_overrides(
        preset,
        seed=seed,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance,
        sampler=sampler,
        guidance_stop=guidance_stop,
        cache_interval=cache_interval,
    )
    with output_dir(out, RECON_INFER_OUTPUT, overwrite, inputs=(betas, model_dir, stimuli)):
        summary = run_inference(
            betas,
            model_dir,
            out,
            options,
            stage=stage,
            sampling=sampling,
            trials=trials,
            batch_size=batch_size,
            stimuli=stimuli,
            renormalize=renormalize,
            overwrite=overwrite,
            progress=True,
        )
    timings = summary["timings"]
    rows = {
        "trials": summary["n_trials"],
        "providers": "; ".join(f"{k}: {', '.join(v)}" for k, v in summary["providers"].items()),
        "cpu fallback": summary["cpu_fallback"] or "none",
    }
    if summary["stage"] == 1:
        rows |= {"regressor s": timings["regressor_s"], "decoder s": timings["decoder_s"]}
    else:
        sampling = summary["sampling"]
        rows["sampling"] = (
            f"{sampling['sampler']}, seed {sampling['seed']}, {len(sampling['timesteps'])} of "
            f"{sampling['num_inference_steps']} steps (strength {sampling['strength']}), guidance "
            f"{sampling['guidance_scale']} on {sampling['guided_steps']} of them"
        )
        if sampling["cache_interval"] > 1:
            rows["sampling"] += (
                f", DeepCache every {sampling['cache_interval']} ({sampling['full_steps']} full UNet steps)"
            )
        rows |= {
            f"{name} s": round(timings[f"{name}_s"], 3)
            for name in ("stage1", "clip", "vae_encode", "unet", "vae_decode")
        }
        for name, values in summary.get("metrics", {}).items():
            if isinstance(values, dict):
                rows[f"{name} PixCorr / SSIM"] = " / ".join(
                    "n/a" if v is None else f"{v:.3f}" for v in (values["pixcorr"], values["ssim"])
                )
    rows |= {"per image ms": round(timings["per_image_ms"], 2), "summary": str(out / "summary.json")}
    print_summary(f"recon-infer stage {summary['stage']} ({engine} {precision}) -> {out}", rows)


bench_app = typer.Typer(add_completion=False, help="Runtime vs torch reference benchmark, per stage.")


@bench_app.command()
def bench(
    betas: Annotated[Path, typer.Argument(help="z-scored betas .npy (e.g. data/subj01/test_betas.npy).")],
    model_dir: Annotated[Path, typer.Option(help="Exported model folder (recon-export).")] = Path(
        "engines/subj01"
    ),
    out: Annotated[Path, typer.Option(help="Results JSON.")] = Path("stage2_runtime.json"),
    limit: Annotated[int | None, typer.Option(help="Use the first N betas only.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats after one warm-up round.")] = 3,
    threads: Annotated[
        int | None, typer.Option(help="Threads for torch and ORT (default: all cores).")
    ] = None,
    check: Annotated[
        Path | None, typer.Option(help="Targets JSON (benchmarks/targets.json); exit 1 below a floor.")
    ] = None,
    pipelines: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: torch, torch_best, ort_fp32_plain, ort_fp32, ort_fp16, openvino_fp32, "
            "openvino_bf16. Default: torch,ort_fp32_plain,ort_fp32 with --check (what the floors name), else all "
            "but ort_fp16."
        ),
    ] = None,
    curves: Annotated[
        str, typer.Option(help="Batch sizes for latency/throughput curves and their PNG, e.g. 1,4,16,64.")
    ] = "",
    curve_repeats: Annotated[int, typer.Option(help="Timed repeats per batch size of the curves.")] = 3,
    curve_pipelines: Annotated[
        str | None, typer.Option(help="Pipelines of the curves (default: --pipelines).")
    ] = None,
    torch_candidates: Annotated[
        str, typer.Option(help="torch CPU modes tried for torch_best.")
    ] = "eager,channels_last,bf16,compile,compile_bf16",
    torch_modes: Annotated[
        Path | None,
        typer.Option(help="torch_best's modes measured earlier on this machine (a results JSON)."),
    ] = None,
    note: Annotated[
        str, typer.Option(help="How the model folder was made (recorded with the results).")
    ] = "",
) -> None:
    """Two-stage reconstruction: the runtime (ONNX Runtime with and without the K/V-once UNet, OpenVINO f32/bf16)
    vs the torch reference (eager and its fastest CPU mode), same models, betas and settings, interleaved.

    Example: recon-bench data/subj01/test_betas.npy --model-dir engines/subj01 --limit 32 --curves 1,4,16,64
    """
    import json

    from brainrecon.benchmarks.runtime_vs_torch import CI_PIPELINES, DEFAULT_PIPELINES, bench_and_write
    from brainrecon.errors import BrainReconError

    def names(value: str) -> tuple[str, ...]:
        return tuple(p for p in value.split(",") if p)

    default = CI_PIPELINES if check is not None else DEFAULT_PIPELINES
    modes = json.loads(torch_modes.read_text()) if torch_modes else None
    line, misses = bench_and_write(
        model_dir,
        betas,
        out,
        limit,
        repeats,
        threads,
        check,
        note,
        names(pipelines) if pipelines else default,
        tuple(int(b) for b in curves.split(",") if b),
        curve_repeats,
        modes.get("torch_modes", modes) if modes else None,
        names(torch_candidates),
        names(curve_pipelines) if curve_pipelines else None,
    )
    console.print(line)
    if misses:
        raise BrainReconError(f"speed regression against {check}: " + "; ".join(misses))
    if check is not None:
        console.print(f"speedups at or above the floors of {check}")


export_main = run_app(export_app)
bench_main = run_app(bench_app)
infer_main = run_app(infer_app)
